"""The exact optimizer: which node runs which contiguous layers, for latency or throughput.

A plan is a path through a state graph. A state is (layer boundary ``i``, node ``d``, set
``S`` of nodes already used): the activations of boundary ``i`` sit on ``d``. A *stage* edge
runs layers ``[i, j)`` on ``d`` (if they fit its memory); a *hop* edge moves boundary ``j``'s
tensors to a node not in ``S``. Minimum latency is the shortest path (edge costs add);
maximum throughput is the minimax path (the bottleneck is the largest edge), and among the
plans with that bottleneck the shortest one.

The graph has ``L² · N · 2^N`` stage edges (about 80 million at 200 layers and 8 nodes), too
many to build as a networkx graph, so :func:`_search` relaxes it directly: node sets are
visited in increasing bit-mask order (adding a node makes the mask larger, so this is a
topological order), and each set's stage edges are relaxed at once with numpy. States whose
cost plus a lower bound on the layers left is no better than the best plan so far are pruned.

A stage may run on several nodes at once (a replica group, requests dealt in proportion to
the members' speeds): for throughput, the exact search also offers every group the work budget
allows as a virtual node that takes all its members (:mod:`partition.replication`). Latency
does not: a replicated stage's expected latency is never below its best member's alone.

With compression offered (:class:`~partition.costs.Compression`), the encoding at each cut,
the weight format of each stage and the error spent are coordinates of the same states; the
search is unchanged and :mod:`partition.choice_tables` builds its larger tables.

Past :data:`EXACT_WORK_LIMIT` the same search runs over restricted spaces (every order of the
fastest nodes the budget allows, and the whole cluster in a few fixed orders), and its best
plan is the warm start of a mixed-integer program over the same tables (:mod:`partition.milp`,
compression included) that HiGHS solves within :class:`~partition.milp.SolverLimits`. The
result says ``exact=False`` unless the solver proved the plan optimal, and carries the
solver's proven lower bound. Neither that path nor weight formats to choose replicate
stages (:attr:`OptimizeResult.unreplicated` says so). "No plan fits" is said only when
proven: by the exhaustive search, or by the solver's proof that its program has no solution.

With shared media (:mod:`partition.media`) a hop also costs its airtime, but a medium's busy
time is a sum over the plan's hops, which a minimax path cannot see: the throughput is then
the solver's, with one more row per medium. Its warm start is the better of the search's
best plan on each hop's own cost (re-priced with the media) and :func:`_least_airtime`'s,
which is the optimum itself for one medium over an exhaustive space (the solver then only
breaks the tie by latency). With one medium that bisection also runs over the replica
groups (the solver has none), and its plan is taken if it is faster; ties among replicated
plans are then not broken by latency. With more media no stage is replicated. The search's
bottleneck bounds the optimum from below, and where the search is exhaustive the solver runs
to a zero gap. Latency adds each hop's time and needs no more than the hops' airtime.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import NamedTuple

import numpy as np

from partition.choice_tables import Options, StateIndex, choice_tables
from partition.costs import CostModel
from partition.errors import NoFeasiblePlanError, PlanningError
from partition.milp import DEFAULT_LIMITS, SolverLimits, StateGraph, solve
from partition.path_latency import median_path_latency
from partition.plan import Objective
from partition.relaxation import relax
from partition.replication import (
    GroupTables,
    group_tables,
    group_work,
    replica_groups,
    replica_shares,
)
from partition.units import format_bytes

EXACT_WORK_LIMIT = 4e8
"""Largest ``N · 2^(N-1) · (L+1)²`` (stage edges relaxed) searched exhaustively."""
MAX_NODES = 62
"""Node sets are 64-bit masks."""
TIE_TOLERANCE = 1e-12
"""Relative slack when keeping only the stages and hops within the minimal bottleneck."""
EXACT_TOLERANCE = 1e-9
"""A plan within this relative distance of the solver's lower bound counts as exact."""


@dataclass(frozen=True)
class Span:
    """Layers ``[start, end)`` run on node index ``node``; a replicated stage runs on every
    node of ``replicas`` (``node`` first; defaults to ``node`` alone), each taking its share
    of the requests: ``shares`` if given (a running plan's), else the cost model's
    :func:`~partition.replication.replica_shares`."""

    node: int
    start: int
    end: int
    replicas: tuple[int, ...] = ()
    shares: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.replicas:
            object.__setattr__(self, "replicas", (self.node,))
        if self.replicas[0] != self.node:
            raise ValueError(f"{self} must list its node first among its replicas")
        if self.shares and len(self.shares) != len(self.replicas):
            raise ValueError(f"{self} must give one share per replica")

    def dealt(self, cost: CostModel) -> tuple[float, ...]:
        """Each replica's share of the requests."""
        return self.shares or replica_shares(cost, self.replicas)


@dataclass(frozen=True)
class Schedule:
    """A priced plan.

    ``transfer_seconds``, ``delay_seconds`` and ``encodings`` have one entry more than
    ``spans``: source to the first stage, between consecutive stages, and the last stage to
    the sink. A link's transfer time is how long it is busy with a request (its bytes over
    the bandwidth, with the source's encoding and the sink's decoding); its delay, the
    latency, adds to the request's latency only (0 where no link is used). With shared media
    a transfer takes at least its airtime, and ``medium_seconds`` holds each medium's busy
    time per request (:mod:`partition.media`).
    With replicated stages, ``stage_seconds`` is a stage's busiest replica's time per request
    (its share of the requests times its compute), ``transfer_seconds`` a hop's busiest link
    (one per sender and receiver pair, carrying the product of their shares), and
    ``delay_seconds`` and ``latency_s`` are expected over the dealing (a medium carries each
    pair's airtime times the product of their shares). ``latency_p50_s`` is the median over
    the paths a request may take, one replica a stage
    (:func:`~partition.path_latency.median_path_latency`); without replicas, ``latency_s``.
    ``encodings`` and ``formats`` are option indices (0: raw, full precision) into the cost
    model's :class:`~partition.choice_tables.Options`; ``error_bound`` is the sum of the
    errors the chosen options cause alone.
    """

    spans: tuple[Span, ...]
    latency_s: float
    latency_p50_s: float
    bottleneck_s: float
    stage_seconds: tuple[float, ...]
    transfer_seconds: tuple[float, ...]
    delay_seconds: tuple[float, ...]
    fits: bool
    encodings: tuple[int, ...] = ()
    formats: tuple[int, ...] = ()
    error_bound: float = 0.0
    medium_seconds: tuple[float, ...] = ()

    @property
    def throughput_per_s(self) -> float:
        """Requests per second when the pipeline is full."""
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else float("inf")


@dataclass(frozen=True)
class OptimizeResult:
    """The best schedule found; ``lower_bound_s`` bounds the objective's optimum from below
    (it equals the schedule's latency or bottleneck when ``exact``); ``solver``: found by
    HiGHS past the exhaustive search's limit; ``unreplicated``: see the attribute."""

    schedule: Schedule
    exact: bool
    lower_bound_s: float
    solver: bool = False
    unreplicated: str = ""
    """Why replicated stages were not considered though asked for (one clause), or ``""``."""


def evaluate(
    cost: CostModel,
    spans: Iterable[Span],
    encodings: Sequence[int] | None = None,
    formats: Sequence[int] | None = None,
) -> Schedule:
    """Price an assignment of layer ranges to nodes (memory is checked, not enforced), with
    an encoding per link and a weight format per stage (default: raw, full precision).

    A stage's time includes decoding what it receives and encoding what it sends; the
    source's encoding and the sink's decoding count with their links. The bottleneck is the
    busiest stage, link or shared medium; the latency adds every stage, transfer and link
    latency. A replicated stage is priced as :class:`Schedule` says: busy times per replica
    and per replica pair's link, the latency expected over the dealing and its median over
    the paths a request may take.

    Raises
    ------
    ValueError
        The spans do not cover the layers in order, one non-empty range per node, or the
        choices are not one valid option per link and per stage (raw where no link is used).
    """
    spans = tuple(spans)
    _check_spans(cost, spans)
    opts = Options.of(cost)
    ends = [(cost.source,), *(s.replicas for s in spans), (cost.sink,)]
    shares = [(1.0,), *(s.dealt(cost) for s in spans), (1.0,)]
    boundaries = [0, *(s.end for s in spans)]
    codes = tuple(encodings) if encodings is not None else (0,) * len(ends[1:])
    kinds = tuple(formats) if formats is not None else (0,) * len(spans)
    _check_choices(opts, ends, codes, kinds)
    stage, mean_stage, compute = [], [], []
    for k, (s, w) in enumerate(zip(spans, kinds, strict=True)):
        codec = float(opts.decode_s[s.start, codes[k]]) + float(opts.encode_s[s.end, codes[k + 1]])
        each = [float(opts.layer_seconds[w, d, s.start:s.end].sum()) + codec for d in s.replicas]
        stage.append(max(p * t for p, t in zip(shares[k + 1], each, strict=True)))
        mean_stage.append(sum(p * t for p, t in zip(shares[k + 1], each, strict=True)))
        compute.append(each)
    transfer, mean_transfer, delay, hops = [], [], [], []
    for k, (b, e) in enumerate(zip(boundaries, codes, strict=True)):
        pairs = [(p * q, _transfer_seconds(cost, opts, b, src, dst, e),
                  0.0 if src == dst else float(cost.link_latency_s[src, dst]))
                 for src, p in zip(ends[k], shares[k], strict=True)
                 for dst, q in zip(ends[k + 1], shares[k + 1], strict=True)]
        transfer.append(max(w * t for w, t, _ in pairs))
        mean_transfer.append(sum(w * t for w, t, _ in pairs))
        delay.append(sum(w * t for w, _, t in pairs))
        hops.append(np.reshape([t[1:] for t in pairs], (len(ends[k]), len(ends[k + 1]), 2)))
    media = () if cost.media is None else tuple(
        float(t) for t in sum(
            (p * q * cost.media.hop_airtime(float(opts.link_bytes[b, e]), src, dst)
             for k, (b, e) in enumerate(zip(boundaries, codes, strict=True))
             for src, p in zip(ends[k], shares[k], strict=True)
             for dst, q in zip(ends[k + 1], shares[k + 1], strict=True)),
            np.zeros(len(cost.media.names))))
    stage_error = opts.stage_error()
    error = sum(float(opts.link_error[b, e]) for b, (src, dst), e in
                zip(boundaries, pairwise(ends), codes, strict=True) if src != dst)
    error += sum(float(stage_error[w, s.start, s.end]) for s, w in zip(spans, kinds, strict=True))
    return Schedule(
        spans=spans,
        latency_s=sum(mean_stage) + sum(mean_transfer) + sum(delay),
        latency_p50_s=median_path_latency(shares[1:-1], compute, [h[..., 0] for h in hops],
                                          [h[..., 1] for h in hops]),
        bottleneck_s=max(stage + transfer + list(media)),
        stage_seconds=tuple(stage),
        transfer_seconds=tuple(transfer),
        delay_seconds=tuple(delay),
        fits=all(np.floor(opts.stage_memory[w, d, s.start, s.end])
                 <= int(cost.node_memory_bytes[d])
                 for s, w in zip(spans, kinds, strict=True) for d in s.replicas),
        encodings=codes,
        formats=kinds,
        error_bound=error,
        medium_seconds=media,
    )


def _transfer_seconds(
    cost: CostModel, opts: Options, boundary: int, src: int, dst: int, encoding: int
) -> float:
    """How long the link from ``src`` to ``dst`` is busy with boundary ``boundary``'s
    tensors in ``encoding`` (0 if same node), with the source's encoding of the input and
    the sink's decoding of the output, and at least its airtime on shared media; its latency
    is not busy time."""
    if src == dst:
        return 0.0
    nbytes = float(opts.link_bytes[boundary, encoding])
    seconds = nbytes / float(cost.link_bytes_per_s[src, dst])
    if boundary == 0:
        seconds += float(opts.encode_s[0, encoding])
    if boundary == cost.num_layers:
        seconds += float(opts.decode_s[boundary, encoding])
    if cost.media is not None:
        seconds = max(seconds, float(cost.media.hop_airtime(nbytes, src, dst).sum()))
    return seconds


def optimize(cost: CostModel, objective: Objective, limits: SolverLimits = DEFAULT_LIMITS,
             replicate: bool = True) -> OptimizeResult:
    """The best plan for ``objective`` that fits every node's memory.

    Latency is minimized exactly; throughput maximized (bottleneck minimized) with ties
    broken by latency. Exhaustive while ``N · 2^(N-1) · (L+1)²`` is within
    :data:`EXACT_WORK_LIMIT`, else HiGHS's best within ``limits`` and its proven lower bound
    (``exact`` only when that bound meets the plan). With ``replicate``, the exhaustive
    search for throughput may run a stage on a group of nodes, groups as large as the same
    budget allows (:func:`~partition.replication.replica_groups`); ``exact`` then means
    optimal over those groups.

    Raises
    ------
    NoFeasiblePlanError
        No plan fits the nodes' memory (proven); the message names the closest plan's
        shortfall.
    PlanningError
        More than :data:`MAX_NODES` nodes, or the solver's time ran out before it found a
        plan or proved there is none.
    """
    if cost.num_nodes > MAX_NODES:
        raise PlanningError(f"{cost.num_nodes} nodes is more than the planner handles "
                            f"({MAX_NODES}); plan over a subset of them")
    tables = _Tables.build(cost)
    states = tables.stage.shape[1]
    exhaustive = _work(cost.num_nodes, states - 1) <= EXACT_WORK_LIMIT
    media = tables.airtime is not None and objective is Objective.THROUGHPUT
    wanted = replicate and objective is Objective.THROUGHPUT and cost.num_nodes > 1
    unreplicated = _unreplicated(cost, exhaustive, states) if wanted else ""
    groups = (replica_groups(cost, EXACT_WORK_LIMIT, states) if wanted and not unreplicated
              else [])
    if exhaustive and not media:
        searched = tables.replicated(cost, groups) if groups else tables
        path = _best(cost, searched, objective, searched.space())
        if path is None:
            raise NoFeasiblePlanError(
                _shortfall_message(cost, [_Space.any_order(cost.num_nodes)], None))
        best = searched.priced(cost, path)
        return OptimizeResult(best, True, objective.key(best)[0], unreplicated=unreplicated)
    spaces = ([_Space.any_order(cost.num_nodes)] if exhaustive
              else _restricted_spaces(cost, states))
    found = [p for p in (_best(cost, tables, objective, sp) for sp in spaces) if p]
    proven = 0.0
    if media:
        least = [f for f in (_least_airtime(tables, cost, sp) for sp in spaces) if f]
        found += [path for _, path in least]
        if exhaustive and least and len(cost.media.names) == 1:
            proven = least[0][0]
    warm = min(found, key=lambda p: objective.key(tables.priced(cost, p)), default=None)
    if warm is None and exhaustive:
        raise NoFeasiblePlanError(_shortfall_message(cost, spaces, None))
    graph = StateGraph(tables.stage, tables.hop, tables.index.starts, tables.index.ends,
                       cost.source, cost.sink, tables.delay, tables.airtime)
    solved = solve(graph, objective, _raw_path(warm),
                   replace(limits, relative_gap=0.0) if exhaustive else limits, proven)
    if solved.path is None:
        raise NoFeasiblePlanError(_shortfall_message(cost, spaces, limits))
    best = min((tables.priced(cost, _spans(p)) for p in (solved.path, _raw_path(warm)) if p),
               key=objective.key)
    if groups:  # one medium, exhaustive: the bisection is exact over the groups too
        searched = tables.replicated(cost, groups)
        grouped = _least_airtime(searched, cost, searched.space())
        if grouped is not None:
            best = min(best, searched.priced(cost, grouped[1]), key=objective.key)
    answer = objective.key(best)[0]
    bound = max(solved.lower_bound_s, _lower_bound(cost, tables, objective), proven)
    if exhaustive and warm is not None and not groups:
        # The search's minimax over each hop's own cost: no plan's bottleneck is smaller.
        priced = tables.priced(cost, warm)
        bound = max(bound, *priced.stage_seconds, *priced.transfer_seconds)
    bound = min(answer, bound)
    return OptimizeResult(best, bound >= answer * (1 - EXACT_TOLERANCE), bound, solver=True,
                          unreplicated=unreplicated)


def _unreplicated(cost: CostModel, exhaustive: bool, states: int) -> str:
    """Why the search for throughput cannot replicate stages here, or ``""``."""
    if cost.compression is not None and cost.compression.weights is not None:
        return "weight formats are chosen with the stages"
    if not exhaustive:
        return "the cluster and model are past the exact search's limit"
    if cost.media is not None and len(cost.media.names) > 1:
        return "more than one shared medium is declared"
    if group_work(cost.num_nodes, states - 1, 2) > EXACT_WORK_LIMIT:
        return "even pairs of nodes exceed the exact search's budget"
    return ""


def _raw_path(path: tuple[Span, ...] | None) -> tuple[tuple[int, int, int], ...] | None:
    """A search path as the solver's ``(node, from state, to state)`` stages."""
    return None if path is None else tuple((s.node, s.start, s.end) for s in path)


def _spans(path: tuple[tuple[int, int, int], ...]) -> tuple[Span, ...]:
    return tuple(Span(*stage) for stage in path)


def _work(nodes: int, layers: int) -> int:
    """Stage edges in the exhaustive state graph: the exact search's cost."""
    return nodes * 2 ** (nodes - 1) * (layers + 1) ** 2


def _check_spans(cost: CostModel, spans: tuple[Span, ...]) -> None:
    if not spans:
        raise ValueError("a plan needs at least one stage")
    position = 0
    for span in spans:
        if span.start != position or span.end <= span.start:
            raise ValueError(f"{span} does not continue the layers at {position}")
        if not all(0 <= d < cost.num_nodes for d in span.replicas):
            raise ValueError(f"{span} names no node (there are {cost.num_nodes})")
        position = span.end
    if position != cost.num_layers:
        raise ValueError(f"the stages end at layer {position}, not {cost.num_layers}")
    used = [d for s in spans for d in s.replicas]
    if len(set(used)) != len(used):
        raise ValueError("a node holds more than one stage or replica")


def _check_choices(
    opts: Options, hops: list[tuple[int, ...]], encodings: tuple[int, ...], formats: tuple[int, ...]
) -> None:
    if len(encodings) != len(hops) - 1 or len(formats) != len(hops) - 2:
        raise ValueError("give one encoding per link and one weight format per stage")
    if not all(0 <= e < len(opts.encodings) for e in encodings):
        raise ValueError(f"encodings {encodings} name no option of {opts.encodings}")
    if not all(0 <= w < len(opts.formats) for w in formats):
        raise ValueError(f"formats {formats} name no option of {opts.formats}")
    if any(e and set(src) & set(dst)
           for e, (src, dst) in zip(encodings, pairwise(hops), strict=True)):
        raise ValueError("a stage that stays on a node has no link to encode")


@dataclass(frozen=True)
class _Tables:
    """Edge costs of the state graph: ``stage[d, i, j]`` (inf unless ``i < j`` and it fits)
    and ``hop[b, a, c]``, the time a hop keeps its link busy, plus ``delay[a, c]``, the
    latency a hop adds on top of that to a request's latency (see :meth:`with_delays`), and
    each layer's fastest time for pruning. With compression the indices are state indices
    (see ``index``) and ``stage_format`` holds each stage edge's weight format. With
    replica groups (:meth:`replicated`) the node indices are virtual nodes (``members``) and
    a request's latency has its own stage and hop costs, ``mean_stage`` and ``mean_hop``.
    With shared media, ``airtime[m, v, a, c]`` is how long the hop keeps medium ``m`` busy,
    and each hop costs at least its airtime on all media together (see :meth:`with_media`)."""

    stage: np.ndarray
    hop: np.ndarray
    delay: np.ndarray
    layer_floor: np.ndarray
    index: StateIndex
    stage_format: np.ndarray | None = None
    members: tuple[tuple[int, ...], ...] | None = None
    mean_stage: np.ndarray | None = None
    mean_hop: np.ndarray | None = None
    airtime: np.ndarray | None = None

    @classmethod
    def build(cls, cost: CostModel) -> _Tables:
        delay = np.array(cost.link_latency_s, dtype=float)
        np.fill_diagonal(delay, 0.0)
        if cost.compression is not None:
            made = choice_tables(cost)
            return cls(made.stage, made.hop, delay, made.layer_floor, made.index,
                       made.stage_format).with_media(cost)
        seconds = np.asarray(cost.layer_seconds, dtype=float)
        n, layers = seconds.shape
        prefix = np.concatenate([np.zeros((n, 1)), np.cumsum(seconds, axis=1)], axis=1)
        stage = prefix[:, None, :] - prefix[:, :, None]
        upper = np.triu(np.ones((layers + 1, layers + 1), dtype=bool), k=1)
        fits = cost.node_stage_memory() <= np.asarray(cost.node_memory_bytes)[:, None, None]
        stage = np.where(upper[None] & fits, stage, np.inf)
        nbytes = np.asarray(cost.boundary_bytes, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            hop = nbytes[:, None, None] / cost.link_bytes_per_s[None]
        hop[:, np.arange(n), np.arange(n)] = 0.0
        return cls(stage, hop, delay, seconds.min(axis=0),
                   StateIndex.plain(layers)).with_media(cost)

    def with_media(self, cost: CostModel) -> _Tables:
        """The tables with each hop's airtime on ``cost``'s media (unchanged without)."""
        if cost.media is None:
            return self
        opts = Options.of(cost)
        airtime = cost.media.airtime(opts.link_bytes[self.index.layer_of,
                                                     self.index.encoding_of])
        return replace(self, hop=np.maximum(self.hop, airtime.sum(axis=0)), airtime=airtime)

    def replicated(self, cost: CostModel, groups: list[tuple[int, ...]]) -> _Tables:
        """The same graph with each of ``groups`` as one more node (not with weight formats
        to choose: every stage edge in full precision, or the nodes' own format)."""
        made: GroupTables = group_tables(cost, self.stage, self.hop, self.delay, groups,
                                         self.airtime)
        return replace(self, stage=made.stage, hop=made.hop, delay=made.mean_delay,
                       layer_floor=made.layer_floor, members=made.members,
                       mean_stage=made.mean_stage, mean_hop=made.mean_hop, stage_format=None,
                       airtime=made.airtime)

    def space(self) -> _Space:
        """The exhaustive space over these tables' nodes (virtual ones included)."""
        if self.members is None:
            return _Space.any_order(self.stage.shape[0])
        bits = np.array([sum(1 << d for d in g) for g in self.members], dtype=np.int64)
        return _Space(bits, 0, bits)

    def capped(self, limit: float) -> _Tables:
        """The same graph without any stage or hop busier than ``limit``."""
        stage, hop = self.stage <= limit, self.hop <= limit
        return replace(
            self, stage=np.where(stage, self.stage, np.inf), hop=np.where(hop, self.hop, np.inf),
            mean_stage=None if self.mean_stage is None else np.where(stage, self.mean_stage,
                                                                     np.inf),
            mean_hop=None if self.mean_hop is None else np.where(hop, self.mean_hop, np.inf),
        )

    def with_delays(self) -> _Tables:
        """The same graph with a request's latency as edge costs (for replica groups the
        expected ones): each hop also costs its latency."""
        stage = self.stage if self.mean_stage is None else self.mean_stage
        hop = self.hop if self.mean_hop is None else self.mean_hop
        return replace(self, stage=stage, hop=hop + self.delay[None],
                       delay=np.zeros_like(self.delay), mean_stage=None, mean_hop=None)

    def priced(self, cost: CostModel, path: tuple[Span, ...]) -> Schedule:
        """Price a path of :func:`_search`, whose spans run between state indices."""
        layer, code = self.index.layer_of, self.index.encoding_of
        groups = self.members or tuple((d,) for d in range(self.stage.shape[0]))
        spans = [Span(groups[s.node][0], int(layer[s.start]), int(layer[s.end]),
                      groups[s.node]) for s in path]
        encodings = [*(int(code[s.start]) for s in path), int(code[path[-1].end])]
        formats = None if self.stage_format is None else [
            int(self.stage_format[s.node, s.start, s.end]) for s in path
        ]
        return evaluate(cost, spans, encodings, formats)


class _Space(NamedTuple):
    """Which node sets a search may visit: search node ``d`` stands for the nodes ``bits[d]``
    (itself, or a replica group's members) and may be used from a set ``S`` without them,
    leading to ``S | closure[d]``; the ``retired`` nodes are never used."""

    closure: np.ndarray
    retired: int
    bits: np.ndarray

    @classmethod
    def any_order(cls, nodes: int, retired: int = 0) -> _Space:
        """The exhaustive space: using node ``d`` adds only ``d``."""
        bits = 1 << np.arange(nodes, dtype=np.int64)
        return cls(bits, retired, bits)

    @classmethod
    def in_order(cls, order: Sequence[int]) -> _Space:
        """Nodes used in one order: using a node also retires every node before it."""
        closure = np.zeros(len(order), dtype=np.int64)
        for position, node in enumerate(order):
            closure[node] = sum(1 << int(d) for d in order[: position + 1])
        return cls(closure, 0, 1 << np.arange(len(order), dtype=np.int64))


def _best(
    cost: CostModel, tables: _Tables, objective: Objective, space: _Space
) -> tuple[Span, ...] | None:
    """The best path over ``space``'s node sets (spans between state indices), if any."""
    if objective is Objective.LATENCY:
        found = _search(tables.with_delays(), cost.source, cost.sink, np.add, space)
        return None if found is None else found[1]
    found = _search(tables, cost.source, cost.sink, np.maximum, space)
    if found is None:
        return None
    capped = tables.capped(found[0] * (1 + TIE_TOLERANCE)).with_delays()
    tied = _search(capped, cost.source, cost.sink, np.add, space)
    return (tied or found)[1]


def _least_airtime(
    tables: _Tables, cost: CostModel, space: _Space
) -> tuple[float, tuple[Span, ...]] | None:
    """A throughput path when media are shared, and its bottleneck counting all media's
    airtime as one: ``min over T of max(T, f(T))``, where ``f(T)`` is the least airtime of
    a path whose stages and hops each take at most ``T`` (a shortest path; ``f`` falls as
    ``T`` grows, so ``T`` is bisected over the edge costs). With one medium this is the
    least bottleneck over ``space``; with more it bounds the chosen path's from above."""
    air = tables.airtime.sum(axis=0)
    free = np.zeros_like(tables.layer_floor)

    def least(limit: float) -> tuple[float, tuple[Span, ...]] | None:
        capped = tables.capped(limit)
        priced = replace(capped, stage=np.where(np.isfinite(capped.stage), 0.0, np.inf),
                         hop=np.where(np.isfinite(capped.hop), air, np.inf), layer_floor=free)
        return _search(priced, cost.source, cost.sink, np.add, space)

    edges = np.concatenate([tables.stage.ravel(), tables.hop.ravel()])
    limits = np.unique(edges[np.isfinite(edges)])
    low, high = 0, len(limits) - 1  # find the first limit at least its least airtime
    found = least(limits[high]) if len(limits) else None
    if found is None:
        return None
    best = (max(limits[high], found[0]), found[1])
    while low < high:
        middle = (low + high) // 2
        found = least(limits[middle])
        if found is not None and max(limits[middle], found[0]) < best[0]:
            best = (max(limits[middle], found[0]), found[1])
        if found is not None and found[0] <= limits[middle]:
            high = middle
        else:
            low = middle + 1
    # The least is at that limit or, with more airtime, at the one below it.
    found = least(limits[low - 1]) if low > 0 else None
    if found is not None and max(limits[low - 1], found[0]) < best[0]:
        best = (max(limits[low - 1], found[0]), found[1])
    return best


def _search(
    tables: _Tables, source: int, sink: int, combine: np.ufunc, space: _Space
) -> tuple[float, tuple[Span, ...]] | None:
    """The cheapest path from the source to the sink through all layers.

    ``combine`` is ``np.add`` (shortest path) or ``np.maximum`` (minimax path); all edge
    costs must be non-negative. Only the node sets of ``space`` are visited.
    """
    stage, hop, index = tables.stage, tables.hop, tables.index
    n, layers = stage.shape[0], stage.shape[1] - 1
    # rest[v]: a lower bound on what the layers after state v's boundary still add.
    rest = np.append(combine.accumulate(tables.layer_floor[::-1])[::-1], 0.0)[index.layer_of]
    # Arrivals per node set: cost, previous node (-1 at the source), previous set.
    pending: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    trail: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    best = (np.inf, -1, -1, -1)
    closure, bits = space.closure, space.bits
    for d in range(n):
        if space.retired & int(bits[d]):
            continue
        arrivals = _no_arrivals(n, layers)
        arrivals[0][d, index.starts] = hop[index.starts, source, d]
        pending[space.retired | int(closure[d])] = arrivals
    queue = list(pending)
    heapq.heapify(queue)
    while queue:
        mask = heapq.heappop(queue)
        arrive, prev_node, prev_mask = pending.pop(mask)
        arrive[combine(arrive, rest[None]) >= best[0]] = np.inf
        nodes = np.flatnonzero(np.isfinite(arrive).any(axis=1))
        if nodes.size == 0:
            continue
        done, start = _stage_edges(arrive, nodes, stage, combine)
        trail[mask] = (start, prev_node, prev_mask)
        finish = combine(done[:, index.ends], hop[index.ends][:, nodes, sink].T)
        k, e = np.unravel_index(int(finish.argmin()), finish.shape)
        if finish[k, e] < best[0]:
            best = (float(finish[k, e]), mask, int(nodes[k]), int(index.ends[e]))
        free = [d for d in range(n) if not mask & int(bits[d])]
        if not free:
            continue
        # Hop edges to every unused node: moved[k, m, j] over last node k and next node m.
        moved = combine(done[:, None, :], hop[:, nodes[:, None], free].transpose(1, 2, 0))
        came = moved.argmin(axis=0)
        reach = np.take_along_axis(moved, came[None], axis=0)[0]
        reach[combine(reach, rest[None]) >= best[0]] = np.inf
        for m in np.flatnonzero(np.isfinite(reach).any(axis=1)):
            d, better = free[m], reach[m] < np.inf
            target = mask | int(closure[d])
            if target not in pending:
                pending[target] = _no_arrivals(n, layers)
                heapq.heappush(queue, target)
            value, node_from, mask_from = pending[target]
            better &= reach[m] < value[d]
            value[d, better] = reach[m, better]
            node_from[d, better] = nodes[came[m, better]]
            mask_from[d, better] = mask
    if best[1] < 0:
        return None
    return best[0], _trace(trail, best[1], best[2], best[3])


def _no_arrivals(n: int, layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrivals at a node set before any: cost, previous node (-1 at the source), previous
    set, per (node, layer boundary)."""
    shape = (n, layers + 1)
    return np.full(shape, np.inf), np.full(shape, -1, np.int16), np.zeros(shape, np.int64)


def _stage_edges(
    arrive: np.ndarray, nodes: np.ndarray, stage: np.ndarray, combine: np.ufunc
) -> tuple[np.ndarray, np.ndarray]:
    """Run a stage from every arrival on ``nodes``: ``done[k, j]``, the best cost of having
    run layers up to ``j`` on ``nodes[k]`` (min over ``i`` of ``combine(arrive[d, i],
    stage[d, i, j])``), and ``start[d, j]``, the boundary ``i`` that achieves it."""
    rows = np.flatnonzero(np.isfinite(arrive[nodes]).any(axis=0))
    through = combine(arrive[np.ix_(nodes, rows)][:, :, None], stage[np.ix_(nodes, rows)])
    pick = through.argmin(axis=1)
    done = np.take_along_axis(through, pick[:, None, :], axis=1)[:, 0, :]
    start = np.zeros(arrive.shape, np.int16)
    start[nodes] = rows[pick]
    return done, start


def _trace(trail: dict, mask: int, node: int, end: int) -> tuple[Span, ...]:
    spans = []
    while True:
        start, prev_node, prev_mask = trail[mask]
        begin = int(start[node, end])
        spans.append(Span(node, begin, end))
        if prev_node[node, begin] < 0:
            return tuple(reversed(spans))
        mask, node, end = int(prev_mask[node, begin]), int(prev_node[node, begin]), begin


def _restricted_spaces(cost: CostModel, states: int) -> list[_Space]:
    """Spaces for the non-exhaustive search: every order of the fastest nodes (with the
    source and sink) that the exact budget allows, and the whole cluster in a few fixed
    orders (fastest first, source first, sink last, largest memory first)."""
    fastest = [int(d) for d in np.argsort(cost.layer_seconds.sum(axis=1), kind="stable")]
    by_memory = [int(d) for d in np.argsort(-np.asarray(cost.node_memory_bytes), kind="stable")]
    source_first = [cost.source, *(d for d in fastest if d != cost.source)]
    sink_last = [*(d for d in source_first if d != cost.sink), cost.sink]
    orders = dict.fromkeys(tuple(o) for o in (fastest, source_first, sink_last, by_memory))
    spaces = [_Space.in_order(o) for o in orders]
    keep = list(dict.fromkeys([cost.source, cost.sink, *fastest]))
    size = 1
    while size < len(keep) and _work(size + 1, states - 1) <= EXACT_WORK_LIMIT:
        size += 1
    retired = sum(1 << d for d in keep[size:])
    return [_Space.any_order(cost.num_nodes, retired), *spaces]


def _lower_bound(cost: CostModel, tables: _Tables, objective: Objective) -> float:
    """A bound no plan beats: the best path when nodes may be reused (but not twice in a
    row), and for the bottleneck also all work shared over all nodes at their best speeds."""
    combine = np.add if objective is Objective.LATENCY else np.maximum
    index = tables.index
    priced = tables.with_delays() if objective is Objective.LATENCY else tables
    relaxed = relax(priced.stage, priced.hop, index.starts, index.ends, cost.source, cost.sink,
                    combine).best
    if objective is Objective.LATENCY:
        return relaxed
    seconds = Options.of(cost).layer_seconds.min(axis=0)
    fastest = seconds.min(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(seconds > 0, fastest[None] / seconds, 0.0)
    # Node d's time on layer l is at least fastest[l] / speed[d], so the busiest node takes
    # at least sum(fastest) / sum(speed).
    speed = relative.max(axis=1).sum()
    shared = fastest.sum() / speed if speed > 0 else 0.0
    return float(max(relaxed, shared))


def _shortfall_message(cost: CostModel, spaces: list[_Space], limits: SolverLimits | None) -> str:
    """Say how far the plan closest to fitting is from fitting (each stage in its smallest
    weight format), and on which node: over ``spaces`` when they are exhaustive (``limits``
    is ``None``), else the solver's best from theirs within ``limits``."""
    need = Options.of(cost).stage_memory.min(axis=0)
    have = np.asarray(cost.node_memory_bytes, dtype=float)
    with np.errstate(divide="ignore"):  # a node with no memory for a stage: inf
        ratio = need / have[:, None, None]
    valid = np.triu(np.ones(need.shape[1:], dtype=bool), k=1)[None]
    layers, n = cost.num_layers, cost.num_nodes
    ratios = _Tables(np.where(valid, ratio, np.inf), np.zeros((layers + 1, n, n)),
                     np.zeros((n, n)), np.zeros(layers), StateIndex.plain(layers))
    found = [f for f in (_search(ratios, cost.source, cost.sink, np.maximum, c)
                         for c in spaces) if f is not None]
    if not found:
        return "no plan fits the nodes' memory; add memory or nodes"
    ratio_found, spans = min(found, key=lambda f: f[0])
    if limits is not None:
        graph = StateGraph(ratios.stage, ratios.hop, np.array([0]), np.array([layers]),
                           cost.source, cost.sink)
        spans = _spans(solve(graph, Objective.THROUGHPUT, _raw_path(spans), limits).path)
        ratio_found = max(ratio[s.node, s.start, s.end] for s in spans)
    if ratio_found <= 1 and cost.compression is not None:
        return ("no plan fits within the error budget: plans that fit the nodes' memory need "
                "weight formats or encodings whose errors alone add up to more than "
                f"{cost.compression.max_error:g}; raise --max-error or add memory")
    worst = max(spans, key=lambda s: ratio[s.node, s.start, s.end])
    closest = "closest one" if limits is None else "closest one found"
    return (
        f"no plan fits: the {closest} still needs "
        f"{format_bytes(need[worst.node, worst.start, worst.end])} for layers "
        f"[{worst.start}, {worst.end}) on {cost.node_names[worst.node]!r}, which has "
        f"{format_bytes(have[worst.node])}; add memory or nodes"
    )

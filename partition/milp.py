"""The optimizer's search past its exact limit, as a mixed-integer program solved by HiGHS.

The program is the optimizer's state graph (see :mod:`partition.optimizer`) without the
used-node sets: binary ``x[d, v, v']`` says node ``d`` runs the stage from state index ``v``
to ``v'`` (a layer boundary, with compression also the error spent and the encoding, so
weight formats, encodings and the error budget are modelled exactly as in the exact search),
binary ``y[v, a, c]`` says state ``v``'s tensors cross from ``a`` to ``c``. Flow constraints
chain the stages from the model's input to its output, links pair the stage ending at ``v``
with the one starting there, and each node runs at most one stage. Latency is the sum of the
chosen edges; the bottleneck is a variable ``T`` at least each node's stage time and each
link's time (each node and each state has at most one of them, so one row each suffices),
and with shared media at least each medium's busy time, the sum of the airtime of the hops
chosen (one row per medium).
Throughput then takes a second program, with at most :data:`TIE_BREAK_SHARE` of the time:
the least latency among plans within the bottleneck found (the exact search's tie-break).

Only the stages and links that fit memory and could belong to a plan better than the warm
start are variables: :mod:`partition.relaxation` bounds the best plan through each of them,
for latency with a price on using each node (Lagrange multipliers of "at most once") that
tightens the bound. HiGHS returns the best plan it found and its dual bound, a proven lower
bound on the optimum; when it proves that no plan exists, none does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import highspy
import numpy as np

from partition.errors import PlanningError
from partition.plan import Objective
from partition.relaxation import relax, relax_backward

TIE_BREAK_SHARE = 0.25
"""Most of the time limit the throughput's latency tie-break may take (its best plan is never
worse than the first program's)."""
PRICE_ROUNDS = 30
"""Subgradient steps that price the use of each node before a latency program."""
SIMPLEX_SHARE = 1 / 3
"""The share of the time limit the bottleneck program gets with simplex before an interior
point method takes over, if simplex has not solved the first LP by then."""
KEEP_SLACK = 1e-9
"""Relative slack when dropping edges no better plan can use (the warm start must stay)."""

Path = tuple[tuple[int, int, int], ...]
"""Stages as ``(node, from state, to state)`` in order."""


@dataclass(frozen=True)
class SolverLimits:
    """When HiGHS stops: after ``time_limit_s`` seconds (both programs together), or when the
    best plan is proven within ``relative_gap`` of the optimum."""

    time_limit_s: float = 30.0
    relative_gap: float = 1e-3


DEFAULT_LIMITS = SolverLimits()

class StateGraph(NamedTuple):
    """The optimizer's tables: ``stage[d, v, v']`` and ``hop[v, a, c]`` (``inf``: no edge;
    a hop's busy time), the state indices a plan may start and end at, the source and sink
    nodes, ``delay[a, c]``, the latency a hop adds to a request's latency only, and
    ``airtime[m, v, a, c]``, how long a hop keeps shared medium ``m`` busy (``None``: no
    media; a plan's bottleneck is then at least each medium's summed airtime)."""

    stage: np.ndarray
    hop: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    source: int
    sink: int
    delay: np.ndarray | None = None
    airtime: np.ndarray | None = None

    def relaxed(self) -> tuple:
        """The arguments :func:`~partition.relaxation.relax` takes: the edges (hops at their
        busy time), the start and end states, the source and the sink."""
        return self.stage, self.hop, self.starts, self.ends, self.source, self.sink

    def with_delays(self) -> StateGraph:
        """The graph whose hops also cost their latency: edge costs that sum to latency."""
        if self.delay is None:
            return self
        return self._replace(hop=self.hop + self.delay[None], delay=None)


@dataclass(frozen=True)
class Solved:
    """The best path found (``None``: proven that none exists) and a proven lower bound on
    the objective's optimum, in seconds."""

    path: Path | None
    lower_bound_s: float


def solve(graph: StateGraph, objective: Objective, warm: Path | None,
          limits: SolverLimits, proven_s: float = 0.0) -> Solved:
    """The best path for ``objective``, starting from the plan ``warm`` if one is known;
    ``proven_s`` is a lower bound on the optimum proven elsewhere (a bottleneck warm start
    that meets it needs only the latency tie-break).

    Raises
    ------
    PlanningError
        The time limit passed before any plan was found or proven impossible.
    """
    deadline = time.monotonic() + limits.time_limit_s
    bottleneck = objective is Objective.THROUGHPUT
    if not bottleneck:
        graph = graph.with_delays()
    if warm is None:
        found = _Program(graph, bottleneck=False, limit=np.inf, price=False).run(
            None, deadline, limits.relative_gap)
        if found.status == highspy.HighsModelStatus.kInfeasible:
            return Solved(None, np.inf)
        if found.path is None:
            raise PlanningError(
                f"the solver neither found a plan nor proved there is none within its time "
                f"limit of {limits.time_limit_s:g} s; plan over fewer nodes or with a coarser "
                "--granularity")
        warm = found.path
    value = _value(graph, warm, bottleneck)
    if bottleneck and value <= proven_s * (1 + KEEP_SLACK):
        best = _Outcome(highspy.HighsModelStatus.kOptimal, warm, proven_s)
    elif bottleneck:
        program = _Program(graph, bottleneck, value, price=True)
        # Simplex may stall on the bottleneck program's first LP; then an interior point
        # method solves it, for a bound at least.
        best = program.run(warm, min(deadline, time.monotonic() + SIMPLEX_SHARE
                                     * limits.time_limit_s), limits.relative_gap)
        if best.status != highspy.HighsModelStatus.kOptimal and best.lower_bound <= 0:
            best = program.run(best.path or warm, deadline, limits.relative_gap, "ipx")
    else:
        best = _Program(graph, bottleneck, value, price=True).run(warm, deadline,
                                                                  limits.relative_gap)
    path = best.path or warm
    if bottleneck and time.monotonic() < deadline:
        # Among the plans within the bottleneck found, the fastest.
        neck = _value(graph, path, True)
        capped = _capped(graph, neck).with_delays()
        tied = _Program(capped, False, _value(capped, path, False), price=True,
                        medium_cap=neck * (1 + KEEP_SLACK)).run(
            path, min(deadline, time.monotonic() + TIE_BREAK_SHARE * limits.time_limit_s),
            limits.relative_gap)
        path = tied.path or path
    return Solved(path, best.lower_bound)


def _value(graph: StateGraph, path: Path, bottleneck: bool) -> float:
    """A path's latency or bottleneck over the graph's edges (and media)."""
    items = [float(graph.hop[path[0][1], graph.source, path[0][0]])]
    for (d, v, w), after in zip(path, [*path[1:], None], strict=True):
        items.append(float(graph.stage[d, v, w]))
        items.append(float(graph.hop[w, d, after[0] if after else graph.sink]))
    if not bottleneck:
        return sum(items)
    return max(items + _medium_busy(graph, path).tolist())


def _medium_busy(graph: StateGraph, path: Path) -> np.ndarray:
    """``(M,)``: each medium's busy time along a path (empty without media)."""
    if graph.airtime is None:
        return np.zeros(0)
    busy = graph.airtime[:, path[0][1], graph.source, path[0][0]].copy()
    for (d, _, w), after in zip(path, [*path[1:], None], strict=True):
        busy += graph.airtime[:, w, d, after[0] if after else graph.sink]
    return busy


def _capped(graph: StateGraph, limit: float) -> StateGraph:
    """The graph without any edge dearer than ``limit``."""
    cap = limit * (1 + KEEP_SLACK)
    return graph._replace(stage=np.where(graph.stage <= cap, graph.stage, np.inf),
                          hop=np.where(graph.hop <= cap, graph.hop, np.inf))


class _Outcome(NamedTuple):
    status: highspy.HighsModelStatus
    path: Path | None
    lower_bound: float


class _Program:
    """One program over the graph's edges that could beat ``limit`` (``inf``: all edges);
    ``price=False`` asks only for any path (zero objective). With media the bottleneck
    covers each medium's busy time, and a latency program keeps it within ``medium_cap``."""

    def __init__(self, graph: StateGraph, bottleneck: bool, limit: float, price: bool,
                 medium_cap: float = np.inf) -> None:
        self.bottleneck = bottleneck and price
        self.medium_cap = medium_cap
        self.price = price
        self.scale = limit if price and 0 < limit < np.inf else 1.0
        combine = np.maximum if bottleneck else np.add
        keep = limit * (1 + KEEP_SLACK) if np.isfinite(limit) else np.inf
        # A latency path pays sum(penalty) less than its priced cost at most, so an edge
        # whose best priced path costs more than the limit plus that cannot beat the limit.
        penalty, self.bound = np.zeros(graph.stage.shape[0]), 0.0
        if price and not bottleneck and np.isfinite(limit):
            penalty, self.bound = _penalties(graph, limit)
        priced = graph._replace(stage=graph.stage + penalty[:, None, None])
        ahead = relax(*priced.relaxed(), combine)
        behind = relax_backward(*priced.relaxed(), combine)
        keep += penalty.sum()
        self.graph = graph
        self.stages = _stage_columns(priced, ahead.arrive, behind.arrive, combine, keep)
        self.links = _link_columns(priced, ahead.done, behind.done, combine, keep)

    def run(self, warm: Path | None, deadline: float, gap: float,
            lp_solver: str = "choose") -> _Outcome:
        """Solve until optimal within ``gap`` or ``deadline`` (``time.monotonic``), the LPs
        with HiGHS's ``lp_solver``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not len(self.stages[0]):
            empty = len(self.stages[0]) == 0
            return _Outcome(highspy.HighsModelStatus.kInfeasible if empty
                            else highspy.HighsModelStatus.kTimeLimit, None, 0.0)
        highs = highspy.Highs()
        highs.setOptionValue("output_flag", False)
        highs.setOptionValue("time_limit", remaining)
        highs.setOptionValue("mip_rel_gap", gap)
        highs.setOptionValue("mip_lp_solver", lp_solver)
        highs.setOptionValue("presolve", "off")  # HiGHS's presolve took longer than the solve
        highs.passModel(self._lp())
        if warm is not None:
            solution = highspy.HighsSolution()
            solution.col_value = self._columns_of(warm).tolist()
            highs.setSolution(solution)
        highs.run()
        status = highs.getModelStatus()
        info = highs.getInfo()
        has_solution = info.primal_solution_status == highspy.kSolutionStatusFeasible
        path = self._path(np.asarray(highs.getSolution().col_value)) if has_solution else None
        bound = info.mip_dual_bound * self.scale if self.price else 0.0
        return _Outcome(status, path, max(float(bound) if np.isfinite(bound) else 0.0,
                                          self.bound))

    def _lp(self) -> highspy.HighsLp:
        g = self.graph
        n, states = g.stage.shape[0], g.stage.shape[1]
        sd, si, sj = self.stages
        la, lv, lc = self.links
        nx, ny = len(sd), len(lv)
        at_start = np.isin(si, g.starts)
        at_end = np.isin(sj, g.ends)
        # Times in units of the warm start's value, so HiGHS's tolerances are relative.
        source_s = np.where(at_start, g.hop[si, g.source, sd], 0.0) / self.scale
        sink_s = np.where(at_end, g.hop[sj, sd, g.sink], 0.0) / self.scale
        stage_s = g.stage[sd, si, sj] / self.scale
        link_s = g.hop[lv, la, lc] / self.scale
        xs, ys = np.arange(nx), nx + np.arange(ny)
        media = self._airtime_columns(at_start, at_end)
        # Row keys (renumbered below): start, end, node once, then the bottleneck rows
        # (per node, source, sink, per state, per medium), then the balances in and out of
        # each state.
        once, per_node = 2, 2 + n
        source_row, sink_row, per_state = 2 + 2 * n, 3 + 2 * n, 4 + 2 * n
        per_medium = per_state + states
        into = per_medium + len(media)
        out_of = into + states * n
        rows = [np.zeros(at_start.sum()), np.ones(at_end.sum()), once + sd,
                into + sj[~at_end] * n + sd[~at_end], into + lv * n + la,
                out_of + si[~at_start] * n + sd[~at_start], out_of + lv * n + lc]
        cols = [xs[at_start], xs[at_end], xs, xs[~at_end], ys, xs[~at_start], ys]
        vals = [np.ones(at_start.sum()), np.ones(at_end.sum()), np.ones(nx),
                np.ones((~at_end).sum()), -np.ones(ny), np.ones((~at_start).sum()), -np.ones(ny)]
        cost = np.zeros(nx + ny + self.bottleneck)
        if self.bottleneck:
            t = nx + ny
            crossed = np.unique(lv)
            rows += [per_node + sd, np.full(at_start.sum(), source_row),
                     np.full(at_end.sum(), sink_row), per_state + lv, per_node + np.arange(n),
                     np.array([source_row, sink_row]), per_state + crossed]
            cols += [xs, xs[at_start], xs[at_end], ys, np.full(n, t), np.full(2, t),
                     np.full(len(crossed), t)]
            vals += [-stage_s, -source_s[at_start], -sink_s[at_end], -link_s, np.ones(n),
                     np.ones(2), np.ones(len(crossed))]
            cost[t] = 1.0
        for m, used in enumerate(media):  # T at least the medium's busy time, or busy <= cap
            hot = np.flatnonzero(used)
            with_t = [nx + ny] * self.bottleneck
            rows.append(np.full(len(hot) + len(with_t), per_medium + m))
            cols.append(np.append(hot, with_t))
            vals.append(np.append(-used[hot] if self.bottleneck else used[hot],
                                  [1.0] * len(with_t)))
        if self.price and not self.bottleneck:
            cost[:nx] = stage_s + source_s + sink_s
            cost[nx:] = link_s
        row = np.concatenate(rows).astype(np.int64)
        col = np.concatenate(cols).astype(np.int64)
        val = np.concatenate(vals)
        keys, row = np.unique(row, return_inverse=True)
        lower = np.select([keys < 2, keys < per_node, keys < into], [1.0, -np.inf, 0.0], 0.0)
        upper = np.select([keys < 2, keys < per_node, keys < into], [1.0, 1.0, np.inf], 0.0)
        if not self.bottleneck:  # a latency program's media rows: busy time within the cap
            capped = (keys >= per_medium) & (keys < into)
            lower[capped], upper[capped] = -np.inf, self.medium_cap / self.scale
        order = np.lexsort((col, row))
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = len(cost), len(keys)
        lp.col_cost_ = cost.tolist()
        lp.col_lower_ = [0.0] * len(cost)
        lp.col_upper_ = [1.0] * (nx + ny) + [highspy.kHighsInf] * self.bottleneck
        lp.row_lower_, lp.row_upper_ = lower.tolist(), upper.tolist()
        lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
        lp.a_matrix_.start_ = np.searchsorted(row[order], np.arange(len(keys) + 1)).tolist()
        lp.a_matrix_.index_ = col[order].tolist()
        lp.a_matrix_.value_ = val[order].tolist()
        lp.integrality_ = ([highspy.HighsVarType.kInteger] * (nx + ny)
                           + [highspy.HighsVarType.kContinuous] * self.bottleneck)
        return lp

    def _airtime_columns(self, at_start: np.ndarray, at_end: np.ndarray) -> np.ndarray:
        """``(M, columns)``: each stage's and link's airtime on each medium, in units of the
        program's scale (a stage carries its source's and sink's hop); none without media
        or when the program neither has a bottleneck nor caps the media."""
        g = self.graph
        if g.airtime is None or not (self.bottleneck or np.isfinite(self.medium_cap)):
            return np.zeros((0, len(self.stages[0]) + len(self.links[0])))
        sd, si, sj = self.stages
        la, lv, lc = self.links
        source = np.where(at_start, g.airtime[:, si, g.source, sd], 0.0)
        sink = np.where(at_end, g.airtime[:, sj, sd, g.sink], 0.0)
        return np.hstack([source + sink, g.airtime[:, lv, la, lc]]) / self.scale

    def _columns_of(self, path: Path) -> np.ndarray:
        """The program's column values for a path (the warm start)."""
        n, states = self.graph.stage.shape[0], self.graph.stage.shape[1]
        sd, si, sj = self.stages
        la, lv, lc = self.links
        values = np.zeros(len(sd) + len(lv) + self.bottleneck)
        stage_keys = (sd * states + si) * states + sj
        link_keys = (lv * n + la) * n + lc
        for (d, v, w), after in zip(path, [*path[1:], None], strict=True):
            values[_position(stage_keys, (d * states + v) * states + w)] = 1.0
            if after is not None:
                values[len(sd) + _position(link_keys, (w * n + d) * n + after[0])] = 1.0
        if self.bottleneck:
            values[-1] = _value(self.graph, path, True) / self.scale
        return values

    def _path(self, values: np.ndarray) -> Path:
        chosen = np.flatnonzero(values[: len(self.stages[0])] > 0.5)
        sd, si, sj = (a[chosen] for a in self.stages)
        order = np.argsort(si, kind="stable")
        return tuple((int(sd[k]), int(si[k]), int(sj[k])) for k in order)


def _penalties(graph: StateGraph, limit: float) -> tuple[np.ndarray, float]:
    """A price ``p[d] >= 0`` on using each node and the latency bound it proves.

    Relaxing "each node at most once" with these prices (Lagrange multipliers), the cheapest
    relaxed path with ``p[d]`` added to each stage on ``d``, less ``sum(p)``, bounds every plan
    from below. Subgradient steps raise the price of nodes that path uses twice and lower it
    for unused ones, aiming at ``limit`` (Polyak's step).
    """
    n = graph.stage.shape[0]
    penalty, best = np.zeros(n), (np.zeros(n), -np.inf)
    for _ in range(PRICE_ROUNDS):
        priced = graph._replace(stage=graph.stage + penalty[:, None, None])
        ahead = relax(*priced.relaxed(), np.add)
        behind = relax_backward(*priced.relaxed(), np.add)
        bound = ahead.best - penalty.sum()
        if bound > best[1]:
            best = (penalty.copy(), bound)
        if not np.isfinite(bound) or bound >= limit:
            break
        on_path = ahead.arrive.T[:, :, None] + priced.stage + behind.arrive.T[:, None, :]
        uses = (on_path <= ahead.best * (1 + KEEP_SLACK)).sum(axis=(1, 2))
        step = np.minimum(uses, 2) - 1.0
        if not step.any():
            break
        penalty = np.maximum(penalty + (limit - bound) / (step @ step) * step, 0.0)
    return best


def _position(keys: np.ndarray, key: int) -> int:
    """Where ``key`` is in the sorted ``keys`` (it must be there)."""
    k = int(np.searchsorted(keys, key))
    if k >= len(keys) or keys[k] != key:
        raise ValueError(f"the warm start uses an edge the program dropped ({key})")
    return k


def _stage_columns(graph: StateGraph, ahead: np.ndarray, behind: np.ndarray,
                   combine: np.ufunc, keep: float) -> tuple[np.ndarray, ...]:
    """``(node, from, to)`` of every stage edge some plan within ``keep`` could use, sorted."""
    found = []
    for d in range(graph.stage.shape[0]):
        bound = combine(combine(ahead[:, d][:, None], graph.stage[d]), behind[:, d][None, :])
        i, j = np.nonzero((bound <= keep) & (bound < np.inf))
        found.append((np.full(len(i), d), i, j))
    return tuple(np.concatenate(parts).astype(np.int64) for parts in zip(*found, strict=True))


def _link_columns(graph: StateGraph, ahead: np.ndarray, behind: np.ndarray,
                  combine: np.ufunc, keep: float) -> tuple[np.ndarray, ...]:
    """``(from node, state, to node)`` of every link between two stages that some plan within
    ``keep`` could use, sorted by state, then nodes."""
    n = graph.hop.shape[1]
    bound = combine(combine(ahead[:, :, None], graph.hop), behind[:, None, :])
    bound[:, np.arange(n), np.arange(n)] = np.inf
    bound[graph.ends] = np.inf
    v, a, c = np.nonzero((bound <= keep) & (bound < np.inf))
    return a.astype(np.int64), v.astype(np.int64), c.astype(np.int64)

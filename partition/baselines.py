"""What the usual partitioning rules would get on the same cost model, for comparison.

Each baseline is priced with :func:`~partition.optimizer.evaluate`; one that breaks a memory
limit is still reported, with ``schedule.fits`` false.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise

import networkx as nx
import numpy as np

from partition.costs import CostModel
from partition.optimizer import Schedule, Span, evaluate
from partition.plan import Objective
from partition.value_flow import INPUT, ValueFlow


@dataclass(frozen=True)
class Baseline:
    """A named rule and its schedule (``None`` when the rule cannot be applied)."""

    name: str
    description: str
    schedule: Schedule | None
    note: str = ""


def baselines(
    cost: CostModel, objective: Objective, flow: ValueFlow | None = None
) -> list[Baseline]:
    """Best single node, even layer split, parameter-balanced split, memory-weighted split,
    best two-way split and the DADS min-cut split of the layer DAG ``flow`` (the cost
    model's layers); "best" is judged by ``objective``."""
    return [
        best_single_node(cost, objective),
        even_split(cost),
        parameter_split(cost),
        memory_split(cost),
        best_two_way(cost, objective),
        dads_min_cut(cost, objective, flow),
    ]


def best_single_node(cost: CostModel, objective: Objective) -> Baseline:
    """Every layer on one node: the best node that fits, else the best one."""
    options = [evaluate(cost, [Span(d, 0, cost.num_layers)]) for d in range(cost.num_nodes)]
    schedule, note = _pick(options, objective, "no single node has enough memory")
    return Baseline("single node", "all layers on the best single node", schedule, note)


def even_split(cost: CostModel) -> Baseline:
    """Equal layer counts over the nodes in cluster order (the first ones take the extra
    layer), like DeepSpeed's ``uniform`` partition method."""
    parts = min(cost.num_nodes, cost.num_layers)
    size, extra = divmod(cost.num_layers, parts)
    edges = [0]
    for part in range(parts):
        edges.append(edges[-1] + size + (part < extra))
    return Baseline("even split", f"{parts} stages of equal layer count, nodes in cluster order",
                    evaluate(cost, _spans(range(parts), edges)))


def parameter_split(cost: CostModel) -> Baseline:
    """Contiguous stages with the largest stage's parameter bytes as small as possible,
    nodes in cluster order, like DeepSpeed's ``parameters`` partition method."""
    name, description = "parameter split", "stages balanced by parameter bytes"
    if cost.layer_param_bytes is None:
        return Baseline(name, description, None, "the cost model has no parameter sizes")
    parts = min(cost.num_nodes, cost.num_layers)
    edges = _balanced_edges(np.asarray(cost.layer_param_bytes, dtype=float), parts)
    return Baseline(name, description, evaluate(cost, _spans(range(parts), edges)))


def memory_split(cost: CostModel) -> Baseline:
    """Layer counts proportional to node memory, largest node first, like exo's ring
    memory-weighted partitioning (a node whose share rounds to no layer stays idle)."""
    memory = [int(m) for m in cost.node_memory_bytes]
    order = sorted(range(cost.num_nodes), key=lambda d: -memory[d])
    total, layers = sum(memory), cost.num_layers
    edges, running = [0], 0
    for d in order:
        running += memory[d]
        edges.append(running * layers // total)
    used = [(d, a, b) for d, (a, b) in zip(order, pairwise(edges), strict=True) if b > a]
    return Baseline("memory split", "layers in proportion to node memory, largest first",
                    evaluate(cost, [Span(d, a, b) for d, a, b in used]))


def best_two_way(cost: CostModel, objective: Objective) -> Baseline:
    """The source runs a prefix of the layers, one other node the rest (Neurosurgeon);
    the empty prefix and the empty rest are included."""
    layers, source = cost.num_layers, cost.source
    options = [evaluate(cost, [Span(source, 0, layers)])]
    for d in range(cost.num_nodes):
        if d == source:
            continue
        options.append(evaluate(cost, [Span(d, 0, layers)]))
        options.extend(
            evaluate(cost, [Span(source, 0, cut), Span(d, cut, layers)])
            for cut in range(1, layers)
        )
    schedule, note = _pick(options, objective, "no two-way split fits the nodes' memory")
    return Baseline("two-way split", "the source runs a prefix, one other node the rest",
                    schedule, note)


def dads_min_cut(cost: CostModel, objective: Objective, flow: ValueFlow | None) -> Baseline:
    """The source and one other node split the layer DAG at a minimum s-t cut, as DADS does
    ("Dynamic Adaptive DNN Surgery", Hu et al., INFOCOM 2019, light-workload mode): the cut
    minimizes the source's compute plus the other node's compute plus the transfer of every
    tensor that crosses, over all splits that never send a tensor back.

    The cut need not be a prefix of the layer order, and only a prefix runs as two stages:
    then the prefix with the smallest DADS cost is taken instead (said in the note). Each
    other node is tried; the split is priced on the cost model and the best one by
    ``objective`` is reported.
    """
    name, description = "DADS min cut", "the source and one other node split at a min cut"
    if flow is None:
        return Baseline(name, description, None, "the cost model has no layer graph")
    layers, source = cost.num_layers, cost.source
    options = [(evaluate(cost, [Span(source, 0, layers)]), "")]
    for d in range(cost.num_nodes):
        if d == source:
            continue
        cut, note = dads_cut(cost, flow, d)
        spans = [Span(source, 0, cut), Span(d, cut, layers)]
        options.append((evaluate(cost, [s for s in spans if s.end > s.start]), note))
    schedule, note = _pick([s for s, _ in options], objective, "no DADS split fits the nodes' "
                           "memory")
    mapped = next(n for s, n in options if s is schedule)
    return Baseline(name, description, schedule, "; ".join(n for n in (mapped, note) if n))


def dads_graph(cost: CostModel, flow: ValueFlow, other: int) -> nx.DiGraph:
    """DADS's cut graph between ``"source"`` (the source node's side) and ``"other"``.

    Each layer has an edge from ``"source"`` costing its time on ``other`` (cut when it runs
    there) and one to ``"other"`` costing its time on the source; each tensor read by another
    side runs from its producer (``"source"`` for an input) to a node ``("value", k)``
    costing its bytes over the link, then uncapacitated (infinite) to its readers, the model
    output counting as read on ``other``, so a tensor read by several layers is paid once.
    An uncapacitated edge from each reader back to its producer forbids a layer on
    ``other`` feeding one on the source.
    """
    seconds_here, seconds_there = cost.layer_seconds[cost.source], cost.layer_seconds[other]
    bytes_per_s = float(cost.link_bytes_per_s[cost.source, other])
    graph = nx.DiGraph()
    for layer in range(flow.num_layers):
        graph.add_edge("source", layer, capacity=float(seconds_there[layer]))
        graph.add_edge(layer, "other", capacity=float(seconds_here[layer]))
    for k, (size, made, readers) in enumerate(
        zip(flow.nbytes, flow.producers, flow.consumers, strict=True)
    ):
        maker = "source" if made == INPUT else made
        if readers:
            graph.add_edge(maker, ("value", k), capacity=size / bytes_per_s)
        for reader in readers:
            graph.add_edge(("value", k), "other" if reader == flow.num_layers else reader)
            if made != INPUT and reader != flow.num_layers:
                graph.add_edge(reader, made)
    return graph


def dads_prefix_seconds(cost: CostModel, other: int) -> np.ndarray:
    """``(L+1,)`` DADS's cost of the source running layers ``[0, k)`` and ``other`` the rest."""
    here = np.concatenate([[0.0], np.cumsum(cost.layer_seconds[cost.source])])
    there = np.concatenate([[0.0], np.cumsum(cost.layer_seconds[other][::-1])])[::-1]
    return here + there + np.asarray(cost.boundary_bytes, dtype=float) / float(
        cost.link_bytes_per_s[cost.source, other])


def dads_cut(cost: CostModel, flow: ValueFlow, other: int) -> tuple[int, str]:
    """The boundary DADS's min cut splits at toward ``other``, and a note if the cut was not
    a prefix of the layer order."""
    _, (side, _) = nx.minimum_cut(dads_graph(cost, flow, other), "source", "other")
    here = {v for v in side if isinstance(v, int)}
    if here == set(range(len(here))):
        return len(here), ""
    return int(dads_prefix_seconds(cost, other).argmin()), (
        f"the min cut toward {cost.node_names[other]} is not a prefix of the layer order; "
        "the prefix with the smallest DADS cost is used")


def _pick(options: list[Schedule], objective: Objective, none_fit: str) -> tuple[Schedule, str]:
    fitting = [s for s in options if s.fits]
    if fitting:
        return min(fitting, key=objective.key), ""
    return min(options, key=objective.key), none_fit


def _spans(nodes: Iterable[int], edges: list[int]) -> list[Span]:
    return [Span(d, a, b) for d, (a, b) in zip(nodes, pairwise(edges), strict=True)]


def _balanced_edges(weights: np.ndarray, parts: int) -> list[int]:
    """Edges of ``parts`` non-empty contiguous groups minimizing the heaviest group."""
    count = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(weights)])
    # heaviest[k, j]: the best heaviest group when layers [0, j) form k groups.
    heaviest = np.full((parts + 1, count + 1), np.inf)
    cut = np.zeros((parts + 1, count + 1), dtype=int)
    heaviest[0, 0] = 0.0
    for k in range(1, parts + 1):
        for j in range(k, count + 1):
            starts = np.arange(k - 1, j)
            options = np.maximum(heaviest[k - 1, starts], prefix[j] - prefix[starts])
            best = int(options.argmin())
            heaviest[k, j], cut[k, j] = options[best], starts[best]
    edges = [count]
    for k in range(parts, 0, -1):
        edges.append(int(cut[k, edges[-1]]))
    return edges[::-1]

"""The optimizer's numpy search against networkx on the state graph built explicitly.

States are those of :mod:`partition.optimizer`: ``("at", i, d, used)`` (boundary ``i``'s
tensors are on ``d``, which runs the next stage) and ``("ran", j, d, used)`` (``d`` just ran
a stage ending at ``j``); ``"source"`` holds the input and ``"sink"`` wants the result.
Edges are priced from scratch, as ``test_optimizer.brute_force`` prices a plan: ``busy`` is
the time an edge occupies its node or link (a hop's bytes over bandwidth), ``weight`` that
plus a hop's latency (a delay on one request only). Latency is ``nx.shortest_path_length``
over ``weight``; the throughput bottleneck is the smallest ``busy`` threshold under which
``nx.has_path`` still finds a path (binary search over the busy times), and its latency the
shortest path among the edges within it.
"""

from __future__ import annotations

import math
from itertools import combinations

import networkx as nx
import numpy as np
import pytest
from test_optimizer import RELATIVE, instances

from partition.costs import CostModel
from partition.errors import NoFeasiblePlanError
from partition.optimizer import optimize
from partition.plan import Objective


def hop(cost: CostModel, boundary: int, a: int, b: int) -> dict[str, float]:
    """A hop's edge attributes: its link's busy time, and that plus the link's latency."""
    if a == b:
        return {"busy": 0.0, "weight": 0.0}
    busy = float(cost.boundary_bytes[boundary]) / float(cost.link_bytes_per_s[a, b])
    return {"busy": busy, "weight": busy + float(cost.link_latency_s[a, b])}


def state_graph(cost: CostModel) -> nx.DiGraph:
    """Every stage that fits and every hop, as weighted edges from "source" to "sink"."""
    layers, nodes = cost.num_layers, cost.num_nodes
    memory = cost.node_stage_memory()
    graph = nx.DiGraph()
    for d in range(nodes):
        graph.add_edge("source", ("at", 0, d, frozenset()), **hop(cost, 0, cost.source, d))
    for size in range(nodes + 1):
        for used in map(frozenset, combinations(range(nodes), size)):
            for d in set(range(nodes)) - used:
                for i in range(layers):
                    for j in range(i + 1, layers + 1):
                        if memory[d, i, j] > cost.node_memory_bytes[d]:
                            continue
                        seconds = math.fsum(cost.layer_seconds[d, i:j].tolist())
                        graph.add_edge(("at", i, d, used), ("ran", j, d, used | {d}),
                                       busy=seconds, weight=seconds)
            for d in used:
                for e in set(range(nodes)) - used:
                    for j in range(1, layers):
                        graph.add_edge(("ran", j, d, used), ("at", j, e, used),
                                       **hop(cost, j, d, e))
                graph.add_edge(("ran", layers, d, used), "sink",
                               **hop(cost, layers, d, cost.sink))
    return graph


def within(graph: nx.DiGraph, threshold: float) -> nx.DiGraph:
    return nx.subgraph_view(graph, filter_edge=lambda u, v: graph[u][v]["busy"] <= threshold)


def narrowest_bottleneck(graph: nx.DiGraph) -> float:
    """The smallest busy time ``w`` such that the edges busy no longer than ``w`` still join
    "source" to "sink" (binary search over the sorted busy times)."""
    weights = sorted({w for _, _, w in graph.edges(data="busy")})
    low, high = 0, len(weights) - 1
    while low < high:
        middle = (low + high) // 2
        if nx.has_path(within(graph, weights[middle]), "source", "sink"):
            high = middle
        else:
            low = middle + 1
    return weights[low]


@pytest.mark.parametrize("seed", range(3))
def test_search_matches_networkx_on_the_explicit_state_graph(seed: int) -> None:
    checked = 0
    for cost in instances(40, 100 + seed):
        graph = state_graph(cost)
        if "sink" not in graph or not nx.has_path(graph, "source", "sink"):
            for objective in Objective:
                with pytest.raises(NoFeasiblePlanError):
                    optimize(cost, objective)
            continue
        checked += 1
        fastest = nx.shortest_path_length(graph, "source", "sink", weight="weight")
        result = optimize(cost, Objective.LATENCY).schedule
        assert result.latency_s == pytest.approx(fastest, rel=RELATIVE)

        narrowest = narrowest_bottleneck(graph)
        tied = nx.shortest_path_length(within(graph, narrowest * (1 + RELATIVE)),
                                       "source", "sink", weight="weight")
        result = optimize(cost, Objective.THROUGHPUT, replicate=False).schedule
        assert result.bottleneck_s == pytest.approx(narrowest, rel=RELATIVE)
        assert result.latency_s == pytest.approx(tied, rel=RELATIVE)
    assert checked >= 15


def test_state_graph_by_hand() -> None:
    """Two nodes, one layer: run it on the source (1 s) or ship 100 B at 100 B/s to the
    other node (1 s), run it there (0.25 s) and ship 10 B back (0.1 s)."""
    cost = CostModel(
        node_names=("a", "b"),
        layer_seconds=np.array([[1.0], [0.25]]),
        boundary_bytes=np.array([100.0, 10.0]),
        stage_memory_bytes=np.zeros((2, 2)),
        node_memory_bytes=np.array([1, 1]),
        link_bytes_per_s=np.array([[np.inf, 100.0], [100.0, np.inf]]),
        link_latency_s=np.zeros((2, 2)),
        source=0,
        sink=0,
    )
    graph = state_graph(cost)
    assert nx.shortest_path_length(graph, "source", "sink", weight="weight") == 1.0
    assert narrowest_bottleneck(graph) == 1.0
    assert not nx.has_path(within(graph, 0.5), "source", "sink")
    assert nx.shortest_path_length(graph, ("at", 0, 1, frozenset()), "sink",
                                   weight="weight") == pytest.approx(0.35)

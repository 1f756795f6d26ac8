"""The DADS min-cut baseline: its cut against every split of the layer DAG by brute force,
its mapping to a prefix of the layer order, and the optimizer never doing worse."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
from test_layer_order import random_flow
from test_optimizer import RELATIVE, random_cost

from partition.baselines import dads_cut, dads_graph, dads_min_cut, dads_prefix_seconds
from partition.costs import CostModel
from partition.errors import NoFeasiblePlanError
from partition.optimizer import Span, optimize
from partition.plan import Objective
from partition.value_flow import INPUT, ValueFlow


def flow_and_cost(rng: np.random.Generator) -> tuple[ValueFlow, CostModel]:
    """A random layer DAG and a random cost model whose boundary bytes are the DAG's."""
    layers = int(rng.integers(1, 8))
    flow = random_flow(rng, layers)
    cost = random_cost(rng, int(rng.integers(1, 5)), layers, tight=bool(rng.random() < 0.3))
    return flow, dataclasses.replace(cost, boundary_bytes=flow.boundary_bytes().astype(float))


def dads_seconds(cost: CostModel, flow: ValueFlow, other: int, here: set[int]) -> float:
    """DADS's cost, from scratch, of the source running ``here`` and ``other`` the rest."""
    compute = sum(float(cost.layer_seconds[cost.source if k in here else other, k])
                  for k in range(flow.num_layers))
    moved = sum(
        size for size, made, readers in zip(flow.nbytes, flow.producers, flow.consumers,
                                            strict=True)
        if (made == INPUT or made in here)
        and any(r == flow.num_layers or r not in here for r in readers)
    )
    return compute + moved / float(cost.link_bytes_per_s[cost.source, other])


def down_sets(flow: ValueFlow) -> list[set[int]]:
    """Every set of layers that holds the producers of its layers' inputs."""
    edges = list(flow.dag().edges)
    sets = ({k for k in range(flow.num_layers) if mask >> k & 1}
            for mask in range(1 << flow.num_layers))
    return [s for s in sets if all(a in s for a, b in edges if b in s)]


def others(cost: CostModel) -> list[int]:
    return [d for d in range(cost.num_nodes) if d != cost.source]


@pytest.mark.parametrize("seed", range(3))
def test_min_cut_is_the_cheapest_split_that_sends_nothing_back(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        flow, cost = flow_and_cost(rng)
        splits = down_sets(flow)
        for other in others(cost):
            value, (side, _) = nx.minimum_cut(dads_graph(cost, flow, other), "source", "other")
            here = {v for v in side if isinstance(v, int)}
            assert here in splits
            assert value == pytest.approx(dads_seconds(cost, flow, other, here), rel=RELATIVE)
            cheapest = min(dads_seconds(cost, flow, other, s) for s in splits)
            assert value == pytest.approx(cheapest, rel=RELATIVE)
            prefixes = dads_prefix_seconds(cost, other)
            for k, seconds in enumerate(prefixes):
                assert seconds == pytest.approx(
                    dads_seconds(cost, flow, other, set(range(k))), rel=RELATIVE)
            assert prefixes.min() >= value * (1 - RELATIVE)


@pytest.mark.parametrize("seed", range(3))
def test_cut_is_a_prefix_and_says_when_the_min_cut_was_not_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mapped = 0
    for _ in range(40):
        flow, cost = flow_and_cost(rng)
        for other in others(cost):
            cut, note = dads_cut(cost, flow, other)
            _, (side, _) = nx.minimum_cut(dads_graph(cost, flow, other), "source", "other")
            here = {v for v in side if isinstance(v, int)}
            if here == set(range(len(here))):
                assert (cut, note) == (len(here), "")
            else:
                mapped += 1
                prefixes = dads_prefix_seconds(cost, other)
                assert prefixes[cut] == prefixes.min() and "not a prefix" in note
        baseline = dads_min_cut(cost, Objective.LATENCY, flow)
        spans = baseline.schedule.spans
        assert spans[0].start == 0 and spans[-1].end == cost.num_layers
        assert len(spans) == 1 or (spans[0].node == cost.source and spans[0].end == spans[1].start)
    assert mapped


def test_a_chain_splits_where_compute_and_transfer_balance() -> None:
    # four layers in a chain; the source is slow (1 s a layer), the other node fast (0.1 s);
    # layer 1's output is small (10 B), the others large (1000 B), the link 100 B/s.
    flow = ValueFlow(4, (1000, 1000, 10, 1000, 1000), (INPUT, 0, 1, 2, 3),
                     tuple(frozenset({k}) for k in range(5)))
    cost = CostModel(
        node_names=("camera", "server"),
        layer_seconds=np.array([[1.0] * 4, [0.1] * 4]),
        boundary_bytes=flow.boundary_bytes().astype(float),
        stage_memory_bytes=np.zeros((5, 5)),
        node_memory_bytes=np.array([1, 1]),
        link_bytes_per_s=np.array([[np.inf, 100.0], [100.0, np.inf]]),
        link_latency_s=np.zeros((2, 2)),
        source=0,
        sink=1,
    )
    baseline = dads_min_cut(cost, Objective.LATENCY, flow)
    assert baseline.schedule.spans == (Span(0, 0, 2), Span(1, 2, 4))
    assert baseline.note == ""
    assert dads_min_cut(cost, Objective.LATENCY, None).schedule is None


@pytest.mark.parametrize("objective", list(Objective))
def test_optimizer_never_worse_than_a_fitting_dads_split(objective: Objective) -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        flow, cost = flow_and_cost(rng)
        schedule = dads_min_cut(cost, objective, flow).schedule
        try:
            best = optimize(cost, objective).schedule
        except NoFeasiblePlanError:
            continue
        if schedule.fits:
            assert objective.key(best)[0] <= objective.key(schedule)[0] * (1 + RELATIVE)

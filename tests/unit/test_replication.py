"""Replicated stages: the optimizer against a brute force over replica sets, the pricing by
hand, and a planner-made replicated plan through plan.json."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_optimizer import (
    RELATIVE,
    _pricers,
    choice_instances,
    random_cost,
    tiny_cost,
    units,
)

from coordinator.cli import main
from coordinator.plan_tables import stages_table
from coordinator.plot import pipeline_timeline
from coordinator.replicas import without_replicas
from partition import optimizer
from partition.cluster import parse_cluster
from partition.cost_builder import build_cost_model
from partition.costs import CostModel
from partition.errors import NoFeasiblePlanError
from partition.layers import build_layer_graph
from partition.measured import Measured
from partition.media import Media
from partition.optimizer import Span, evaluate, optimize
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule, with_predictions
from partition.profiler import profile_layers
from partition.replan_inputs import read_replan_inputs
from partition.replanning import Replanner
from partition.replication import group_work, replica_groups

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def brute_force_replicated(cost: CostModel) -> list[tuple[float, float]]:
    """(expected latency, bottleneck) of every plan that fits, each stage on a non-empty set
    of nodes no other stage uses and whose stage memory is the same (they store weights
    alike), requests dealt in proportion to 1 / each node's whole-model time; priced from
    scratch, each medium's busy time summed over every pair of every hop by its share."""
    layers, nodes = cost.num_layers, cost.num_nodes
    seconds = cost.layer_seconds.tolist()
    speed = [1.0 / math.fsum(row) for row in seconds]
    memory = cost.node_stage_memory()

    def shares(group: tuple[int, ...]) -> list[float]:
        total = math.fsum(speed[d] for d in group)
        return [speed[d] / total for d in group]

    media = cost.media

    def airtime(boundary: int, a: int, b: int) -> list[float]:
        """Each medium's airtime of sending boundary ``boundary`` from ``a`` to ``b``."""
        if media is None:
            return []
        return [media.uses[m][a][b] * cost.boundary_bytes[boundary] / media.bytes_per_s[m]
                for m in range(len(media.names))]

    def link(boundary: int, a: int, b: int) -> tuple[float, float]:
        """(busy time, latency) of sending boundary ``boundary`` from ``a`` to ``b``: at
        least its airtime on every medium together."""
        if a == b:
            return 0.0, 0.0
        return (max(cost.boundary_bytes[boundary] / cost.link_bytes_per_s[a][b],
                    math.fsum(airtime(boundary, a, b))), cost.link_latency_s[a][b])

    plans = []
    for k in range(1, min(layers, nodes) + 1):
        # Each node idle (k) or in one of the k stages' groups, every group non-empty.
        groupings = [
            tuple(tuple(d for d in range(nodes) if owner[d] == s) for s in range(k))
            for owner in itertools.product(range(k + 1), repeat=nodes)
            if all(s in owner for s in range(k))
        ]
        for cuts in itertools.combinations(range(1, layers), k - 1):
            ranges = list(itertools.pairwise((0, *cuts, layers)))
            for groups in groupings:
                if any(memory[d][a][b] > cost.node_memory_bytes[d]
                       for g, (a, b) in zip(groups, ranges, strict=True) for d in g):
                    continue
                if any(not np.array_equal(memory[g[0]], memory[d]) for g in groups for d in g):
                    continue
                ends = [(cost.source,), *groups, (cost.sink,)]
                busy, expected = [], []
                on_media = [0.0] * (0 if media is None else len(media.names))
                for g, (a, b) in zip(groups, ranges, strict=True):
                    times = [math.fsum(seconds[d][a:b]) for d in g]
                    busy.append(max(p * t for p, t in zip(shares(g), times, strict=True)))
                    expected.append(math.fsum(p * t for p, t in zip(shares(g), times,
                                                                    strict=True)))
                for h, boundary in enumerate((0, *cuts, layers)):
                    pairs = [(p * q, *link(boundary, a, b))
                             for a, p in zip(ends[h], shares(ends[h]), strict=True)
                             for b, q in zip(ends[h + 1], shares(ends[h + 1]), strict=True)]
                    busy.append(max(w * t for w, t, _ in pairs))
                    expected.append(math.fsum(w * (t + lat) for w, t, lat in pairs))
                    for a, p in zip(ends[h], shares(ends[h]), strict=True):
                        for b, q in zip(ends[h + 1], shares(ends[h + 1]), strict=True):
                            for m, air in enumerate(airtime(boundary, a, b)):
                                on_media[m] += p * q * air
                plans.append((math.fsum(expected), max(busy + on_media)))
    return plans


def groupings(cost: CostModel, k: int) -> list[tuple[tuple[int, ...], ...]]:
    """Every way to give k stages non-empty disjoint node sets whose members store a stage
    alike (the same stage memory)."""
    nodes, memory = cost.num_nodes, cost.node_stage_memory()
    found = []
    for owner in itertools.product(range(k + 1), repeat=nodes):  # k: the node is idle
        groups = tuple(tuple(d for d in range(nodes) if owner[d] == s) for s in range(k))
        if all(groups) and all(np.array_equal(memory[g[0]], memory[d])
                               for g in groups for d in g):
            found.append(groups)
    return found


def brute_force_encoded(cost: CostModel) -> list[tuple[float, float]]:
    """As :func:`brute_force_replicated` with an encoding per hop (every link of a hop in
    it; a hop with a link from a node to itself stays raw) within the error budget."""
    links, layers = cost.compression.links, cost.num_layers
    link, stage = _pricers(cost)
    speed = [1.0 / math.fsum(row) for row in cost.layer_seconds.tolist()]

    def shares(group: tuple[int, ...]) -> list[float]:
        total = math.fsum(speed[d] for d in group)
        return [speed[d] / total for d in group]

    def hop(boundary: int, e: int, senders: tuple, receivers: tuple) -> tuple | None:
        """(busy, expected time) of a hop, or None if it cannot carry encoding e."""
        nbytes, encode, decode, _ = link(boundary, e)
        busy, expected = [], []
        for a, p in zip(senders, shares(senders), strict=True):
            for b, q in zip(receivers, shares(receivers), strict=True):
                if a == b:
                    if e:
                        return None
                    busy.append(0.0)
                    continue
                if e == 0 and not links.raw:
                    return None
                t = nbytes / cost.link_bytes_per_s[a][b] + (encode if boundary == 0 else 0.0) + (
                    decode if boundary == layers else 0.0)
                busy.append(p * q * t)
                expected.append(p * q * (t + cost.link_latency_s[a][b]))
        return max(busy), math.fsum(expected)

    plans = []
    for k in range(1, min(layers, cost.num_nodes) + 1):
        for cuts, groups in itertools.product(itertools.combinations(range(1, layers), k - 1),
                                              groupings(cost, k)):
            edges = (0, *cuts, layers)
            ends = [(cost.source,), *groups, (cost.sink,)]
            if any(stage(d, a, b, 0)[1] > cost.node_memory_bytes[d]
                   for g, (a, b) in zip(groups, itertools.pairwise(edges), strict=True)
                   for d in g):
                continue
            for encs in itertools.product(range(1 + len(links.names)), repeat=k + 1):
                spent = sum(units(link(b, e)[3], cost.compression) for b, e in zip(
                    edges, encs, strict=True))
                if spent > cost.compression.budget_units and not math.isinf(
                        cost.compression.max_error):
                    continue
                hops = [hop(b, e, ends[h], ends[h + 1])
                        for h, (b, e) in enumerate(zip(edges, encs, strict=True))]
                if None in hops:
                    continue
                busy, expected = [h[0] for h in hops], [h[1] for h in hops]
                for h, (g, (a, b)) in enumerate(zip(groups, itertools.pairwise(edges),
                                                    strict=True)):
                    times = [stage(d, a, b, 0)[0] + link(a, encs[h])[2] + link(b, encs[h + 1])[1]
                             for d in g]
                    busy.append(max(p * t for p, t in zip(shares(g), times, strict=True)))
                    expected.append(math.fsum(p * t for p, t in zip(shares(g), times,
                                                                    strict=True)))
                if all(math.isfinite(x) for x in busy + expected):
                    plans.append((math.fsum(expected), max(busy)))
    return plans


@pytest.mark.parametrize("seed", range(2))
def test_replicas_with_encodings_match_brute_force(seed: int) -> None:
    """With link encodings offered (no weight formats), groups are searched too."""
    checked = replicated = 0
    for cost in choice_instances(60, 500 + seed):
        if cost.compression.weights is not None or cost.num_nodes < 3:
            continue
        plans = brute_force_encoded(cost)
        if not plans:
            with pytest.raises(NoFeasiblePlanError):
                optimize(cost, Objective.THROUGHPUT)
            continue
        checked += 1
        narrowest = min(bottleneck for _, bottleneck in plans)
        tied = min(lat for lat, neck in plans if neck <= narrowest * (1 + RELATIVE))
        result = optimize(cost, Objective.THROUGHPUT)
        assert result.exact and not result.unreplicated
        assert result.schedule.bottleneck_s == pytest.approx(narrowest, rel=RELATIVE)
        assert result.schedule.latency_s == pytest.approx(tied, rel=RELATIVE)
        assert result.schedule.error_bound <= cost.compression.max_error
        replicated += any(len(s.replicas) > 1 for s in result.schedule.spans)
    assert checked >= 5 and replicated >= 1


def small_instances(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        nodes = int(rng.integers(3, 5))
        layers = int(rng.integers(1, 5))
        yield random_cost(rng, nodes, layers, tight=bool(rng.random() < 0.5))


@pytest.mark.parametrize("seed", range(3))
def test_optimizer_matches_brute_force_over_replica_sets(seed: int) -> None:
    replicated = 0
    for cost in small_instances(30, 400 + seed):
        plans = brute_force_replicated(cost)
        if not plans:
            with pytest.raises(NoFeasiblePlanError, match="no plan fits"):
                optimize(cost, Objective.THROUGHPUT)
            continue
        narrowest = min(bottleneck for _, bottleneck in plans)
        tied = min(lat for lat, neck in plans if neck <= narrowest * (1 + RELATIVE))
        result = optimize(cost, Objective.THROUGHPUT)
        assert result.exact and result.schedule.fits and not result.unreplicated
        assert result.schedule.bottleneck_s == pytest.approx(narrowest, rel=RELATIVE)
        assert result.schedule.latency_s == pytest.approx(tied, rel=RELATIVE)
        replicated += any(len(s.replicas) > 1 for s in result.schedule.spans)
        # Latency skips groups: no dealing beats the best single-node plan's latency.
        fastest = min(latency for latency, _ in plans)
        assert optimize(cost, Objective.LATENCY).schedule.latency_s == pytest.approx(
            fastest, rel=RELATIVE)
    assert replicated >= 3


def with_one_medium(cost: CostModel, rng: np.random.Generator) -> CostModel:
    """``cost`` with one shared medium over a random half or more of its nodes, as slow as
    its links (so it matters)."""
    on = rng.random(cost.num_nodes) < 0.7
    uses = (on[:, None].astype(float) + on[None, :]) * (1 - np.eye(cost.num_nodes))
    bandwidth = float(np.median(cost.link_bytes_per_s[np.isfinite(cost.link_bytes_per_s)]))
    return replace(cost, media=Media(("air",), np.array([bandwidth * rng.uniform(0.5, 4)]),
                                     uses[None]))


@pytest.mark.parametrize("seed", range(3))
def test_with_one_shared_medium_the_optimizer_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(900 + seed)
    replicated = 0
    for cost in small_instances(25, 700 + seed):
        cost = with_one_medium(cost, rng)
        plans = brute_force_replicated(cost)
        if not plans:
            with pytest.raises(NoFeasiblePlanError, match="no plan fits"):
                optimize(cost, Objective.THROUGHPUT)
            continue
        result = optimize(cost, Objective.THROUGHPUT)
        assert result.exact and result.schedule.fits and not result.unreplicated
        assert result.schedule.bottleneck_s == pytest.approx(
            min(bottleneck for _, bottleneck in plans), rel=RELATIVE)
        replicated += any(len(s.replicas) > 1 for s in result.schedule.spans)
    assert replicated >= 2


def test_evaluate_a_replicated_stage_by_hand() -> None:
    """a takes 6 s for the model, b 3 s: b gets 2/3 of the requests. Source and sink are a;
    the link is 1000 B/s plus 0.5 s each way."""
    schedule = evaluate(tiny_cost(), [Span(0, 0, 3, (0, 1))])
    # a is busy 6 s for a third of the requests, b 3 s for two thirds: 2 s a request each.
    assert schedule.stage_seconds == pytest.approx((2.0,))
    # In: 1000 B to b for 2/3 of the requests; out: 100 B from b for 2/3 of them.
    assert schedule.transfer_seconds == pytest.approx((2 / 3, 0.1 * 2 / 3))
    assert schedule.delay_seconds == pytest.approx((0.5 * 2 / 3, 0.5 * 2 / 3))
    # A request on a takes 6 s, on b 1 + 0.5 + 3 + 0.1 + 0.5 = 5.1 s.
    assert schedule.latency_s == pytest.approx(6 / 3 + 5.1 * 2 / 3)
    assert schedule.bottleneck_s == pytest.approx(2.0)
    assert schedule.fits
    # Dealt half and half instead, a is busy 3 s a request.
    assert evaluate(tiny_cost(), [Span(0, 0, 3, (0, 1), (0.5, 0.5))]).bottleneck_s == 3.0
    too_small = CostModel(**{**tiny_cost().__dict__, "node_memory_bytes": np.array([10, 9])})
    assert not evaluate(too_small, [Span(0, 0, 3, (0, 1))]).fits


def test_a_replicated_hop_on_a_shared_medium_by_hand() -> None:
    """a and b both on one medium of 500 B/s (a transfer uses it twice): 1000 B to b for 2/3
    of the requests and 100 B back from b for 2/3; optimize then does not replicate."""
    uses = np.array([[[0, 2], [2, 0]]])
    cost = replace(tiny_cost(), media=Media(("air",), np.array([500.0]), uses))
    schedule = evaluate(cost, [Span(0, 0, 3, (0, 1))])
    # Each link's transfer takes its airtime (4 s and 0.4 s) for 2/3 of the requests.
    assert schedule.transfer_seconds == pytest.approx((4 * 2 / 3, 0.4 * 2 / 3))
    assert schedule.medium_seconds == pytest.approx((4.4 * 2 / 3,))
    assert schedule.bottleneck_s == pytest.approx(4.4 * 2 / 3)
    # Replicated, a and b would keep the medium busy 4.4 x 2/3 s a request; a alone, 0 s
    # and itself 6 s.
    best = optimize(cost, Objective.THROUGHPUT)
    assert best.exact and not best.unreplicated
    assert best.schedule.bottleneck_s == pytest.approx(4.4 * 2 / 3)
    assert [s.replicas for s in best.schedule.spans] == [(0, 1)]
    two = replace(cost, media=Media(("air", "wire"), np.array([500.0, 500.0]),
                                    np.concatenate([uses, uses])))
    assert optimize(two, Objective.THROUGHPUT).unreplicated == (
        "more than one shared medium is declared")


@pytest.mark.parametrize("spans, message", [
    ([Span(0, 0, 1, (0, 1)), Span(1, 1, 3)], "more than one stage or replica"),
    ([Span(0, 0, 3, (0, 2))], "names no node"),
])
def test_evaluate_rejects_bad_replicas(spans: list[Span], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(tiny_cost(), spans)


def test_a_span_lists_its_node_first() -> None:
    assert Span(1, 0, 3).replicas == (1,)
    with pytest.raises(ValueError, match="first"):
        Span(1, 0, 3, (0, 1))


def test_groups_shrink_to_the_work_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = random_cost(np.random.default_rng(3), 5, 4, tight=False)
    everything = replica_groups(cost, math.inf)
    assert len(everything) == 2**5 - 1 - 5
    pairs = replica_groups(cost, group_work(5, 4, 2))
    assert sorted({len(g) for g in pairs}) == [2] and len(pairs) == 10
    assert replica_groups(cost, group_work(5, 4, 1)) == []
    monkeypatch.setattr(optimizer, "EXACT_WORK_LIMIT", group_work(5, 4, 1))
    result = optimize(cost, Objective.THROUGHPUT)
    assert result.unreplicated == "even pairs of nodes exceed the exact search's budget"
    assert all(len(s.replicas) == 1 for s in result.schedule.spans)


def test_past_the_exact_limit_no_stage_is_replicated(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = tiny_cost()
    assert len(optimize(cost, Objective.THROUGHPUT).schedule.spans[0].replicas) == 2
    monkeypatch.setattr(optimizer, "EXACT_WORK_LIMIT", 0)
    result = optimize(cost, Objective.THROUGHPUT)
    assert result.solver and result.unreplicated == (
        "the cluster and model are past the exact search's limit")
    assert all(len(s.replicas) == 1 for s in result.schedule.spans)
    assert optimize(cost, Objective.THROUGHPUT, replicate=False).unreplicated == ""


def test_a_planner_made_replicated_plan_round_trips(sample_exported, tmp_path: Path) -> None:
    """ResNet on four equal nodes: the plan (never worse than without replicas, which
    ``--no-replicate`` gives and keeps for re-plans) and a plan written from a schedule that
    runs the model whole on all four, a quarter of the requests each, read back equal."""
    sample = sample_exported("resnet")
    cluster = str(EXAMPLES / "cluster-homogeneous.yaml")
    out, flat = tmp_path / "plan.json", tmp_path / "flat.json"
    for path, *options in ((out,), (flat, "--no-replicate")):
        assert main(["plan", str(sample.path), "--nodes", cluster, "-o", str(path),
                     "--repeats", "2", *options]) == 0
    plan, single = Plan.load(out), Plan.load(flat)  # the same cached profile
    assert plan.exact and not plan.unreplicated
    assert plan.throughput_per_s >= single.throughput_per_s * (1 - RELATIVE)
    assert not any(s.replicated for s in single.stages)
    assert len(single.links) == len(single.stages) + 1
    assert read_replan_inputs(single.replan).replicate is False
    assert read_replan_inputs(plan.replan).replicate is True

    inputs = read_replan_inputs(plan.replan)
    layer_graph = build_layer_graph(sample.model.program)
    cost = build_cost_model(layer_graph, inputs.cluster, inputs.profiles)
    whole = evaluate(cost, [Span(0, 0, cost.num_layers, (0, 1, 2, 3))])
    made = plan_from_schedule(sample.model, layer_graph, inputs.cluster, cost, whole,
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    (stage,) = made.stages
    assert stage.nodes == ("node-1", "node-2", "node-3", "node-4")
    assert [r.share for r in stage.replicas] == [0.25] * 4
    assert [(link.src, link.dst) for link in made.links] == [
        ("node-1", node) for node in stage.nodes] + [(node, "node-1") for node in stage.nodes]
    assert stage.compute_s == pytest.approx(whole.stage_seconds[0])
    assert (made.latency_s, made.latency_p50_s) == (whole.latency_s, whole.latency_p50_s)
    made.save(out)
    assert Plan.load(out) == made and Plan.from_dict(made.to_dict()) == made
    column = next(c for c in stages_table(made).columns if c.header == "node")
    assert list(column.cells) == ["node-1 25% + node-2 25% + node-3 25% + node-4 25%"]
    stages = {name for name, *_ in pipeline_timeline(made, 4) if name.startswith("stage")}
    assert stages == {f"stage 0 on {node}" for node in stage.nodes}

    # A running plan is priced in its own shares: node-2 twice as slow is busy twice as long.
    replanner = Replanner(replace(made, replan=plan.replan), sample.model, layer_graph)
    slowed = replanner.price(made, Measured(slowdown={"node-2": 2.0}))
    assert slowed.stage_seconds[0] == pytest.approx(2 * whole.stage_seconds[0])
    # Three quarters of the requests avoid node-2: the median path still does.
    assert slowed.latency_p50_s == pytest.approx(whole.latency_p50_s)
    assert slowed.latency_s > whole.latency_s
    left = replanner.replan({"node-1", "node-2", "node-3"})
    assert {n for s in left.stages for n in s.nodes} <= {"node-1", "node-2", "node-3"}



def test_a_plan_without_a_replica_is_priced_in_its_new_shares(sample_exported) -> None:
    """Three equal nodes run the model whole, a third of the requests each; with one left
    out the other two take half each: the stage's time per request rises by half, and
    every prediction is the schedule's of the two-node stage."""
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    cluster = parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{6000 + i}", "memory": "1GiB"}
                  for i in range(3)],
        "links": {"default": {"bandwidth": "10Gbps", "latency": "0.01ms"}},
        "source": "n0", "sink": "n0",
    }, "test")
    cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
    whole = evaluate(cost, [Span(0, 0, cost.num_layers, (0, 1, 2))])
    made = plan_from_schedule(sample.model, layer_graph, cluster, cost, whole,
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    smaller = without_replicas(made, {"n2"})
    assert smaller is not None and smaller.bottleneck_s == made.bottleneck_s  # not priced
    two = evaluate(cost, [Span(0, 0, cost.num_layers, (0, 1))])
    priced = with_predictions(smaller, two)
    assert priced.stages[0].compute_s == pytest.approx(1.5 * made.stages[0].compute_s)
    assert (priced.bottleneck_s, priced.latency_s, priced.latency_p50_s) == (
        two.bottleneck_s, two.latency_s, two.latency_p50_s)
    assert priced.stages[0].replicas == smaller.stages[0].replicas

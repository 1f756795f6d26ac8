"""The CPU a simulated cluster's plan needs from its host, and fitting it under the safe share."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from coordinator.bench import closed_loop
from coordinator.host_budget import (
    FrameCost,
    cpu_per_request,
    fit_speeds,
    hop_bytes,
    host_need,
    measure_frame_cost,
    safe_rate,
)
from coordinator.isolation import HOST_SHARE
from partition.cluster import ClusterSpec, load_cluster
from partition.cost_builder import node_profiles
from partition.layers import build_layer_graph
from partition.plan import Plan
from partition.planning import plan
from partition.profiler import profile_layers

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
COST = FrameCost(fixed_s=2e-4, per_byte_s=1e-9)


@pytest.fixture(scope="module")
def planner(sample_exported):
    """``planner(cluster)``: the ViT sample's throughput plan on ``cluster``, and each
    stage's time on this host from the same profile."""
    sample = sample_exported("vit")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=2, warmup=1)

    def plan_on(cluster: ClusterSpec) -> Plan:
        return plan(sample.model, layer_graph, cluster, node_profiles(cluster, profile, {}))

    def seconds(p: Plan) -> list[float]:
        return [sum(lp.median_s for lp in profile.layers[s.start:s.end]) for s in p.stages]

    return plan_on, seconds


def test_need_is_the_rate_times_every_stage_and_frame(planner) -> None:
    plan_on, seconds = planner
    p = plan_on(load_cluster(EXAMPLES / "cluster-homogeneous.yaml"))
    need = host_need(p, [0.01] * len(p.stages), COST, host_cores=2, rate_per_s=10.0)
    frames = [p.stages[0].bytes_in, *(s.bytes_out for s in p.stages)]
    assert hop_bytes(p) == frames
    expected = 10.0 * (0.01 * len(p.stages) + sum(2e-4 + 1e-9 * n for n in frames))
    assert need.cores == pytest.approx(expected)
    assert cpu_per_request(p, [0.01] * len(p.stages), COST) == pytest.approx(expected / 10.0)
    assert COST.scaled(1.5)(1 << 20) == pytest.approx(1.5 * COST(1 << 20))
    assert need.allowed == pytest.approx(HOST_SHARE * 2)
    assert host_need(p, seconds(p), COST, 2).rate_per_s == p.throughput_per_s


def test_the_safe_rate_needs_exactly_the_safe_share(planner) -> None:
    plan_on, seconds = planner
    p = plan_on(load_cluster(EXAMPLES / "cluster-homogeneous.yaml"))
    need = host_need(p, seconds(p), COST, host_cores=1)
    rate = safe_rate(need)
    assert rate is not None and rate < p.throughput_per_s
    assert host_need(p, seconds(p), COST, 1, rate).cores == pytest.approx(need.allowed)
    assert safe_rate(host_need(p, seconds(p), COST, host_cores=1000)) is None


def test_fit_stretches_until_the_plan_fits_and_plans_with_it(planner) -> None:
    plan_on, seconds = planner
    cluster = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    fitted, stretch, need = fit_speeds(cluster, lambda c: [plan_on(c)], seconds, COST, 1)
    assert 0 < stretch < 1 and need.fits
    assert [n.speed for n in fitted.nodes] == pytest.approx([n.speed * stretch
                                                             for n in cluster.nodes])
    refit = plan_on(fitted)
    assert host_need(refit, seconds(refit), COST, 1).cores <= need.allowed * (1 + 1e-6)
    # Not stretched more than it takes: the fitted plan uses most of the share.
    assert need.cores > 0.9 * need.allowed


def test_a_cluster_that_fits_is_left_alone(planner) -> None:
    plan_on, seconds = planner
    cluster = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    fitted, stretch, need = fit_speeds(cluster, lambda c: [plan_on(c)], seconds, COST, 1000)
    assert stretch == 1 and fitted == cluster and need.fits


def test_a_frame_costs_more_the_larger_it_is() -> None:
    cost = measure_frame_cost()
    assert cost.fixed_s > 0 and cost.per_byte_s > 0
    assert cost(1 << 20) > cost(4 << 10)


def test_a_paced_loop_starts_no_request_early() -> None:
    starts: list[float] = []

    async def send(index: int) -> None:
        starts.append(time.perf_counter())

    async def run() -> float:
        began = time.perf_counter()
        await closed_loop(10, 4, send, rate_per_s=50.0)
        return began

    began = asyncio.run(run())
    assert len(starts) == 10
    for index, started in enumerate(sorted(starts)):
        assert started - began >= index / 50.0 - 1e-3


def test_a_cluster_no_plan_fits_is_left_alone(planner) -> None:
    _, seconds = planner
    cluster = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    fitted, stretch, need = fit_speeds(cluster, lambda c: [], seconds, COST, 1)
    assert (fitted, stretch, need.cores) == (cluster, 1.0, 0.0)

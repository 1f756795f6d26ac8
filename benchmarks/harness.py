"""Shared steps of the cluster benchmarks: export a sample, plan it, run it on real workers.

Not a test: nothing here asserts on time. Scripts run as ``python benchmarks/NAME.py`` import
it as ``harness`` (Python puts the script's folder on ``sys.path``); edgesplit itself is the
installed package.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import report

from coordinator.bench import BenchResult, measure, random_inputs
from coordinator.deploy import deploy
from coordinator.host_budget import (
    HostNeed,
    calibrated_stage_seconds,
    cpu_per_request,
    fit_speeds,
    measure_frame_cost,
)
from coordinator.isolation import (
    Isolation,
    cores_wanted,
    cpu_stretch,
    host_cores,
    with_stretched_speeds,
)
from coordinator.local_cluster import LocalCluster
from coordinator.ports import free_ports
from coordinator.samples import SampleBuilder, write_sample
from partition.cluster import ClusterSpec
from partition.layers import LayerGraph, build_layer_graph
from partition.loader import LoadedModel, load_model
from partition.plan import Plan
from partition.profile_store import cached_profile
from partition.profiler import Profile
from partition.split import split


@dataclass
class Sample:
    """An exported sample model, its layers, and its profile on this machine."""

    model: LoadedModel
    layer_graph: LayerGraph
    profile: Profile


def prepare(builder: SampleBuilder, folder: Path, name: str, granularity: str = "auto") -> Sample:
    """Export ``builder``'s model to ``folder/name.pt2`` and profile it (1 thread), afresh:
    a cached profile may have been timed on a busier machine (ResNet's, timed while other
    work ran, was 15% slow) and the workers time their stages now."""
    path = write_sample(builder, folder / f"{name}.pt2")
    model = load_model(path)
    layer_graph = build_layer_graph(model.program, granularity)
    profile, _ = cached_profile(model, layer_graph, threads=1, repeats=20, refresh=True)
    return Sample(model, layer_graph, profile)


def with_free_ports(cluster: ClusterSpec) -> ClusterSpec:
    """The same cluster on ports nothing listens on now."""
    ports = free_ports(len(cluster.nodes))
    nodes = tuple(
        replace(node, address=f"127.0.0.1:{port}")
        for node, port in zip(cluster.nodes, ports, strict=True)
    )
    return replace(cluster, nodes=nodes)


def fitted(cluster: ClusterSpec, isolation: Isolation, sample: Sample,
           plans_for: Callable[[ClusterSpec], list[Plan]], cpu_factor: float = 1.0) -> ClusterSpec:
    """``cluster`` as :func:`run_plans` should run it with ``isolation``: with kernel
    isolation, its speeds stretched so the CPU quotas fit this host; with either, stretched
    further until the neediest of ``plans_for(cluster)`` needs at most the host's safe share
    of CPU at its predicted throughput (see :mod:`coordinator.host_budget`), counting
    ``cpu_factor`` times the CPU :func:`counted_cpu` does. Plan with it, so predictions
    match; says so in one line when it stretches."""
    cores = host_cores()
    declared = 1.0
    if isolation is Isolation.KERNEL:
        declared = cpu_stretch(cores_wanted(cluster), cores)
        cluster = with_stretched_speeds(cluster, declared)
    fit, stretch, need = fit_speeds(
        cluster, plans_for, lambda p: [cpu_factor * s for s in stage_seconds(p, sample.profile)],
        measure_frame_cost().scaled(cpu_factor), cores)
    if declared * stretch < 1:
        print(f"speeds stretched by {declared * stretch:.3g} to fit this host: {need.describe()}"
              + ("" if need.fits else ", still above it"))
    return fit


def stage_seconds(plan: Plan, profile: Profile) -> list[float]:
    """Each stage's real compute time per request on this host, from its layers' times in
    ``profile`` (a replicated stage's replicas share its requests, so it counts once)."""
    return [sum(layer.median_s for layer in profile.layers[s.start:s.end]) for s in plan.stages]


def counted_cpu(plan: Plan, sample: Sample) -> float:
    """The host CPU seconds per request :func:`fitted` counts for ``plan``."""
    return cpu_per_request(plan, stage_seconds(plan, sample.profile), measure_frame_cost())


def measured_cpu(result: BenchResult) -> float:
    """The host CPU seconds per request a run took, all processes counted (on a quiet
    machine, the cluster's and the client's)."""
    return result.host_cpu * host_cores() * result.elapsed_s / result.requests


def measured_need(plan: Plan, result: BenchResult) -> HostNeed:
    """The cores ``plan`` would need at its predicted rate, at the CPU per request ``result``
    took."""
    return HostNeed(plan.throughput_per_s, plan.throughput_per_s * measured_cpu(result),
                    host_cores())


@dataclass(frozen=True)
class Ran:
    """A plan's measurement, and each stage's real time as its nodes timed it when they
    loaded it (what their emulated speeds stretched; the plan predicted from the profile)."""

    result: BenchResult
    calibrated_s: list[float]


def run_plans(
    cluster: ClusterSpec, plans: list[Plan], layer_graph: LayerGraph, *, emulate: bool,
    requests: int, concurrency: int, isolation: Isolation = Isolation.NONE,
) -> list[Ran]:
    """Start ``cluster`` as real workers here (with ``isolation``), then deploy and measure
    each plan in turn."""
    state = Path(tempfile.mkdtemp(prefix="edgesplit-bench-"))
    ran = []
    with LocalCluster(cluster, state, isolation=isolation):
        for plan in plans:
            asyncio.run(deploy(plan, split(plan, layer_graph), emulate_links=emulate))
            calibrated = asyncio.run(calibrated_stage_seconds(plan))
            ran.append(Ran(asyncio.run(measure(
                plan, random_inputs(plan.inputs), requests=requests, concurrency=concurrency,
            )), calibrated))
    return ran


def machine() -> str:
    """One line naming the machine and how busy it is, for the usual output's first line."""
    return f"{report.machine()}, load average {os.getloadavg()[0]:.1f}"

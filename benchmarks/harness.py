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


CALIBRATION_TOLERANCE = 0.10
"""How far a node's timing of its stage may be off the profile's before :func:`run_plans`
deploys the plan again (once): a burst of other work on the host while a node timed its
stage, which its emulated speed would stretch for the whole run."""

CALIBRATION_FLOOR_S = 0.002
"""Stages shorter than this are not checked (a few layers' share of a profile is noisy)."""


@dataclass(frozen=True)
class Ran:
    """A plan's measurement, and each stage's real time as its nodes timed it when they
    loaded it (what their emulated speeds stretched; the plan predicted from the profile);
    ``first_calibrated_s``, the timing of a first deploy that was off the profile."""

    result: BenchResult
    calibrated_s: list[float]
    first_calibrated_s: list[float] | None = None


def calibration_off(calibrated: list[float], profiled: list[float]) -> str | None:
    """Which stage a node timed more than :data:`CALIBRATION_TOLERANCE` off its profile
    (none of those under :data:`CALIBRATION_FLOOR_S`), in words; ``None`` if none.

    >>> calibration_off([0.012, 0.0011], [0.010, 0.0005])
    'stage 0 timed 12.0 ms, profiled 10.0 ms'
    >>> calibration_off([0.0105, 0.0011], [0.010, 0.0005]) is None
    True
    """
    for k, (timed, profile) in enumerate(zip(calibrated, profiled, strict=True)):
        if profile >= CALIBRATION_FLOOR_S and abs(timed / profile - 1) > CALIBRATION_TOLERANCE:
            return f"stage {k} timed {timed * 1e3:.1f} ms, profiled {profile * 1e3:.1f} ms"
    return None


def run_plans(
    cluster: ClusterSpec, plans: list[Plan], layer_graph: LayerGraph, *, emulate: bool,
    requests: int, concurrency: int, isolation: Isolation = Isolation.NONE,
    profile: Profile | None = None,
) -> list[Ran]:
    """Start ``cluster`` as real workers here (with ``isolation``), then deploy and measure
    each plan in turn. With ``profile`` (and no kernel isolation, under which nodes time
    their stages under their CPU quotas), a plan whose nodes timed a stage off its profile
    (:func:`calibration_off`) is deployed again, once, saying so in one line."""
    state = Path(tempfile.mkdtemp(prefix="edgesplit-bench-"))
    ran = []
    with LocalCluster(cluster, state, isolation=isolation):
        for plan in plans:
            artifacts = split(plan, layer_graph)
            asyncio.run(deploy(plan, artifacts, emulate_links=emulate))
            calibrated = asyncio.run(calibrated_stage_seconds(plan))
            first = None
            checked = profile is not None and isolation is Isolation.NONE
            profiled = stage_seconds(plan, profile) if checked else []
            off = calibration_off(calibrated, profiled) if checked else None
            if off is not None:
                first = calibrated
                asyncio.run(deploy(plan, artifacts, emulate_links=emulate))
                calibrated = asyncio.run(calibrated_stage_seconds(plan))
                print(f"{' '.join('+'.join(s.nodes) for s in plan.stages)}: {off}, more than "
                      f"{CALIBRATION_TOLERANCE:.0%} apart; deployed again: "
                      f"{calibration_off(calibrated, profiled) or 'within'}")
            ran.append(Ran(asyncio.run(measure(
                plan, random_inputs(plan.inputs), requests=requests, concurrency=concurrency,
            )), calibrated, first))
    return ran


def machine() -> str:
    """One line naming the machine and how busy it is, for the usual output's first line."""
    return f"{report.machine()}, load average {os.getloadavg()[0]:.1f}"

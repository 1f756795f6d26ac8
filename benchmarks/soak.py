"""Soak: requests through the demo's model and cluster while a worker is killed and
restarted every 20 s; every answer is checked against the single-process model.

The demo's GPT-2 sample is planned for throughput over ``examples/cluster-heterogeneous.yaml``
(on free ports), deployed to real ``edge-node`` processes with emulated speeds and links,
and 10,000 requests run with 8 in flight. Every ``--kill-every`` seconds the node of a stage
of the current plan (in turn) gets SIGKILL and is started again at once; the pipeline
re-plans around it and moves back when it returns. Prints what was sent, answered, failed,
duplicated and mismatched, latency in steady state and around failures, detection and
recovery times, and each process's peak RSS.

    .venv/bin/python benchmarks/soak.py [--requests 10000] [--kill-every 20] [--json FILE]
    .venv/bin/python benchmarks/soak.py --quick          # 1,500 requests, a kill every 10 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
import report

from coordinator.bench import random_inputs
from coordinator.bench_check import CheckedRun, Reference, run_checked
from coordinator.demo_command import DEMO_MODEL, bundled_cluster
from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster, LocalNode
from coordinator.pipeline import Pipeline
from coordinator.recovery import PlanRecovery
from partition.artifact import ProgramRunner
from partition.cluster import load_cluster
from partition.cost_builder import node_profiles
from partition.plan import Objective
from partition.planning import plan
from partition.split import split

IN_FLIGHT = 8
RSS_WINDOW = 1000
"""Requests at the start and at the end whose coordinator RSS is compared."""


@dataclass
class Kill:
    """One kill: when (seconds into the run), which node, and how the pipeline took it."""

    at_s: float
    node: str
    detection_s: float | None = None
    recovery_s: float | None = None


@dataclass
class Soak:
    kills: list[Kill] = field(default_factory=list)
    rss_mib: dict[str, list[float]] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)


def rss_mib(pid: int, field_name: str = "VmRSS") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def note_peaks(soak: Soak, local: LocalCluster) -> None:
    """Each process's peak RSS so far (a killed worker's last reading stays)."""
    for name, pid in [("coordinator", os.getpid())] + [(n.name, n.pid) for n in local.nodes]:
        peak = rss_mib(pid, "VmHWM")
        if peak is not None:
            soak.peak_rss_mib[name] = max(peak, soak.peak_rss_mib.get(name, 0.0))


async def chaos(pipeline: Pipeline, local: LocalCluster, soak: Soak, every_s: float,
                started: float) -> None:
    """Every ``every_s``: SIGKILL the node of the next stage of the current plan, start it
    again, and let the pipeline re-plan around it and back."""
    turn = 0
    while True:
        await asyncio.sleep(every_s)
        stages = pipeline.plan.stages
        name = stages[turn % len(stages)].node
        turn += 1
        node: LocalNode = next(n for n in local.nodes if n.name == name)
        note_peaks(soak, local)
        soak.kills.append(Kill(time.perf_counter() - started, name))
        print(f"  {soak.kills[-1].at_s:6.1f} s: SIGKILL {name}", flush=True)
        os.kill(node.pid, signal.SIGKILL)
        await asyncio.to_thread(local.restart, name)


def summarize(run: CheckedRun, soak: Soak, replans: list[dict]) -> dict:
    """Latency in steady state and within 10 s of a kill; each kill's detection/recovery."""
    for kill in soak.kills:  # its re-plan: the node declared dead, or back without a stage
        lost = [r for r in replans if r["at_s"] >= kill.at_s and r["cause"] in (
            f"node {kill.node} lost", f"node {kill.node} lost its stage")]
        if lost:
            dead = lost[0]["cause"] == f"node {kill.node} lost"
            kill.detection_s = lost[0]["detection_s"] if dead else None
            kill.recovery_s = lost[0]["recovery_s"]
    sent_at = [done - latency for done, latency in zip(run.finished_at, run.latencies_s,
                                                        strict=True)]
    near = [any(k.at_s <= t <= k.at_s + 10 for k in soak.kills) for t in sent_at]
    steady = [lat for lat, n in zip(run.latencies_s, near, strict=True) if not n]
    around = [lat for lat, n in zip(run.latencies_s, near, strict=True) if n]
    detections = [k.detection_s for k in soak.kills if k.detection_s is not None]
    recoveries = [k.recovery_s for k in soak.kills if k.recovery_s is not None]
    rss = soak.rss_mib["coordinator"] or [0.0]
    first, last = rss[0], rss[-1]
    return {
        "sent": run.requests, "answered": run.answered, "failed": run.failed,
        "duplicated": run.duplicates, "mismatched": run.mismatches,
        "late_answers_dropped": run.late_answers, "elapsed_s": run.elapsed_s,
        "throughput_per_s": run.throughput_per_s,
        "steady_p50_s": run.percentile(0.5, steady), "steady_p99_s": run.percentile(0.99, steady),
        "failure_p50_s": run.percentile(0.5, around), "failure_p99_s": run.percentile(0.99, around),
        "kills": [vars(k) for k in soak.kills], "replans": replans,
        "detection_max_s": max(detections, default=None),
        "detection_median_s": statistics.median(detections) if detections else None,
        "recovery_max_s": max(recoveries, default=None),
        "recovery_median_s": statistics.median(recoveries) if recoveries else None,
        "coordinator_rss_first_mib": first, "coordinator_rss_last_mib": last,
        "peak_rss_mib": soak.peak_rss_mib, "errors": run.errors,
    }


def table_lines(s: dict) -> list[str]:
    """The soak's figures as the lines of one table."""
    def sec(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"sent {s['sent']}, answered {s['answered']}, failed {s['failed']}, duplicated "
        f"{s['duplicated']}, mismatched {s['mismatched']} (late answers dropped "
        f"{s['late_answers_dropped']}); {s['throughput_per_s']:.1f} req/s over "
        f"{s['elapsed_s']:.0f} s",
        "latency ms        p50      p99",
        f"steady state  {s['steady_p50_s'] * 1e3:7.1f}  {s['steady_p99_s'] * 1e3:7.1f}",
        f"near a kill   {s['failure_p50_s'] * 1e3:7.1f}  {s['failure_p99_s'] * 1e3:7.1f}",
        "kill at s  node        detection s  recovery s",
    ]
    lines += [f"{kill['at_s']:9.1f}  {kill['node']:<10}  {sec(kill['detection_s']):>11}  "
              f"{sec(kill['recovery_s']):>10}" for kill in s["kills"]]
    return [
        *lines,
        f"detection: median {sec(s['detection_median_s'])} s, max "
        f"{sec(s['detection_max_s'])} s; recovery (kill to first answer after the switch): "
        f"median {sec(s['recovery_median_s'])} s, max {sec(s['recovery_max_s'])} s",
        f"coordinator RSS: {s['coordinator_rss_first_mib']:.0f} MiB after the first "
        f"{RSS_WINDOW} requests, {s['coordinator_rss_last_mib']:.0f} MiB at the end",
        "peak RSS MiB: "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in s["peak_rss_mib"].items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--kill-every", type=float, default=20.0, metavar="SECONDS")
    parser.add_argument("--quick", action="store_true", help="1,500 requests, a kill every 10 s")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--log", type=Path, help="write the coordinator's log (INFO) to FILE")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(filename=args.log, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.requests, args.kill_every = 1500, 10.0
    with report.usual_output(args.markdown):
        summary = soak_run(args)
    lines = table_lines(summary)
    print(report.markdown(lines) if args.markdown else "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def soak_run(args: argparse.Namespace) -> dict:
    """Run the soak; its summary."""
    print(f"machine: {harness.machine()}")
    folder = Path(tempfile.mkdtemp(prefix="edgesplit-soak-"))
    sample = harness.prepare(DEMO_MODEL, folder, "gpt2")
    cluster = harness.with_free_ports(load_cluster(bundled_cluster()))
    made = plan(sample.model, sample.layer_graph, cluster,
                node_profiles(cluster, sample.profile, {}), Objective.THROUGHPUT)
    print("plan: " + " ".join(f"{s.node}[{s.start},{s.end})" for s in made.stages))
    reference = Reference(ProgramRunner(sample.model.program), random_inputs(made.inputs),
                          [s.name for s in made.inputs])
    soak = Soak(rss_mib={"coordinator": []})
    with LocalCluster(cluster, folder / "cluster") as local:
        asyncio.run(deploy(made, split(made, sample.layer_graph), emulate_links=True))
        recovery = PlanRecovery(made)

        async def go() -> tuple[CheckedRun, list[dict]]:
            async with await Pipeline.connect(made, window=IN_FLIGHT, recovery=recovery,
                                              emulate_links=True) as pipeline:
                await pipeline.prepared()
                started = time.perf_counter()
                chaos_task = asyncio.create_task(
                    chaos(pipeline, local, soak, args.kill_every, started))

                def progress(answered: int) -> None:
                    if answered in (RSS_WINDOW, args.requests - RSS_WINDOW, args.requests):
                        soak.rss_mib["coordinator"].append(rss_mib(os.getpid()) or 0.0)
                    if answered % 500 == 0:
                        print(f"  {time.perf_counter() - started:6.1f} s: {answered} answered",
                              flush=True)

                try:
                    result = await run_checked(pipeline, reference, requests=args.requests,
                                               concurrency=IN_FLIGHT, progress=progress)
                finally:
                    chaos_task.cancel()
                return result, [r.to_dict() for r in pipeline.replans]

        result, replans = asyncio.run(go())
        note_peaks(soak, local)
    return summarize(result, soak, replans)


if __name__ == "__main__":
    main()

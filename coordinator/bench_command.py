"""``coordinator bench``: measured latency and throughput beside the plan's prediction."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
from collections import Counter
from pathlib import Path

from rich.table import Table

from coordinator.bench import BENCH_CONCURRENCY, BenchResult, measure, random_inputs
from coordinator.bench_check import CheckedRun, Reference, run_checked
from coordinator.console import console, ms
from coordinator.deploy import deploy
from coordinator.deploy_command import (
    add_deploy_arguments,
    add_failover_arguments,
    emulate_links,
    ensure_deployed,
)
from coordinator.events import events_path_for, stage_names
from coordinator.host_budget import deployed_need, safe_rate
from coordinator.host_cpu import host_cpu_line
from coordinator.pipeline import Pipeline
from coordinator.verify import Difference, verify
from partition.artifact import ProgramRunner
from partition.errors import EdgesplitError
from partition.plan import Plan
from partition.planning import baseline_plan
from partition.split import plan_layer_graph, plan_model, split, stage_artifacts


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure a deployed plan against its prediction")
    add_deploy_arguments(parser)
    parser.add_argument("-n", "--requests", type=int, default=200, help="requests (default 200)")
    parser.add_argument("-c", "--concurrency", type=int, default=BENCH_CONCURRENCY,
                        help=f"in flight (default {BENCH_CONCURRENCY})")
    parser.add_argument("--baselines", action="store_true",
                        help="also deploy and measure every baseline that fits")
    parser.add_argument(
        "--verify-fraction", type=_fraction, default=0.0, metavar="F",
        help="recompute a random fraction F of the requests here, stage by stage, and name "
             "any stage whose node answers differently (default 0)",
    )
    parser.add_argument("--check", action="store_true",
                        help="compare every output with the single-process model's")
    parser.add_argument("--json", metavar="FILE",
                        help="write requests, answered, failed, duplicates, mismatches, "
                             "re-plans, throughput and latency percentiles to FILE")
    add_failover_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.baselines and (args.check or args.json):
        raise EdgesplitError("--baselines measures throughput against the prediction; "
                             "run it without --check and --json")
    plan = Plan.load(args.plan)
    ensure_deployed(plan, args)
    if args.check or args.json:
        status = _run_checked(plan, args)
    else:
        ours = _measure(plan, args)
        console.print(prediction_table(plan, ours))
        console.print(host_cpu_line(ours.host_cpu))
        status = 0
    differences = _verify(plan, args) if args.verify_fraction > 0 else []
    if args.baselines:  # last: it leaves the nodes holding a baseline
        _measure_baselines(plan, args, ours)
    return status or (1 if differences else 0)


def _measure_baselines(plan: Plan, args: argparse.Namespace, ours: BenchResult) -> None:
    """Deploy and measure each baseline that fits, beside ``ours``."""
    rows = [("edgesplit", plan, ours)]
    layer_graph = plan_layer_graph(plan, args.model)
    emulate = emulate_links(plan, args)
    for baseline in plan.baselines:
        if not baseline.fits or not baseline.stages:
            continue
        other = baseline_plan(plan, baseline, layer_graph)
        with console.status(f"deploying the {baseline.name} baseline"):
            asyncio.run(deploy(other, split(other, layer_graph), emulate_links=emulate))
        rows.append((baseline.name, other, _measure(other, args)))
    console.print(baselines_measured_table(rows))
    console.print("the nodes now hold the last baseline; `run`/`bench` redeploy the plan")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _verify(plan: Plan, args: argparse.Namespace) -> list[Difference]:
    """Verify a random ``--verify-fraction`` of the measured requests and report the
    stages that differ; the differences found."""
    count = max(1, round(args.verify_fraction * args.requests))
    chosen = sorted(random.sample(range(args.requests), min(count, args.requests)))
    with console.status(f"recomputing {len(chosen)} request(s) here, stage by stage"):
        artifacts = stage_artifacts(plan, args.model)
        differences = asyncio.run(verify(plan, artifacts, random_inputs(plan.inputs), chosen))
    if not differences:
        console.print(f"verified {len(chosen)} request(s) stage by stage: every stage agrees")
    for stage, node, what, requests in _grouped(differences):
        address = (", ".join(r.address for r in plan.stages[stage].replicas)
                   if 0 <= stage < len(plan.stages) else "?")
        console.print(f"stage {stage} on node {node!r} ({address}) {what}, in "
                      f"{requests} of {len(chosen)} verified request(s)", markup=False)
    return differences


def _grouped(differences: list[Difference]) -> list[tuple[int, str, str, int]]:
    """(stage, node, what, how many requests), in the order first seen."""
    counts = Counter((d.stage, d.node, d.what) for d in differences)
    return [(stage, node, what, n) for (stage, node, what), n in counts.items()]


def offered_rate(plan: Plan) -> float | None:
    """The requests a second to offer ``plan`` so this host's share of its work stays within
    the safe share of its cores (``None``: as many as it takes); says so when it lowers it."""
    need = asyncio.run(deployed_need(plan))
    rate = safe_rate(need)
    if rate is not None:
        console.print(f"offered load lowered to {rate:.1f} req/s, or the host's CPU would "
                      f"bound the figures: {need.describe()}")
    return rate


def _measure(plan: Plan, args: argparse.Namespace) -> BenchResult:
    rate = offered_rate(plan)
    with console.status(f"{args.requests} requests, {args.concurrency} in flight"):
        return asyncio.run(measure(
            plan, random_inputs(plan.inputs), requests=args.requests,
            concurrency=args.concurrency, rebalance=args.rebalance, rate_per_s=rate,
        ))


def _run_checked(plan: Plan, args: argparse.Namespace) -> int:
    """Every request counted (and with ``--check`` compared); a table, and ``--json``."""
    runner = ProgramRunner(plan_model(plan, args.model)[0].program) if args.check else None
    reference = Reference(runner, random_inputs(plan.inputs), [s.name for s in plan.inputs])
    rate = offered_rate(plan)

    async def go() -> CheckedRun:
        async with await Pipeline.connect(
            plan, window=max(args.concurrency, 1), rebalance=args.rebalance,
            deadline_s=args.deadline, emulate_links=emulate_links(plan, args),
            events_path=events_path_for(args.plan),
        ) as pipeline:
            return await run_checked(pipeline, reference, requests=args.requests,
                                     concurrency=args.concurrency, rate_per_s=rate)

    with console.status(f"{args.requests} requests, {args.concurrency} in flight"):
        result = asyncio.run(go())
    console.print(checked_table(result, args.check,
                                plan.latency_under_load(args.concurrency, rate)))
    console.print(host_cpu_line(result.host_cpu))
    for replan in result.replans:
        console.print(replan_line(replan))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 1 if result.failed or result.mismatches or result.duplicates else 0


def checked_table(result: CheckedRun, checked: bool, predicted_p50_s: float) -> Table:
    """What happened to every request of a run, and its median latency beside the plan's
    prediction for as many requests in flight."""
    table = Table(title=f"{result.requests} requests" + (", every output checked against "
                                                          "the single-process model"
                                                          if checked else ""))
    for column in ("answered", "failed", "duplicates", "mismatches", "re-plans",
                   "req/s", "p50 ms", "predicted p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row(str(result.answered), str(result.failed), str(result.duplicates),
                  str(result.mismatches) if checked else "-", str(len(result.replans)),
                  f"{result.throughput_per_s:.1f}", ms(result.percentile(0.5)),
                  ms(predicted_p50_s), ms(result.percentile(0.99)))
    return table


def replan_line(replan: dict) -> str:
    """One re-plan as one line: when, why, old -> new stages, and its costs."""
    recovery = replan["recovery_s"]
    return (f"at {replan['at_s']:.1f} s, {replan['cause']}: {' '.join(replan['old_stages'])} "
            f"-> {' '.join(replan['new_stages'])}; paused {replan['pause_s']:.2f} s, "
            f"moved {replan['moved_bytes']} B, replayed {replan['replayed']}"
            + (f", recovered in {recovery:.2f} s" if recovery is not None else ""))


def _error(measured: float, predicted: float) -> str:
    return f"{(measured - predicted) / predicted:+.1%}"


def prediction_table(plan: Plan, result: BenchResult) -> Table:
    """Measured latency (one request alone, and p50 with the run's requests in flight)
    and throughput beside the plan's prediction: each p50 beside the median over the paths
    requests take (``Plan.latency_p50_s``), the p95 beside the mean (``latency_s``)."""
    table = Table(title=f"measured vs predicted ({result.requests} requests, "
                        f"{result.concurrency} in flight)")
    for column in ("metric", "measured", "predicted", "error"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    table.add_row("latency p50 ms, 1 in flight", ms(result.latency_p50_s),
                  ms(plan.latency_p50_s), _error(result.latency_p50_s, plan.latency_p50_s))
    table.add_row("latency p95 ms, 1 in flight", ms(result.latency_p95_s), ms(plan.latency_s),
                  _error(result.latency_p95_s, plan.latency_s))
    throughput, loaded = result.predicted(plan)
    table.add_row(f"latency p50 ms, {result.concurrency} in flight",
                  ms(result.loaded_latency_p50_s), ms(loaded),
                  _error(result.loaded_latency_p50_s, loaded))
    table.add_row("throughput req/s", f"{result.throughput_per_s:.1f}", f"{throughput:.1f}",
                  _error(result.throughput_per_s, throughput))
    return table


def baselines_measured_table(rows: list[tuple[str, Plan, BenchResult]]) -> Table:
    """Each strategy measured on the same cluster, and our plan's measured ratio to it."""
    ours = rows[0][2]
    table = Table(title="measured on the same cluster")
    for column in ("strategy", "stages", "latency p50 ms", "throughput req/s",
                   "predicted req/s", "ours / it", "host CPU"):
        table.add_column(column, justify="left" if column in ("strategy", "stages") else "right")
    for name, plan, result in rows:
        table.add_row(
            name, " ".join(stage_names(plan.stages)),
            ms(result.latency_p50_s), f"{result.throughput_per_s:.1f}",
            f"{result.predicted(plan)[0]:.1f}",
            f"{ours.throughput_per_s / result.throughput_per_s:.2f}x", f"{result.host_cpu:.0%}",
        )
    return table

"""``coordinator bench``: measured latency and throughput beside the plan's prediction."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from rich.table import Table

from coordinator.bench import BenchResult, measure, random_inputs
from coordinator.bench_check import CheckedRun, Reference, run_checked
from coordinator.console import console, ms
from coordinator.deploy import deploy, plan_layer_graph, plan_model
from coordinator.deploy_command import (
    add_deploy_arguments,
    add_failover_arguments,
    emulate_links,
    ensure_deployed,
)
from coordinator.events import events_path_for
from coordinator.pipeline import Pipeline
from partition.artifact import ProgramRunner
from partition.plan import Plan, baseline_plan
from partition.split import split


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure a deployed plan against its prediction")
    add_deploy_arguments(parser)
    parser.add_argument("-n", "--requests", type=int, default=200, help="requests (default 200)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="in flight (default 8)")
    parser.add_argument("--baselines", action="store_true",
                        help="also deploy and measure every baseline that fits")
    parser.add_argument("--check", action="store_true",
                        help="compare every output with the single-process model's")
    parser.add_argument("--json", metavar="FILE",
                        help="write requests, answered, failed, duplicates, mismatches, "
                             "re-plans, throughput and latency percentiles to FILE")
    add_failover_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    ensure_deployed(plan, args)
    if args.check or args.json:
        return _run_checked(plan, args)
    ours = _measure(plan, args)
    console.print(prediction_table(plan, ours))
    if args.baselines:
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
    return 0


def _measure(plan: Plan, args: argparse.Namespace) -> BenchResult:
    with console.status(f"{args.requests} requests, {args.concurrency} in flight"):
        return asyncio.run(measure(
            plan, random_inputs(plan.inputs), requests=args.requests,
            concurrency=args.concurrency, rebalance=args.rebalance,
        ))


def _run_checked(plan: Plan, args: argparse.Namespace) -> int:
    """Every request counted (and with ``--check`` compared); a table, and ``--json``."""
    runner = ProgramRunner(plan_model(plan, args.model)[0].program) if args.check else None
    reference = Reference(runner, random_inputs(plan.inputs), [s.name for s in plan.inputs])

    async def go() -> CheckedRun:
        async with await Pipeline.connect(
            plan, window=max(args.concurrency, 1), rebalance=args.rebalance,
            deadline_s=args.deadline, emulate_links=emulate_links(plan, args),
            events_path=events_path_for(args.plan),
        ) as pipeline:
            return await run_checked(pipeline, reference, requests=args.requests,
                                     concurrency=args.concurrency)

    with console.status(f"{args.requests} requests, {args.concurrency} in flight"):
        result = asyncio.run(go())
    console.print(checked_table(result, args.check))
    for replan in result.replans:
        console.print(replan_line(replan))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        console.print(f"wrote {args.json}")
    return 1 if result.failed or result.mismatches or result.duplicates else 0


def checked_table(result: CheckedRun, checked: bool) -> Table:
    """What happened to every request of a run."""
    table = Table(title=f"{result.requests} requests" + (", every output checked against "
                                                          "the single-process model"
                                                          if checked else ""))
    for column in ("answered", "failed", "duplicates", "mismatches", "re-plans",
                   "req/s", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    table.add_row(str(result.answered), str(result.failed), str(result.duplicates),
                  str(result.mismatches) if checked else "-", str(len(result.replans)),
                  f"{result.throughput_per_s:.1f}", ms(result.percentile(0.5)),
                  ms(result.percentile(0.99)))
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
    """Measured p50/p95 latency and throughput beside the plan's prediction."""
    table = Table(title=f"measured vs predicted ({result.requests} requests, "
                        f"{result.concurrency} in flight)")
    for column in ("metric", "measured", "predicted", "error"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    table.add_row("latency p50 ms", ms(result.latency_p50_s), ms(plan.latency_s),
                  _error(result.latency_p50_s, plan.latency_s))
    table.add_row("latency p95 ms", ms(result.latency_p95_s), ms(plan.latency_s),
                  _error(result.latency_p95_s, plan.latency_s))
    table.add_row("throughput req/s", f"{result.throughput_per_s:.1f}",
                  f"{plan.throughput_per_s:.1f}",
                  _error(result.throughput_per_s, plan.throughput_per_s))
    return table


def baselines_measured_table(rows: list[tuple[str, Plan, BenchResult]]) -> Table:
    """Each strategy measured on the same cluster, and our plan's measured ratio to it."""
    ours = rows[0][2]
    table = Table(title="measured on the same cluster")
    for column in ("strategy", "stages", "latency p50 ms", "throughput req/s",
                   "predicted req/s", "ours / it"):
        table.add_column(column, justify="left" if column in ("strategy", "stages") else "right")
    for name, plan, result in rows:
        table.add_row(
            name, " ".join(f"{s.node}[{s.start},{s.end})" for s in plan.stages),
            ms(result.latency_p50_s), f"{result.throughput_per_s:.1f}",
            f"{plan.throughput_per_s:.1f}",
            f"{ours.throughput_per_s / result.throughput_per_s:.2f}x",
        )
    return table

"""``coordinator bench``: measured latency and throughput beside the plan's prediction."""

from __future__ import annotations

import argparse
import asyncio
import math
import random
from collections import Counter

from rich.table import Table

from coordinator.bench import BenchResult, measure, random_inputs
from coordinator.console import console, ms
from coordinator.deploy import deploy
from coordinator.deploy_command import add_deploy_arguments, emulate_links, ensure_deployed
from coordinator.verify import Difference, verify
from partition.plan import Plan
from partition.planning import baseline_plan
from partition.split import plan_layer_graph, split, stage_artifacts


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="measure a deployed plan against its prediction")
    add_deploy_arguments(parser)
    parser.add_argument("-n", "--requests", type=int, default=200, help="requests (default 200)")
    parser.add_argument("-c", "--concurrency", type=int, default=8, help="in flight (default 8)")
    parser.add_argument("--baselines", action="store_true",
                        help="also deploy and measure every baseline that fits")
    parser.add_argument(
        "--verify-fraction", type=_fraction, default=0.0, metavar="F",
        help="recompute a random fraction F of the requests here, stage by stage, and name "
             "any stage whose node answers differently (default 0)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    ensure_deployed(plan, args)
    ours = _measure(plan, args)
    console.print(prediction_table(plan, ours))
    differences = _verify(plan, args) if args.verify_fraction > 0 else []
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
    return 1 if differences else 0


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
        address = plan.stages[stage].address if 0 <= stage < len(plan.stages) else "?"
        console.print(f"stage {stage} on node {node!r} ({address}) {what}, in "
                      f"{requests} of {len(chosen)} verified request(s)", markup=False)
    return differences


def _grouped(differences: list[Difference]) -> list[tuple[int, str, str, int]]:
    """(stage, node, what, how many requests), in the order first seen."""
    counts = Counter((d.stage, d.node, d.what) for d in differences)
    return [(stage, node, what, n) for (stage, node, what), n in counts.items()]


def _measure(plan: Plan, args: argparse.Namespace) -> BenchResult:
    with console.status(f"{args.requests} requests, {args.concurrency} in flight"):
        return asyncio.run(measure(
            plan, random_inputs(plan.inputs), requests=args.requests,
            concurrency=args.concurrency,
        ))


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

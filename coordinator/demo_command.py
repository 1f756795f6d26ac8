"""``coordinator demo``: the whole story on this machine, from a sample model to measurements.

Builds the bundled sample model, profiles it afresh, starts the heterogeneous example
cluster as real worker processes, plans, deploys, runs requests checking every output
against the single-process model, compares measured with predicted, and tears everything
down.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import torch

from coordinator import samples
from coordinator.bench import BENCH_CONCURRENCY, InputFactory, measure, random_inputs
from coordinator.bench_command import offered_rate, prediction_table
from coordinator.console import console, progress_bar
from coordinator.deploy import deploy
from coordinator.host_cpu import host_cpu_line
from coordinator.local_cluster import LocalCluster
from coordinator.pipeline import Pipeline
from coordinator.plan_command import show_plan
from coordinator.plot import plot_plan
from coordinator.remote_profile import worker_overheads
from partition.artifact import ProgramRunner
from partition.cluster import load_cluster, memory_for_stages
from partition.cost_builder import node_profiles
from partition.errors import EdgesplitError
from partition.layers import build_layer_graph
from partition.loader import load_model
from partition.plan import Objective, Plan
from partition.planning import plan
from partition.profile_store import cached_profile
from partition.split import split

DEMO_MODEL = samples.gpt2(layers=8, width=384, batch=1, seq=128)
DEMO_CLUSTER = "cluster-heterogeneous.yaml"


class OutputMismatchError(EdgesplitError):
    """A pipeline output differs from the single-process model's."""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="plan, deploy and measure a sample model on a local simulated cluster"
    )
    parser.add_argument("--requests", type=int, default=300, help="requests to run (default 300)")
    parser.add_argument("--nodes", help="cluster (default: the bundled heterogeneous example)")
    parser.add_argument("--out", default="out/demo", help="folder for the model, plan and plot")
    parser.add_argument("--secure", action="store_true",
                        help="run the workers with mutual TLS and a cluster token")
    parser.set_defaults(run=run)


def bundled_cluster() -> Path:
    """The heterogeneous example cluster in the repository's ``examples/``."""
    path = Path(__file__).resolve().parent.parent / "examples" / DEMO_CLUSTER
    if not path.is_file():
        raise EdgesplitError(f"{path} is missing; pass a cluster with --nodes NODES.yaml")
    return path


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    cluster = load_cluster(args.nodes or bundled_cluster())
    with console.status("building the sample model (GPT-2 config, random weights)"):
        model_path = samples.write_sample(DEMO_MODEL, out / "model.pt2")
    model = load_model(model_path)
    layer_graph = build_layer_graph(model.program)
    console.print(f"[bold]1. model[/] {model_path}: {layer_graph.num_layers} layers")

    # Afresh, before the workers start: a profile cached on a busier (or quieter) machine, or
    # timed while workers start up, predicts another machine than the one the workers run on.
    with progress_bar("2. profiling on this machine", 23) as update:
        here, _ = cached_profile(model, layer_graph, progress=update, refresh=True)
    console.print(f"[bold]2. profiled[/] whole model {here.model_median_s * 1e3:.1f} ms "
                  "here; slower nodes are planned by their speed")

    console.print(f"[bold]3. cluster[/] starting {len(cluster.nodes)} edge-node processes")
    with LocalCluster(cluster, out / "cluster", secure=args.secure) as local:
        cluster = local.cluster  # with --secure, it names the fresh certificates and token
        result = plan(model, layer_graph, memory_for_stages(cluster, worker_overheads(cluster)),
                      node_profiles(cluster, here, {}), Objective.THROUGHPUT)
        result.save(out / "plan.json")
        console.print("[bold]4. plan[/]")
        show_plan(result)
        plot_plan(result, out / "plan.png")
        console.print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")

        artifacts = split(result, layer_graph)
        total = sum(len(a.data) for a in artifacts)
        with progress_bar("5. deploying", total, in_bytes=True) as update:
            asyncio.run(deploy(result, artifacts, emulate_links=True, progress=update))
        console.print(f"[bold]5. deployed[/] {len(artifacts)} stage(s)")

        make_inputs = random_inputs(result.inputs)
        checked = asyncio.run(check_outputs(result, ProgramRunner(model.program), make_inputs,
                                            args.requests))
        console.print(f"[bold]6. checked[/] {checked} outputs: all equal the single-process "
                      "model's (atol 1e-5)")
        rate = offered_rate(result)
        with console.status("7. measuring latency and throughput"):
            measured = asyncio.run(measure(result, make_inputs, requests=args.requests,
                                           concurrency=BENCH_CONCURRENCY, rate_per_s=rate))
        console.print(prediction_table(result, measured))
        console.print(host_cpu_line(measured.host_cpu))
    console.print(f"cluster stopped; demo took {time.perf_counter() - started:.0f} s")
    return 0


async def check_outputs(
    plan_: Plan, reference: ProgramRunner, make_inputs: InputFactory, requests: int
) -> int:
    """Send ``requests`` different inputs concurrently; each answer must match its own input."""
    batch = [make_inputs(index) for index in range(requests)]
    with progress_bar("6. running and checking requests", requests) as update:
        async with await Pipeline.connect(plan_) as pipeline:
            done = 0

            async def one(inputs: dict[str, torch.Tensor]) -> None:
                nonlocal done
                got = await pipeline.infer(inputs)
                expected = reference(*(inputs[spec.name] for spec in plan_.inputs))
                for spec, a, b in zip(plan_.outputs, got, expected, strict=True):
                    if not torch.allclose(a, b, atol=1e-5):
                        raise OutputMismatchError(
                            f"output {spec.name!r} differs from the single-process model's "
                            f"by up to {(a - b).abs().max().item():.2e}"
                        )
                done += 1
                update(done)

            await asyncio.gather(*(one(inputs) for inputs in batch))
    return requests

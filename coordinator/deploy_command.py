"""``coordinator deploy`` and ``coordinator run``: ship a plan, then send it requests."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterable

import torch

from coordinator.console import console, progress_bar
from coordinator.deploy import (
    Deployment,
    deploy,
    deployment_record_path,
    is_deployed,
    replicas,
)
from coordinator.events import events_path_for
from coordinator.local_cluster import default_state_dir, read_state
from coordinator.pipeline import Pipeline, bind_inputs
from coordinator.tensor_file import read_tensor_file
from partition.plan import Plan
from partition.split import stage_artifacts
from partition.units import format_bytes


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("deploy", help="ship each stage to its node and wire the chain")
    add_deploy_arguments(parser)
    parser.set_defaults(run=run_deploy)

    parser = commands.add_parser("run", help="send one request through a deployed plan")
    add_deploy_arguments(parser)
    parser.add_argument("--input", required=True, help="torch.save of a tensor, tuple or dict")
    parser.add_argument("--output", required=True, help="where to torch.save the outputs")
    add_failover_arguments(parser)
    parser.set_defaults(run=run_request)


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """The plan, and how to find its model and treat its links (deploy, run, bench)."""
    parser.add_argument("plan", help="plan.json from `coordinator plan`")
    parser.add_argument("--model", help="the model file, if it moved since planning")
    parser.add_argument(
        "--emulate-links", action=argparse.BooleanOptionalAction, default=None,
        help="delay transfers as the plan's links would (default: only on a simulated cluster)",
    )


def add_failover_arguments(parser: argparse.ArgumentParser) -> None:
    """How the pipeline treats failures (run, bench)."""
    parser.add_argument(
        "--no-rebalance", dest="rebalance", action="store_false",
        help="after a failure, keep the new plan even when the lost node comes back",
    )
    parser.add_argument(
        "--deadline", type=float, metavar="SECONDS",
        help="fail a request unanswered for this long (default: from the predicted latency)",
    )


def run_deploy(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    record = ship(plan, args)
    console.print(
        f"deployed {len(plan.stages)} stage(s) to "
        f"{', '.join(f'{r.node} ({r.address})' for _, r in replicas(plan))}"
        + ("; links emulated" if record.emulated_links else "")
    )
    return 0


def ship(plan: Plan, args: argparse.Namespace) -> Deployment:
    """Export and deploy the plan's stages, and record what was deployed beside the plan."""
    with console.status("exporting stages"):
        artifacts = stage_artifacts(plan, args.model)
    total = sum(len(a.data) for a in artifacts)
    emulate = emulate_links(plan, args)
    with progress_bar(f"shipping {format_bytes(total)}", total, in_bytes=True) as update:
        record = asyncio.run(deploy(plan, artifacts, emulate_links=emulate, progress=update))
    record.save(deployment_record_path(args.plan))
    return record


def emulate_links(plan: Plan, args: argparse.Namespace) -> bool:
    """``--emulate-links`` if given, else whether the plan runs on a simulated cluster."""
    return links_emulated([r.address for _, r in replicas(plan)], args.emulate_links)


def links_emulated(addresses: Iterable[str], choice: bool | None) -> bool:
    """``choice`` (``--emulate-links``) if given, else whether every address is a worker
    started by ``coordinator up`` here."""
    return on_simulated_cluster(addresses) if choice is None else choice


def on_simulated_cluster(addresses: Iterable[str]) -> bool:
    """True if every address is a worker started by ``coordinator up`` here."""
    local = {node.address for node in read_state(default_state_dir())}
    return bool(local) and all(address in local for address in addresses)


def ensure_deployed(plan: Plan, args: argparse.Namespace) -> None:
    """Deploy unless every node still runs the stage the last deploy gave it."""
    record = Deployment.load(deployment_record_path(args.plan))
    if not asyncio.run(is_deployed(plan, record)):
        ship(plan, args)


def run_request(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    inputs = bind_inputs(plan.inputs, _read_inputs(args.input))  # refused before any deploy
    ensure_deployed(plan, args)
    outputs = asyncio.run(_infer_once(plan, inputs, args))
    torch.save(outputs[0] if len(outputs) == 1 else outputs, args.output)
    shapes = ", ".join(f"{o.dtype}{list(o.shape)}".replace("torch.", "") for o in outputs)
    console.print(f"wrote {args.output}: {shapes}")
    return 0


async def _infer_once(plan: Plan, inputs, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    async with await Pipeline.connect(
        plan, rebalance=args.rebalance, deadline_s=args.deadline,
        emulate_links=emulate_links(plan, args), events_path=events_path_for(args.plan),
    ) as pipeline:
        outputs = await pipeline.infer(inputs)
    return tuple(o.clone() for o in outputs)


def _read_inputs(path: str):
    value = read_tensor_file(path, "input file",
                             "save a tensor, a tuple or a dict of tensors with torch.save")
    if isinstance(value, list):
        value = tuple(value)
    return value

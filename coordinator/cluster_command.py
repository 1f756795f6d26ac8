"""``coordinator up``, ``down`` and ``status``: the simulated cluster and a look at nodes."""

from __future__ import annotations

import argparse
import asyncio

from rich.table import Table

from coordinator.console import console, ms
from coordinator.events import events_path_for
from coordinator.local_cluster import (
    clear_state,
    default_state_dir,
    read_state,
    start_cluster,
    stop_nodes,
)
from node.client import GrpcWorkerHandle
from node.errors import NodeUnreachableError
from partition.cluster import load_cluster
from partition.plan import Plan

STATUS_EVENTS = 20
"""Failover events ``status --plan`` shows (the latest)."""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("up", help="start a simulated cluster of real workers here")
    parser.add_argument("nodes", metavar="NODES.yaml")
    parser.set_defaults(run=run_up)

    parser = commands.add_parser("down", help="stop the simulated cluster")
    parser.set_defaults(run=run_down)

    parser = commands.add_parser("status", help="show each node: up/down, stage, load")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--nodes", metavar="NODES.yaml", help="the nodes of this cluster")
    source.add_argument("--plan", help="the nodes of this plan")
    parser.set_defaults(run=run_status)


def run_up(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.nodes)
    with console.status(f"starting {len(cluster.nodes)} edge-node processes"):
        nodes = start_cluster(cluster, default_state_dir())
    for node in nodes:
        console.print(
            f"{node.name} listening on {node.address} (pid {node.pid}, log {node.log_path})"
        )
    console.print("stop them with `coordinator down`")
    return 0


def run_down(args: argparse.Namespace) -> int:
    state_dir = default_state_dir()
    nodes = read_state(state_dir)
    stop_nodes(nodes)
    clear_state(state_dir)
    console.print(f"stopped {len(nodes)} node(s)" if nodes else "no simulated cluster was up")
    return 0


def run_status(args: argparse.Namespace) -> int:
    if args.nodes:
        targets = [(n.name, n.address) for n in load_cluster(args.nodes).nodes]
    elif args.plan:
        targets = [(s.node, s.address) for s in Plan.load(args.plan).stages]
    else:
        targets = [(n.name, n.address) for n in read_state(default_state_dir())]
        if not targets:
            console.print("no simulated cluster is up; pass --nodes NODES.yaml or --plan plan.json")
            return 1
    console.print(asyncio.run(status_table(targets)))
    if args.plan:
        events = events_path_for(args.plan)
        lines = events.read_text().splitlines()[-STATUS_EVENTS:] if events.is_file() else []
        if lines:
            console.print(f"failover events ({events}):")
            for line in lines:
                console.print(line, markup=False)
    return 0


async def status_table(targets: list[tuple[str, str]]) -> Table:
    """Node, address, up/down, stage and hash, requests served, queue depth, p50 stage time."""
    table = Table(title="nodes")
    for column in ("node", "address", "state", "stage", "hash", "served", "queue", "p50 ms"):
        table.add_column(column, justify="right" if column in ("served", "queue", "p50 ms")
                         else "left")

    async def row(name: str, address: str) -> list[str]:
        handle = GrpcWorkerHandle(address, name)
        try:
            info = await handle.describe()
        except NodeUnreachableError:
            return [name, address, "[red]down[/]", "-", "-", "-", "-", "-"]
        finally:
            await handle.close()
        stage = info.stage
        return [
            name, address, "[green]up[/]",
            str(stage.index) if stage else "-", stage.sha256[:12] if stage else "-",
            str(info.requests_served), str(info.queue_depth),
            ms(info.p50_stage_seconds) if info.p50_stage_seconds else "-",
        ]

    for cells in await asyncio.gather(*(row(n, a) for n, a in targets)):
        table.add_row(*cells)
    return table

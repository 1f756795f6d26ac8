"""``coordinator up``, ``down`` and ``status``: the simulated cluster and a look at nodes."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import yaml
from rich.table import Table

from coordinator.console import console, ms
from coordinator.deploy import Deployment, deployment_record_path, plan_digest, replicas
from coordinator.events import events_path_for
from coordinator.isolation import HOST_SHARE, Isolation, cores_wanted, host_cores
from coordinator.local_cluster import (
    PLANNING_NODES_FILE,
    default_state_dir,
    read_arbiters,
    read_cpu_groups,
    read_namespaces,
    read_state,
    start_cluster,
    stop_recorded,
    with_fresh_certs,
)
from node.client import GrpcWorkerHandle
from node.errors import NodeUnreachableError
from node.security import Security, client_security
from partition.cluster import load_cluster
from partition.plan import Plan
from partition.security_spec import SecuritySpec

STATUS_EVENTS = 20
"""Failover events ``status --plan`` shows (the latest)."""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "up", help="start a simulated cluster of real workers here (and an arbiter process "
                   "per shared medium)")
    parser.add_argument("nodes", metavar="NODES.yaml")
    parser.add_argument(
        "--secure", action="store_true",
        help="run the workers with fresh certificates (mutual TLS) and a token",
    )
    parser.add_argument(
        "--isolation", type=Isolation, choices=list(Isolation), default=Isolation.NONE,
        help="how nodes and links are emulated: none (compute, then sleep; links delayed by "
             "the sender; the default) or kernel (a cgroup CPU quota and a network namespace "
             "per worker, links shaped by tc; Linux, root, cgroup-v1, iproute2)",
    )
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
    state_dir = default_state_dir()
    if args.secure:
        cluster = with_fresh_certs(cluster, state_dir)
    with console.status(f"starting {len(cluster.nodes)} edge-node processes"):
        nodes = start_cluster(cluster, state_dir, args.isolation)
    for node in nodes:
        console.print(
            f"{node.name} listening on {node.address} (pid {node.pid}, log {node.log_path})"
        )
    for arbiter in read_arbiters(state_dir):
        console.print(f"medium {arbiter.name}: arbiter on {arbiter.address} (pid "
                      f"{arbiter.pid}, log {arbiter.log_path})")
    cpu_groups, namespaces = read_cpu_groups(state_dir), read_namespaces(state_dir)
    stretch = cpu_groups.stretch if cpu_groups else 1.0
    if cpu_groups is not None:
        console.print(f"each worker runs under a CPU quota in {cpu_groups.path}/<node>")
        if line := cpu_groups.stretch_line():
            console.print(line, markup=False)
    if cpu_groups is None and (wanted := cores_wanted(cluster)) > HOST_SHARE * host_cores():
        console.print(f"at full load the nodes compute up to {wanted:.2f} cores' worth for real, "
                      f"more than {HOST_SHARE:.0%} of this host's {host_cores()}: `coordinator "
                      "bench` offers fewer requests a second to fit (--isolation kernel "
                      "stretches the speeds instead)")
    if namespaces is not None:
        console.print(f"each worker runs in network namespace {namespaces.prefix}<node>, its "
                      f"address in {namespaces.block}; tc shapes every link's bandwidth")
    if args.secure or stretch < 1 or namespaces is not None:
        addresses = {node.name: node.address for node in nodes}
        planning = write_planning_nodes(Path(args.nodes), state_dir, cluster.security, stretch,
                                        addresses)
        why = [*(["mutual TLS and a token are on"] if args.secure else []),
               *(["the speeds are stretched"] if stretch < 1 else []),
               *(["the nodes have addresses in their namespaces"] if namespaces else [])]
        console.print(f"{' and '.join(why)}: plan with --nodes {planning}")
    console.print("stop them with `coordinator down`")
    return 0


def write_planning_nodes(
    nodes: Path, state_dir: Path, security: SecuritySpec | None, stretch: float,
    addresses: dict[str, str],
) -> Path:
    """Copy ``nodes`` into ``state_dir`` as the running cluster is: with ``security`` as its
    ``security`` block, every node's speed times ``stretch``, and its address from
    ``addresses`` (by node name)."""
    data = yaml.safe_load(nodes.read_text(encoding="utf-8"))
    if security is not None:
        data["security"] = security.to_dict()
    data["nodes"] = [{**node, "address": addresses[node["name"]]} for node in data["nodes"]]
    if stretch < 1:
        data["nodes"] = [{**node, "speed": (node.get("speed") or 1.0) * stretch}
                         for node in data["nodes"]]
    path = state_dir / PLANNING_NODES_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_down(args: argparse.Namespace) -> int:
    nodes, arbiters = stop_recorded(default_state_dir())
    media = f" and {arbiters} medium arbiter(s)" if arbiters else ""
    console.print(f"stopped {nodes} node(s){media}" if nodes or arbiters
                  else "no simulated cluster was up")
    return 0


def run_status(args: argparse.Namespace) -> int:
    expected: list[str | None] | None = None
    if args.nodes:
        cluster = load_cluster(args.nodes)
        targets = [(n.name, n.address) for n in cluster.nodes]
        security = cluster.security
    elif args.plan:
        plan = Plan.load(args.plan)
        targets = [(r.node, r.address) for _, r in replicas(plan)]
        security = plan.security
        record = Deployment.load(deployment_record_path(args.plan))
        if record is not None and record.plan_sha256 == plan_digest(plan):
            expected = list(record.artifact_sha256)
    else:
        state_dir = default_state_dir()
        targets = [(n.name, n.address) for n in read_state(state_dir)]
        if not targets:
            console.print("no simulated cluster is up; pass --nodes NODES.yaml or --plan plan.json")
            return 1
        planning = state_dir / PLANNING_NODES_FILE
        security = load_cluster(planning).security if planning.is_file() else None
    console.print(asyncio.run(status_table(targets, client_security(security), expected)))
    if args.plan:
        events = events_path_for(args.plan)
        lines = events.read_text().splitlines()[-STATUS_EVENTS:] if events.is_file() else []
        if lines:
            console.print(f"failover events ({events}):")
            for line in lines:
                console.print(line, markup=False)
    return 0


async def status_table(
    targets: list[tuple[str, str]],
    security: Security | None = None,
    expected_sha256: list[str | None] | None = None,
) -> Table:
    """Node, address, up/down, stage and hash, requests served, queue depth, p50 stage time.

    With ``expected_sha256`` (the hash ``deploy`` shipped to each target), a stage whose hash
    differs is flagged.
    """
    table = Table(title="nodes")
    for column in ("node", "address", "state", "stage", "hash", "served", "queue", "p50 ms"):
        table.add_column(column, justify="right" if column in ("served", "queue", "p50 ms")
                         else "left")

    async def row(name: str, address: str, expected: str | None) -> list[str]:
        handle = GrpcWorkerHandle(address, name, security)
        try:
            info = await handle.describe()
        except NodeUnreachableError:
            return [name, address, "[red]down[/]", "-", "-", "-", "-", "-"]
        finally:
            await handle.close()
        stage = info.stage
        digest = stage.sha256[:12] if stage else "-"
        if expected is not None and (stage is None or stage.sha256 != expected):
            digest = f"[red]{digest} (plan: {expected[:12]})[/]"
        return [
            name, address, "[green]up[/]",
            str(stage.index) if stage else "-", digest,
            str(info.requests_served), str(info.queue_depth),
            ms(info.p50_stage_seconds) if info.p50_stage_seconds else "-",
        ]

    hashes = expected_sha256 or [None] * len(targets)
    rows = await asyncio.gather(
        *(row(n, a, h) for (n, a), h in zip(targets, hashes, strict=True))
    )
    for cells in rows:
        table.add_row(*cells)
    return table

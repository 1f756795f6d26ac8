"""``coordinator probe nodes.yaml``: measure every link, show it beside what the file says,
and write the measured ``nodes.yaml``."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.table import Table

from coordinator.console import console
from coordinator.deploy_command import links_emulated
from coordinator.probe import COORDINATOR, ClusterLinks, probe_cluster, write_measured_nodes
from node.probe import MAX_PROBE_BYTES, MAX_PROBE_ROUNDS, ProbeOptions
from partition.cluster import ClusterSpec, load_cluster
from partition.errors import EdgesplitError
from partition.units import format_bandwidth, format_bytes, format_duration, parse_size

DEFAULT_PROBE_BYTES = 1024 * 1024
"""Default sized payload: long enough over a fast link to time its bandwidth."""

DEFAULT_ROUNDS = 10


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "probe", help="measure the bandwidth and latency of every link between the nodes"
    )
    parser.add_argument("nodes", metavar="NODES.yaml", help="the cluster")
    parser.add_argument(
        "-o", "--output", metavar="MEASURED.yaml",
        help="write NODES.yaml with the measured links, to plan with",
    )
    parser.add_argument(
        "--bytes", type=parse_size, default=DEFAULT_PROBE_BYTES, metavar="SIZE",
        help=f"payload that times the bandwidth (default 1MiB, at most "
             f"{format_bytes(MAX_PROBE_BYTES)})",
    )
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS,
        help=f"timed rounds per link (default {DEFAULT_ROUNDS}, at most {MAX_PROBE_ROUNDS})",
    )
    parser.add_argument(
        "--emulate-links", action=argparse.BooleanOptionalAction, default=None,
        help="probe through the links NODES.yaml gives (default: only on a simulated cluster)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.nodes)
    if len(cluster.nodes) < 2:
        raise EdgesplitError(f"{args.nodes} has one node, so no link to measure; add nodes")
    if not 1 <= args.bytes <= MAX_PROBE_BYTES:
        raise EdgesplitError(f"--bytes {args.bytes} is out of range; give 1 to "
                             f"{format_bytes(MAX_PROBE_BYTES)}, for example --bytes 1MiB")
    if not 1 <= args.rounds <= MAX_PROBE_ROUNDS:
        raise EdgesplitError(f"--rounds {args.rounds} is out of range; give 1 to "
                             f"{MAX_PROBE_ROUNDS}")
    emulate = links_emulated([node.address for node in cluster.nodes], args.emulate_links)
    pairs = len(cluster.nodes) * (len(cluster.nodes) - 1)
    with console.status(f"measuring {pairs} links"):
        links = asyncio.run(probe_cluster(cluster, ProbeOptions(args.bytes, args.rounds),
                                          emulate=emulate))
    console.print(links_table(cluster, links, emulate))
    if args.output:
        write_measured_nodes(Path(args.output), Path(args.nodes), cluster, links)
        console.print(f"wrote {args.output}: plan with --nodes {args.output}")
    return 0


def links_table(cluster: ClusterSpec, links: ClusterLinks, emulated: bool) -> Table:
    """Each measured link beside the one ``nodes.yaml`` gives (from the coordinator, none)."""
    table = Table(title="links, measured" + (" (through the emulated links)" if emulated
                                             else ""))
    for column in ("from", "to", "bandwidth", "nodes.yaml", "latency", "nodes.yaml", "rtt"):
        table.add_column(column, justify="left" if column in ("from", "to") else "right")
    for (a, b), measured in links.between_nodes.items():
        given = cluster.link(a, b)
        table.add_row(a, b, format_bandwidth(measured.bytes_per_s),
                      format_bandwidth(given.bytes_per_s), format_duration(measured.latency_s),
                      format_duration(given.latency_s), format_duration(measured.rtt_s))
    for name, measured in links.from_coordinator.items():
        role = " and ".join(r for r, n in (("source", cluster.source), ("sink", cluster.sink))
                            if n == name)
        table.add_row(COORDINATOR, f"{name} ({role})", format_bandwidth(measured.bytes_per_s),
                      "-", format_duration(measured.latency_s), "-",
                      format_duration(measured.rtt_s))
    return table

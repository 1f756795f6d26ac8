"""``coordinator certs DIR --nodes nodes.yaml``: make the cluster's credentials, and say how
to use them."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from coordinator.certs import make_certs, node_arguments
from coordinator.console import console
from partition.cluster import ClusterSpec, load_cluster
from partition.security_spec import SecuritySpec


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "certs", help="make the cluster's CA, node and coordinator certificates, and a token"
    )
    parser.add_argument("directory", metavar="DIR", help="where to write them")
    parser.add_argument("--nodes", required=True, metavar="NODES.yaml", help="the cluster")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cluster = load_cluster(args.nodes)
    security = make_certs(Path(args.directory), cluster)
    directory = Path(security.ca).parent
    console.print(
        f"wrote ca.crt, ca.key, coordinator.crt/.key, a .crt/.key per node and token to "
        f"{directory}; keep ca.key off the devices"
    )
    console.print(f"\nadd to {args.nodes}:\n")
    console.print(security_block(security), markup=False, soft_wrap=True)
    console.print("start each node (copy its NAME.crt, NAME.key, ca.crt and token there):\n")
    for line in node_command_lines(cluster, security):
        console.print(line, markup=False, soft_wrap=True)
    return 0


def security_block(security: SecuritySpec) -> str:
    """The ``security:`` block of nodes.yaml that names ``security``'s files."""
    return yaml.safe_dump({"security": security.to_dict()}, sort_keys=False)


def node_command_lines(cluster: ClusterSpec, security: SecuritySpec) -> list[str]:
    """The ``edge-node`` command line that starts each node of ``cluster`` securely."""
    return [
        shlex.join(["edge-node", "--listen", node.address, "--name", node.name,
                    *node_arguments(security, node.name)])
        for node in cluster.nodes
    ]

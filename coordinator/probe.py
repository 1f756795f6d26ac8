"""Measure a cluster's links: every node to every other node, and this process to the source
and sink; write them back as a ``nodes.yaml`` that ``coordinator plan`` reads."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coordinator.deploy import link_emulation
from node.client import GrpcWorkerHandle
from node.errors import NodeRejectedError, NodeUnreachableError, ProbeError
from node.link import LinkEmulation
from node.probe import LinkMeasurement, ProbeOptions
from node.security import client_security
from partition.cluster import ClusterSpec
from partition.plan import Link
from partition.units import format_bandwidth, format_duration

COORDINATOR = "coordinator"
"""How the process running ``probe`` is named in its rows."""


@dataclass(frozen=True)
class ClusterLinks:
    """Every ordered pair of nodes as measured, and this process's link to some of them."""

    between_nodes: dict[tuple[str, str], LinkMeasurement]
    from_coordinator: dict[str, LinkMeasurement]


async def probe_cluster(
    cluster: ClusterSpec, options: ProbeOptions, *, emulate: bool
) -> ClusterLinks:
    """Have each node measure its link to every other node, one link at a time (so no two
    share the network), then measure this process's link to the source and the sink.

    With ``emulate`` (a simulated cluster), each probe goes through the emulation of the
    link ``nodes.yaml`` gives for that pair, both ways, as ``deploy`` would wire it.

    Raises
    ------
    NodeUnreachableError
        If a node does not answer (the message names it).
    ProbeError
        If a node cannot measure its link to another (the message names both).
    """
    security = client_security(cluster.security)
    handles = {node.name: GrpcWorkerHandle(node.address, node.name, security)
               for node in cluster.nodes}
    try:
        for handle in handles.values():  # in file order: the first unreachable one is named
            await handle.describe()
        between = {}
        for a in cluster.nodes:
            for b in cluster.nodes:
                if a.name == b.name:
                    continue
                try:
                    between[a.name, b.name] = await handles[a.name].probe(
                        b.address, options, target_node=b.name,
                        outbound=_emulation(cluster, a.name, b.name, emulate),
                        inbound=_emulation(cluster, b.name, a.name, emulate),
                    )
                except (NodeRejectedError, NodeUnreachableError) as err:
                    raise ProbeError(f"cannot measure the link {a.name} -> {b.name}: {err}") \
                        from err
        ends = dict.fromkeys((cluster.source, cluster.sink))
        coordinator = {name: await handles[name].measure_link(options) for name in ends}
    finally:
        await asyncio.gather(*(handle.close() for handle in handles.values()))
    return ClusterLinks(between, coordinator)


def _emulation(cluster: ClusterSpec, a: str, b: str, emulate: bool) -> LinkEmulation:
    """What ``deploy`` would have node ``a`` emulate for its link to ``b``."""
    spec = cluster.link(a, b)
    return link_emulation(Link(a, b, spec.bytes_per_s, spec.latency_s), emulate)


def measured_nodes(nodes_yaml: Path, cluster: ClusterSpec, links: ClusterLinks) -> dict[str, Any]:
    """``nodes_yaml``'s content with every measured link as a per-pair override (both
    directions given), its default kept for pairs not measured, and its ``security`` paths
    made absolute (the file may be written elsewhere)."""
    data = yaml.safe_load(nodes_yaml.read_text(encoding="utf-8"))
    section = {key: value for key, value in (data.get("links") or {}).items()
               if key == "default"}
    section["overrides"] = [
        {"from": a, "to": b, "bandwidth": format_bandwidth(measured.bytes_per_s),
         "latency": format_duration(measured.latency_s)}
        for (a, b), measured in links.between_nodes.items()
    ]
    result = {**data, "links": section}
    if cluster.security is not None:
        result["security"] = cluster.security.to_dict()
    return result


def write_measured_nodes(
    path: Path, nodes_yaml: Path, cluster: ClusterSpec, links: ClusterLinks
) -> None:
    """Write :func:`measured_nodes` to ``path``, with a comment saying where it came from."""
    header = (f"# {nodes_yaml.name} with its links as `coordinator probe` measured them; "
              "plan with it: coordinator plan MODEL --nodes "
              f"{path.name}\n")
    body = yaml.safe_dump(measured_nodes(nodes_yaml, cluster, links), sort_keys=False)
    path.write_text(header + body, encoding="utf-8")

"""Kernel isolation of the simulated cluster's network: one network namespace per worker.

With ``--isolation kernel`` every node runs in its own namespace ``es-<id>-<node>`` and
listens on its *home address*, a /32 on that namespace's loopback interface. Each cluster
claims one /24 of the benchmarking range 198.18.0.0/15 with an ``unreachable`` route in the
root namespace: the claim is atomic (parallel clusters never share a block), and no packet
for the block leaves this machine while the cluster is up, even while a node is cut off.
Homes are ``.1`` onwards.

Every pair of nodes has its own veth pair, and each end's egress is shaped by ``tbf`` at the
link's bandwidth in that direction, so frames between nodes are real TCP at the spec's
rates. Each node also has a veth to the root namespace, where the coordinator and its
clients run (its root end holds ``.129`` onwards): root to node is shaped as the link from
the cluster's source to that node, node to root as the link from that node to the sink
(neither is shaped for the source or the sink itself), which is how the plan prices a
request's input and result. Latency is not shaped (``netem`` is not assumed): the workers
still delay what they send by the link's latency.

Each shared medium's arbiter (:mod:`node.arbiter`) runs in a namespace of its own on an
address of the block (``.101`` onwards), joined by an unshaped veth to each node on the
medium and to nothing else: its nodes reserve airtime there, and no other process (on this
machine or off it) can reach it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from coordinator.isolation import IsolationError
from partition.cluster import ClusterSpec, LinkSpec

log = logging.getLogger(__name__)

NAME_PREFIX = "es-"
"""Every namespace and root-namespace link this module makes is ``es-<id>-...``."""
RANGE = ipaddress.IPv4Network("198.18.0.0/15")
"""The benchmarking range (RFC 2544) the clusters' addresses come from."""
BLOCK_PREFIX = 24
"""Each cluster claims one block of this prefix length."""
ROOT_END_OFFSET = 128
"""A node's root end is its home address plus this."""
MEDIUM_OFFSET = 100
"""A medium's arbiter listens on the block's first address plus this and its index."""
MAX_NODES = MEDIUM_OFFSET
MAX_MEDIA = ROOT_END_OFFSET - MEDIUM_OFFSET
TBF_LATENCY = "100ms"
"""How long a packet may wait in a shaped link's queue before it is dropped."""
TBF_MIN_BURST_BYTES = 4 * 1024
TBF_BURST_S = 0.001
"""A shaped link's bucket: this many seconds at its rate, and at least the minimum above.
A frame smaller than the bucket crosses an idle link at once, so it is kept small (measured
here at 20 Mbit/s over a veth: a 32 KiB bucket let an idle 32 KiB message cross in 0.7 ms
instead of 13 ms; 4 KiB took 12.2 ms, and bulk TCP ran at 19.1 Mbit/s with either)."""
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
HOME_LINK = "lo"
ROOT_LINK = "host"
"""The name, inside a node's namespace, of its link to the root namespace."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
FIX = "; use --isolation none"

T = TypeVar("T")


def check_available() -> None:
    """Raise :class:`IsolationError` saying why, if namespaces cannot be made here."""
    if not sys.platform.startswith("linux"):
        raise IsolationError(f"--isolation kernel needs Linux network namespaces{FIX}")
    if os.geteuid() != 0:
        raise IsolationError(f"--isolation kernel needs root to make network namespaces{FIX}")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise IsolationError(
                f"--isolation kernel needs the `{tool}` command (iproute2) on PATH; install "
                f"iproute2{FIX}"
            )
    try:
        run(["ip", "netns", "list"])
    except IsolationError as err:
        raise IsolationError(f"`ip netns` is not available here ({err}){FIX}") from err


def run(command: list[str]) -> None:
    """Run an ``ip``/``tc`` command; :class:`IsolationError` with its message if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise IsolationError(
            f"`{' '.join(command)}` failed: {reason[-1] if reason else done.returncode}"
        )


@dataclass(frozen=True)
class NodeNetwork:
    """One node's namespace, its home address, and its link to the root namespace."""

    node: str
    namespace: str
    home: str
    root_end: str
    root_link: str


@dataclass(frozen=True)
class MediumNetwork:
    """A shared medium's namespace, where its arbiter runs, its address there, and the
    nodes it has a link to (those on the medium)."""

    medium: str
    namespace: str
    home: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Namespaces:
    """The namespaces and links of one simulated cluster, all named ``prefix...``."""

    prefix: str
    block: str
    nodes: tuple[NodeNetwork, ...]
    media: tuple[MediumNetwork, ...] = ()

    @classmethod
    def claim(cls, cluster: ClusterSpec, seed: str) -> Namespaces:
        """Claim a free block of :data:`RANGE` for ``cluster`` and name its namespaces;
        :meth:`build` makes them. Blocks are tried in an order that ``seed`` fixes, so a
        cluster started again with the same seed (its state directory) gets the same
        addresses while no other cluster holds them, and plans made for it still apply."""
        check_available()
        if len(cluster.nodes) > MAX_NODES or len(cluster.media) > MAX_MEDIA:
            raise IsolationError(
                f"--isolation kernel gives at most {MAX_NODES} nodes and {MAX_MEDIA} media an "
                f"address, and the cluster has {len(cluster.nodes)} and {len(cluster.media)}; "
                "split it or use --isolation none"
            )
        prefix = f"{NAME_PREFIX}{uuid.uuid4().hex[:6]}-"
        safe = all(_SAFE_NAME.match(name) for name in cluster.names)
        blocks = list(RANGE.subnets(new_prefix=BLOCK_PREFIX))
        first = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") % len(blocks)
        for block in [*blocks[first:], *blocks[:first]]:
            try:
                run(["ip", "route", "add", "unreachable", str(block)])
            except IsolationError as err:
                if "File exists" in str(err):
                    continue  # another cluster (or the host) has it
                raise
            hosts = list(block.hosts())
            nodes = tuple(
                NodeNetwork(name, prefix + (name if safe else f"n{i}"), str(hosts[i]),
                            str(hosts[i + ROOT_END_OFFSET]), f"{prefix}{i}")
                for i, name in enumerate(cluster.names)
            )
            media = tuple(
                MediumNetwork(medium.name, f"{prefix}m{k}", str(hosts[MEDIUM_OFFSET + k]),
                              medium.nodes)
                for k, medium in enumerate(cluster.media)
            )
            return cls(prefix, str(block), nodes, media)
        raise IsolationError(
            f"every /{BLOCK_PREFIX} block of {RANGE} is in use; run `coordinator down` "
            "for clusters left up"
        )

    def node(self, name: str) -> NodeNetwork:
        for node in self.nodes:
            if node.node == name:
                return node
        raise KeyError(name)

    def at_home(self, cluster: ClusterSpec) -> ClusterSpec:
        """``cluster`` with every node's address its home address (its port kept)."""
        return replace(cluster, nodes=tuple(
            replace(spec, address=f"{self.node(spec.name).home}:{spec.address.rpartition(':')[2]}")
            for spec in cluster.nodes
        ))

    def build(self, cluster: ClusterSpec) -> None:
        """Make every namespace, home address, link, route and shaper of ``cluster``."""
        for node in self.nodes:
            run(["ip", "netns", "add", node.namespace])
            _ip(node, "link", "set", HOME_LINK, "up")
            _ip(node, "address", "add", f"{node.home}/32", "dev", HOME_LINK)
            run(["ip", "link", "add", node.root_link, "type", "veth", "peer", "name",
                 ROOT_LINK, "netns", node.namespace])
            run(["ip", "address", "add", f"{node.root_end}/32", "dev", node.root_link])
            run(["ip", "link", "set", node.root_link, "up"])
            run(["ip", "route", "add", f"{node.home}/32", "dev", node.root_link,
                 "src", node.root_end])
            _shape(None, node.root_link, cluster.link(cluster.source, node.node))
            _shape(node.namespace, ROOT_LINK, cluster.link(node.node, cluster.sink))
        for i, a in enumerate(self.nodes):
            for j, b in enumerate(self.nodes[i + 1:], start=i + 1):
                run(["ip", "link", "add", _peer_link(j), "netns", a.namespace, "type", "veth",
                     "peer", "name", _peer_link(i), "netns", b.namespace])
                _shape(a.namespace, _peer_link(j), cluster.link(a.node, b.node))
                _shape(b.namespace, _peer_link(i), cluster.link(b.node, a.node))
        names = [node.node for node in self.nodes]
        for k, medium in enumerate(self.media):
            run(["ip", "netns", "add", medium.namespace])
            run(["ip", "-n", medium.namespace, "link", "set", HOME_LINK, "up"])
            run(["ip", "-n", medium.namespace, "address", "add", f"{medium.home}/32", "dev",
                 HOME_LINK])
            for name in medium.nodes:
                i, node = names.index(name), self.node(name)
                run(["ip", "link", "add", _medium_link(k), "netns", node.namespace, "type",
                     "veth", "peer", "name", _peer_link(i), "netns", medium.namespace])
                run(["ip", "-n", medium.namespace, "link", "set", _peer_link(i), "up"])
                run(["ip", "-n", medium.namespace, "route", "replace", f"{node.home}/32",
                     "dev", _peer_link(i), "src", medium.home])
        for node in self.nodes:
            self.heal(node.node)
        log.info("namespaces %s* with homes in %s", self.prefix, self.block)

    def _links(self, name: str) -> list[tuple[str, str]]:
        """Node ``name``'s links inside its namespace, each with the address it reaches."""
        index = [node.node for node in self.nodes].index(name)
        return [(ROOT_LINK, self.nodes[index].root_end), *(
            (_peer_link(j), peer.home) for j, peer in enumerate(self.nodes) if j != index
        ), *((_medium_link(k), medium.home) for k, medium in enumerate(self.media)
             if name in medium.nodes)]

    def medium(self, name: str) -> MediumNetwork:
        for medium in self.media:
            if medium.medium == name:
                return medium
        raise KeyError(name)

    def cut(self, name: str) -> None:
        """Cut node ``name`` off: every link of its namespace goes down (it keeps running,
        but no packet reaches it or leaves it)."""
        node = self.node(name)
        for link, _ in self._links(name):
            _ip(node, "link", "set", link, "down")
        log.info("node %s cut off", name)

    def heal(self, name: str) -> None:
        """Bring node ``name``'s links up and route each peer's address over its own link
        (taking a link down drops its routes)."""
        node = self.node(name)
        for link, address in self._links(name):
            _ip(node, "link", "set", link, "up")
            _ip(node, "route", "replace", f"{address}/32", "dev", link, "src", node.home)

    def remove(self) -> None:
        """Remove every namespace (their links go with them), root link and the block's
        route that exist; safe to repeat. Stop the workers first."""
        for node in self.nodes:
            if _link_exists(node.root_link):
                run(["ip", "link", "delete", node.root_link])
            if (NETNS_DIR / node.namespace).exists():
                run(["ip", "netns", "delete", node.namespace])
        for medium in self.media:
            if (NETNS_DIR / medium.namespace).exists():
                run(["ip", "netns", "delete", medium.namespace])
        with contextlib.suppress(IsolationError):  # absent already
            run(["ip", "route", "delete", "unreachable", self.block])
        log.info("namespaces %s* removed", self.prefix)

    def run_inside(self, name: str, function: Callable[[], T]) -> T:
        """``function()`` in a thread that entered node ``name``'s namespace, so processes it
        starts run there (a namespace is a property of the thread; this one then ends)."""
        return _run_in(self.node(name).namespace, function)

    def run_in_medium(self, name: str, function: Callable[[], T]) -> T:
        """``function()`` in a thread that entered medium ``name``'s namespace (see
        :meth:`run_inside`)."""
        return _run_in(self.medium(name).namespace, function)

    def to_dict(self) -> dict[str, object]:
        return {"prefix": self.prefix, "block": self.block,
                "nodes": [vars(node) for node in self.nodes],
                "media": [{**vars(m), "nodes": list(m.nodes)} for m in self.media]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Namespaces:
        """The namespaces a state file recorded; refuses names and blocks not ours."""
        prefix, block = str(data["prefix"]), ipaddress.IPv4Network(data["block"])
        nodes = tuple(NodeNetwork(**entry) for entry in data["nodes"])
        media = tuple(MediumNetwork(**{**entry, "nodes": tuple(entry["nodes"])})
                      for entry in data.get("media", []))
        if not prefix.startswith(NAME_PREFIX) or not block.subnet_of(RANGE) or any(
            not (n.namespace.startswith(prefix) and n.root_link.startswith(prefix))
            for n in nodes
        ) or any(not m.namespace.startswith(prefix) for m in media):
            raise ValueError(f"{data} names namespaces or addresses that are not edgesplit's")
        return cls(prefix, str(block), nodes, media)


def _run_in(namespace: str, function: Callable[[], T]) -> T:
    """``function()`` in a thread that entered ``namespace``."""
    path = NETNS_DIR / namespace
    result: list[T] = []
    failure: list[BaseException] = []

    def inside() -> None:
        try:
            _enter(path)
            result.append(function())
        except BaseException as err:  # handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=inside, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _peer_link(index: int) -> str:
    """The name, in a namespace, of its link to the ``index``-th node's."""
    return f"peer{index}"


def _medium_link(index: int) -> str:
    """The name, in a node's namespace, of its link to the ``index``-th medium's arbiter."""
    return f"air{index}"


def _ip(node: NodeNetwork, *arguments: str) -> None:
    run(["ip", "-n", node.namespace, *arguments])


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _shape(namespace: str | None, link: str, spec: LinkSpec) -> None:
    """Limit the egress of ``link`` (in ``namespace``, else the root namespace) to
    ``spec``'s bandwidth with ``tbf``; an infinite bandwidth is left unshaped."""
    if math.isinf(spec.bytes_per_s):
        return
    burst = max(TBF_MIN_BURST_BYTES, math.ceil(spec.bytes_per_s * TBF_BURST_S))
    run(["tc", *(["-n", namespace] if namespace else []), "qdisc", "replace", "dev", link,
         "root", "tbf", "rate", f"{round(spec.bytes_per_s * 8)}bit", "burst", str(burst),
         "latency", TBF_LATENCY])


def _enter(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise IsolationError(f"cannot enter namespace {path}: {os.strerror(error)}")
    finally:
        os.close(fd)

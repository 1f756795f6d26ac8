"""The cluster spec, ``nodes.yaml``: nodes, the links between them, the shared media, the
source and the sink.

Every mistake raises :class:`ClusterSpecError` with one line naming the file, the field's
path and the bad value, e.g. ``nodes.yaml: nodes[1].memory: '2 GiBs' is not a size``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, TypeVar

import numpy as np
import yaml

from partition.errors import ClusterSpecError
from partition.quantize import WeightFormat
from partition.security_spec import SECURITY_FIELDS, SecuritySpec
from partition.units import parse_bandwidth, parse_duration, parse_size

_T = TypeVar("_T")

_TOP_FIELDS = ("nodes", "links", "media", "source", "sink", "security")
_NODE_FIELDS = ("name", "address", "memory", "speed", "threads", "quantize")
_LINKS_FIELDS = ("default", "overrides")
_DEFAULT_FIELDS = ("bandwidth", "latency")
_OVERRIDE_FIELDS = ("from", "to", "bandwidth", "latency")
_MEDIUM_FIELDS = ("name", "bandwidth", "nodes")
_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class NodeSpec:
    """One device: where its worker listens, how much memory it offers, how fast it is.

    ``speed`` is relative to the planning machine and used only when the node cannot be
    profiled; ``threads`` is the thread count its worker runs stages with; ``quantize`` is
    how its stages store weights (``None``: the planner's default).
    """

    name: str
    address: str
    memory_bytes: int
    threads: int | None = None
    speed: float | None = None
    quantize: WeightFormat | None = None


@dataclass(frozen=True)
class LinkSpec:
    """A one-way link: bandwidth in bytes per second and latency in seconds."""

    bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class MediumSpec:
    """A shared medium (one Wi-Fi access point's airtime, a half-duplex radio): its
    bandwidth in bytes per second and the nodes on it.

    A transfer between two nodes uses the medium once for each of its ends on it (station
    to access point to station costs twice its bytes in airtime) and keeps it busy its
    bytes over the bandwidth per use; the link between the two nodes limits it too.
    """

    name: str
    bytes_per_s: float
    nodes: tuple[str, ...]

    def uses(self, a: str, b: str) -> int:
        """How many times a transfer from ``a`` to ``b`` crosses this medium (0 to 2)."""
        return 0 if a == b else (a in self.nodes) + (b in self.nodes)


_SELF_LINK = LinkSpec(math.inf, 0.0)

WORKER_OVERHEAD_BYTES = 330 * 1024**2
"""Resident memory of an ``edge-node`` before any stage, taken off a node's memory when the
node does not report its own (``Describe``): 327 MiB measured for a worker started with
``--threads 1`` on x86-64 Linux, Python 3.11, torch 2.13.0+cpu (mostly torch's libraries)."""


@dataclass(frozen=True)
class ClusterSpec:
    """Nodes in file order, the link between every ordered pair, the source and the sink.

    ``links`` holds every override in both directions (a reverse given explicitly wins);
    any other pair uses ``default_link``, which the loader requires whenever a pair is left.
    ``media`` are the shared media; a node is on one of them at most.
    """

    nodes: tuple[NodeSpec, ...]
    default_link: LinkSpec | None
    links: Mapping[tuple[str, str], LinkSpec]
    source: str
    sink: str
    security: SecuritySpec | None = None
    media: tuple[MediumSpec, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.nodes)

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``; raises :class:`KeyError` if there is none."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def link(self, a: str, b: str) -> LinkSpec:
        """The link from ``a`` to ``b``; a node's link to itself is free."""
        self.node(a)
        self.node(b)
        if a == b:
            return _SELF_LINK
        found = self.links.get((a, b), self.default_link)
        if found is None:
            raise KeyError((a, b))
        return found


class ClusterArrays(NamedTuple):
    """The cluster's part of a :class:`~partition.costs.CostModel`, indexed by node."""

    node_names: tuple[str, ...]
    node_memory_bytes: np.ndarray
    link_bytes_per_s: np.ndarray
    link_latency_s: np.ndarray
    source: int
    sink: int


def cost_arrays(cluster: ClusterSpec) -> ClusterArrays:
    """Node memory and ``(N, N)`` link matrices; the diagonal is free (inf bandwidth, 0 s)."""
    names = cluster.names
    bandwidth = np.empty((len(names), len(names)))
    latency = np.empty((len(names), len(names)))
    for a, src in enumerate(names):
        for b, dst in enumerate(names):
            link = cluster.link(src, dst)
            bandwidth[a, b] = link.bytes_per_s
            latency[a, b] = link.latency_s
    memory = np.array([node.memory_bytes for node in cluster.nodes], dtype=np.int64)
    return ClusterArrays(
        names, memory, bandwidth, latency, names.index(cluster.source), names.index(cluster.sink)
    )


def memory_for_stages(cluster: ClusterSpec, overheads: Mapping[str, int]) -> ClusterSpec:
    """``cluster`` with each node's memory less its worker's own resident memory
    (``overheads[name]`` as the node reported it, else :data:`WORKER_OVERHEAD_BYTES`): the
    memory its stage may use, 0 if the worker alone fills it."""
    nodes = tuple(
        replace(node, memory_bytes=max(
            0, node.memory_bytes - overheads.get(node.name, WORKER_OVERHEAD_BYTES)))
        for node in cluster.nodes
    )
    return replace(cluster, nodes=nodes)


def with_default_quantize(cluster: ClusterSpec, default: WeightFormat) -> ClusterSpec:
    """``cluster`` with ``default`` as the weight format of every node that sets none."""
    nodes = tuple(node if node.quantize else replace(node, quantize=default)
                  for node in cluster.nodes)
    return replace(cluster, nodes=nodes)


def every_node_quantized(cluster: ClusterSpec, fmt: WeightFormat) -> ClusterSpec:
    """``cluster`` with ``fmt`` as every node's weight format."""
    return replace(cluster, nodes=tuple(replace(node, quantize=fmt) for node in cluster.nodes))


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and check ``nodes.yaml``.

    Raises
    ------
    ClusterSpecError
        The file is missing, empty, not YAML, or any field is wrong.
    """
    origin = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClusterSpecError(f"{origin}: no such file") from None
    except OSError as err:
        raise ClusterSpecError(f"{origin}: cannot read the file ({err.strerror})") from err
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ClusterSpecError(f"{origin}: {where}YAML syntax error: {problem}") from err
    if data is None:
        raise ClusterSpecError(f"{origin}: the file is empty; it needs a 'nodes' list")
    return parse_cluster(data, origin, Path(path).parent)


def parse_cluster(data: object, origin: str, base_dir: Path = Path()) -> ClusterSpec:
    """Check already-parsed YAML ``data``; ``origin`` names it in error messages, and
    relative paths in its ``security`` block are relative to ``base_dir``.

    Raises
    ------
    ClusterSpecError
        Any field is unknown, missing, of the wrong kind or out of range.
    """
    return _Parser(origin, base_dir).cluster(data)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Parser:
    def __init__(self, origin: str, base_dir: Path) -> None:
        self.origin = origin
        self.base_dir = base_dir

    def fail(self, path: str, message: str) -> ClusterSpecError:
        return ClusterSpecError(f"{self.origin}: {path}: {message}" if path else
                                f"{self.origin}: {message}")

    def mapping(self, data: object, path: str, fields: tuple[str, ...]) -> dict[str, object]:
        if not isinstance(data, dict):
            raise self.fail(path, f"{data!r} is not a mapping (expected fields: "
                                  f"{', '.join(fields)})")
        for key in data:
            if key not in fields:
                name = key if isinstance(key, str) and key.isidentifier() else repr(key)
                where = f"{path}.{name}" if path else name
                raise self.fail(where, f"unknown field {key!r} (expected one of: "
                                       f"{', '.join(fields)})")
        return data

    def required(self, data: dict[str, object], path: str, key: str) -> object:
        if data.get(key) is None:
            raise self.fail(path, f"missing field {key!r}")
        return data[key]

    def unit(self, value: object, path: str, parse: Callable[[object], _T]) -> _T:
        try:
            return parse(value)
        except ValueError as err:
            raise self.fail(path, str(err)) from None

    def cluster(self, data: object) -> ClusterSpec:
        if not isinstance(data, dict):
            raise self.fail("", f"the top level must be a mapping with a 'nodes' list, "
                                f"not {type(data).__name__}")
        top = self.mapping(data, "", _TOP_FIELDS)
        raw_nodes = top.get("nodes")
        if not isinstance(raw_nodes, list) or not raw_nodes:
            raise self.fail("nodes", f"{raw_nodes!r} is not a non-empty list of nodes")
        nodes = tuple(self.node(raw, f"nodes[{i}]") for i, raw in enumerate(raw_nodes))
        names = [node.name for node in nodes]
        for i, name in enumerate(names):
            if name in names[:i]:
                first = names.index(name)
                raise self.fail(f"nodes[{i}].name", f"{name!r} is used by nodes[{first}] "
                                                     f"already; names must be unique")
        default, links = self.links(top.get("links"), names)
        source = self.node_ref(top.get("source", names[0]), "source", names)
        sink = self.node_ref(top.get("sink", names[0]), "sink", names)
        security = None if top.get("security") is None else self.security(top["security"])
        media = self.media(top.get("media"), names)
        return ClusterSpec(nodes, default, links, source, sink, security, media)

    def media(self, data: object, names: list[str]) -> tuple[MediumSpec, ...]:
        if data is None:
            return ()
        if not isinstance(data, list):
            raise self.fail("media", f"{data!r} is not a list of media")
        media: list[MediumSpec] = []
        on: dict[str, str] = {}
        for i, raw in enumerate(data):
            path = f"media[{i}]"
            fields = self.mapping(raw, path, _MEDIUM_FIELDS)
            name = self.required(fields, path, "name")
            if not isinstance(name, str) or not name.strip() or not name.isprintable():
                raise self.fail(f"{path}.name", f"{name!r} is not a name (printable text)")
            if any(medium.name == name for medium in media):
                raise self.fail(f"{path}.name", f"{name!r} is used by another medium already; "
                                                f"names must be unique")
            raw_bandwidth = self.required(fields, path, "bandwidth")
            bandwidth = self.unit(raw_bandwidth, f"{path}.bandwidth", parse_bandwidth)
            if not 0 < bandwidth < math.inf:
                raise self.fail(f"{path}.bandwidth", f"{raw_bandwidth!r} must be positive "
                                                     f"and finite")
            members = self.required(fields, path, "nodes")
            if not isinstance(members, list) or not members:
                raise self.fail(f"{path}.nodes", f"{members!r} is not a non-empty list of "
                                                 f"node names")
            for k, member in enumerate(members):
                where = f"{path}.nodes[{k}]"
                self.node_ref(member, where, names)
                if member in on:
                    raise self.fail(where, f"{member!r} is on medium {on[member]!r} already; "
                                           f"a node may be on one medium only")
                on[member] = name
            media.append(MediumSpec(name, bandwidth, tuple(members)))
        return tuple(media)

    def security(self, data: object) -> SecuritySpec:
        fields = self.mapping(data, "security", SECURITY_FIELDS)
        paths = {key: self.existing_file(fields[key], f"security.{key}")
                 for key in SECURITY_FIELDS if fields.get(key) is not None}
        given = [key for key in ("ca", "cert", "key") if key in paths]
        if given and len(given) < 3:
            missing = next(key for key in ("ca", "cert", "key") if key not in paths)
            raise self.fail(f"security.{missing}", "missing; TLS needs ca, cert and key "
                                                   "together (see `coordinator certs`)")
        if not paths:
            raise self.fail("security", "empty; give ca, cert and key for TLS, and/or "
                                        "token_file")
        return SecuritySpec(**paths)

    def existing_file(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(path, f"{value!r} is not a file path")
        resolved = (self.base_dir / value).resolve()
        if not resolved.is_file():
            raise self.fail(path, f"{str(resolved)!r} does not exist")
        return str(resolved)

    def node(self, data: object, path: str) -> NodeSpec:
        fields = self.mapping(data, path, _NODE_FIELDS)
        name = self.required(fields, path, "name")
        if not isinstance(name, str) or not name.strip() or not name.isprintable():
            raise self.fail(f"{path}.name", f"{name!r} is not a name (printable text)")
        address = self.required(fields, path, "address")
        match = _ADDRESS.match(address) if isinstance(address, str) else None
        if match is None or not 0 < int(match["port"]) < 65536:
            raise self.fail(f"{path}.address", f"{address!r} is not host:port "
                                               f"(example: 127.0.0.1:50051)")
        memory = self.unit(self.required(fields, path, "memory"), f"{path}.memory", parse_size)
        if memory <= 0:
            raise self.fail(f"{path}.memory", f"{fields['memory']!r} must be positive")
        threads = fields.get("threads")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0
        ):
            raise self.fail(f"{path}.threads", f"{threads!r} is not a positive integer")
        speed = fields.get("speed")
        if speed is not None and (
            isinstance(speed, bool) or not isinstance(speed, int | float)
            or not math.isfinite(speed) or speed <= 0
        ):
            raise self.fail(f"{path}.speed", f"{speed!r} is not a positive number")
        quantize = fields.get("quantize")
        formats = [fmt.value for fmt in WeightFormat]
        if quantize is not None and quantize not in formats:
            raise self.fail(f"{path}.quantize", f"{quantize!r} is not a weight format "
                                                f"(one of: {', '.join(formats)})")
        return NodeSpec(name, address, memory, threads,
                        None if speed is None else float(speed),
                        None if quantize is None else WeightFormat(quantize))

    def node_ref(self, value: object, path: str, names: list[str]) -> str:
        if value not in names:
            raise self.fail(path, f"{value!r} is not a node (nodes: {', '.join(names)})")
        return value

    def link(self, data: dict[str, object], path: str, base: LinkSpec | None) -> LinkSpec:
        if base is None:
            self.required(data, path, "bandwidth")
            self.required(data, path, "latency")
        bandwidth = (base.bytes_per_s if data.get("bandwidth") is None else
                     self.unit(data["bandwidth"], f"{path}.bandwidth", parse_bandwidth))
        if not bandwidth > 0:
            raise self.fail(f"{path}.bandwidth", f"{data['bandwidth']!r} must be positive")
        latency = (base.latency_s if data.get("latency") is None else
                   self.unit(data["latency"], f"{path}.latency", parse_duration))
        if latency < 0:
            raise self.fail(f"{path}.latency", f"{data['latency']!r} must not be negative")
        return LinkSpec(bandwidth, latency)

    def links(
        self, data: object, names: list[str]
    ) -> tuple[LinkSpec | None, dict[tuple[str, str], LinkSpec]]:
        section = {} if data is None else self.mapping(data, "links", _LINKS_FIELDS)
        default = None
        if section.get("default") is not None:
            fields = self.mapping(section["default"], "links.default", _DEFAULT_FIELDS)
            default = self.link(fields, "links.default", None)
        overrides = section.get("overrides") or []
        if not isinstance(overrides, list):
            raise self.fail("links.overrides", f"{overrides!r} is not a list of links")
        given: dict[tuple[str, str], LinkSpec] = {}
        for i, raw in enumerate(overrides):
            path = f"links.overrides[{i}]"
            fields = self.mapping(raw, path, _OVERRIDE_FIELDS)
            src = self.node_ref(self.required(fields, path, "from"), f"{path}.from", names)
            dst = self.node_ref(self.required(fields, path, "to"), f"{path}.to", names)
            if src == dst:
                raise self.fail(f"{path}.to", f"{dst!r} is the 'from' node too; a node's link "
                                              f"to itself is free and cannot be set")
            if (src, dst) in given:
                raise self.fail(path, f"the link {src} -> {dst} is given twice")
            given[(src, dst)] = self.link(fields, path, default)
        links = dict(given)
        for (src, dst), link in given.items():
            links.setdefault((dst, src), link)
        if default is None:
            missing = [(a, b) for a in names for b in names if a != b and (a, b) not in links]
            if missing:
                a, b = missing[0]
                raise self.fail("links.default", f"missing, and the link {a} -> {b} is not "
                                                 f"in links.overrides; add a default link")
        return default, links

"""Plain data exchanged with a node, and its one conversion to and from protobuf."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from node.config import Device
from node.link import NO_EMULATION, LinkEmulation, MediumUse
from node.rpc import edgesplit_pb2 as pb
from partition.compression import LinkEncoding

_DEVICE_TO_PROTO = {
    Device.CPU: pb.DEVICE_CPU,
    Device.CUDA: pb.DEVICE_CUDA,
    Device.MPS: pb.DEVICE_MPS,
}
_DEVICE_FROM_PROTO = {value: device for device, value in _DEVICE_TO_PROTO.items()}
_ENCODING_TO_PROTO = {
    LinkEncoding.RAW: pb.ENCODING_RAW,
    LinkEncoding.FP16: pb.ENCODING_FP16,
    LinkEncoding.BF16: pb.ENCODING_BF16,
    LinkEncoding.INT8: pb.ENCODING_INT8,
    LinkEncoding.INT8_CHANNEL: pb.ENCODING_INT8_CHANNEL,
}
_ENCODING_FROM_PROTO = {value: encoding for encoding, value in _ENCODING_TO_PROTO.items()}


class FailureCode(Enum):
    """Why a request got no result."""

    INVALID_ARGUMENT = pb.FAILURE_CODE_INVALID_ARGUMENT
    """The frame does not match the stage's signature."""
    STAGE_FAILED = pb.FAILURE_CODE_STAGE_FAILED
    """The stage program raised."""


@dataclass(frozen=True)
class Failure:
    """The answer to a request that failed, and where it failed."""

    request_id: int
    code: FailureCode
    message: str
    node: str
    stage_index: int

    def to_proto(self) -> pb.Failure:
        return pb.Failure(**_field_values(self, Failure) | {"code": self.code.value})

    @classmethod
    def from_proto(cls, msg: pb.Failure) -> Failure:
        return cls(**_field_values(msg, cls) | {"code": FailureCode(msg.code)})


@dataclass(frozen=True)
class StageInfo:
    """The stage a node has loaded."""

    index: int
    sha256: str
    size_bytes: int
    calibrated_seconds: float = 0.0
    """The stage's real compute time on the node's host, timed as it loaded."""

    def to_proto(self) -> pb.LoadedStage:
        return pb.LoadedStage(**_field_values(self, StageInfo))

    @classmethod
    def from_proto(cls, msg: pb.LoadedStage) -> StageInfo:
        return cls(**_field_values(msg, cls))


@dataclass(frozen=True)
class NodeInfo:
    """What a node is and what it is doing (the answer to ``Describe``)."""

    name: str
    hostname: str
    cpu_model: str
    cpu_count: int
    torch_threads: int
    memory_total_bytes: int
    memory_available_bytes: int
    torch_version: str
    device: Device
    speed_factor: float
    stage: StageInfo | None
    requests_served: int
    queue_depth: int
    p50_stage_seconds: float
    bytes_sent: int
    resident_overhead_bytes: int
    outbound_links: tuple[OutboundLink, ...] = ()

    def outbound_link(self, node: str | None) -> OutboundLink | None:
        """The outbound link to ``node`` (``None``: to the Results stream), if wired."""
        for link in self.outbound_links:
            if link.node == node:
                return link
        return None

    def to_proto(self) -> pb.NodeInfo:
        return pb.NodeInfo(
            **_field_values(self, NodeInfo)
            | {
                "device": _DEVICE_TO_PROTO[self.device],
                "stage": self.stage.to_proto() if self.stage else None,
                "outbound_links": [link.to_proto() for link in self.outbound_links],
            }
        )

    @classmethod
    def from_proto(cls, msg: pb.NodeInfo) -> NodeInfo:
        return cls(
            **_field_values(msg, cls)
            | {
                "device": _DEVICE_FROM_PROTO[msg.device],
                "stage": StageInfo.from_proto(msg.stage) if msg.HasField("stage") else None,
                "outbound_links": tuple(OutboundLink.from_proto(link)
                                        for link in msg.outbound_links),
            }
        )


@dataclass(frozen=True)
class OutboundLink:
    """One of a node's outbound links: to ``node``, or (``None``) to the Results stream;
    the frames dealt to it, and the frames measured on it with their median throughput and
    busy time."""

    node: str | None
    frames_dealt: int
    link_frames: int
    link_bytes_per_s: float
    link_p50_seconds: float

    def to_proto(self) -> pb.OutboundLink:
        return pb.OutboundLink(**_field_values(self, OutboundLink) | {"node": self.node or ""})

    @classmethod
    def from_proto(cls, msg: pb.OutboundLink) -> OutboundLink:
        return cls(**_field_values(msg, cls) | {"node": msg.node or None})


@dataclass(frozen=True)
class Hop:
    """A node of the next stage: its address, name, share of the frames, and the emulation
    of the link to it."""

    address: str
    node: str
    share: float = 1.0
    link: LinkEmulation = NO_EMULATION

    def to_proto(self) -> pb.NextHop:
        return pb.NextHop(address=self.address, node=self.node, share=self.share,
                          link=link_to_proto(self.link))

    @classmethod
    def from_proto(cls, msg: pb.NextHop) -> Hop:
        return cls(msg.address, msg.node, msg.share, link_from_proto(msg.link))


@dataclass(frozen=True)
class Wiring:
    """What ``Wire`` tells a node: the next stage's nodes (none: results go to the Results
    subscribers, over the ``outbound`` link to the sink), the previous stage's nodes (the
    only ones that may send it frames, with TLS), the link from the source (first stage
    only) and the encoding of the hop out."""

    next_hops: tuple[Hop, ...] = ()
    previous_nodes: tuple[str, ...] = ()
    outbound: LinkEmulation = NO_EMULATION
    inbound: LinkEmulation = NO_EMULATION
    encoding: LinkEncoding = LinkEncoding.RAW

    def to_proto(self) -> pb.WireRequest:
        return pb.WireRequest(
            next_hops=[hop.to_proto() for hop in self.next_hops],
            previous_nodes=list(self.previous_nodes),
            outbound=link_to_proto(self.outbound), inbound=link_to_proto(self.inbound),
            outbound_encoding=encoding_to_proto(self.encoding),
        )


def link_to_proto(link: LinkEmulation) -> pb.LinkEmulation:
    return pb.LinkEmulation(**_field_values(link, LinkEmulation) | {
        "media": [pb.MediumUse(**_field_values(use, MediumUse)) for use in link.media]})


def link_from_proto(msg: pb.LinkEmulation) -> LinkEmulation:
    return LinkEmulation(**_field_values(msg, LinkEmulation) | {
        "media": tuple(MediumUse(**_field_values(use, MediumUse)) for use in msg.media)})


def encoding_to_proto(encoding: LinkEncoding) -> int:
    return _ENCODING_TO_PROTO[encoding]


def encoding_from_proto(value: int) -> LinkEncoding | None:
    """The encoding a proto enum value names, or ``None`` if it is unknown here."""
    return _ENCODING_FROM_PROTO.get(value)


def _field_values(source: object, cls: type) -> dict[str, Any]:
    """``source``'s attributes named like the fields of the dataclass ``cls`` (the messages
    name their fields like the dataclasses do)."""
    return {field.name: getattr(source, field.name) for field in fields(cls)}

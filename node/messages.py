"""Plain data exchanged with a node, and its one conversion to and from protobuf."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from node.config import Device
from node.link import LinkEmulation
from node.rpc import edgesplit_pb2 as pb

_DEVICE_TO_PROTO = {
    Device.CPU: pb.DEVICE_CPU,
    Device.CUDA: pb.DEVICE_CUDA,
    Device.MPS: pb.DEVICE_MPS,
}
_DEVICE_FROM_PROTO = {value: device for device, value in _DEVICE_TO_PROTO.items()}


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
        return pb.Failure(
            request_id=self.request_id,
            code=self.code.value,
            message=self.message,
            node=self.node,
            stage_index=self.stage_index,
        )

    @classmethod
    def from_proto(cls, msg: pb.Failure) -> Failure:
        return cls(msg.request_id, FailureCode(msg.code), msg.message, msg.node, msg.stage_index)


@dataclass(frozen=True)
class StageInfo:
    """The stage a node has loaded."""

    index: int
    sha256: str
    size_bytes: int

    def to_proto(self) -> pb.LoadedStage:
        return pb.LoadedStage(index=self.index, sha256=self.sha256, size_bytes=self.size_bytes)

    @classmethod
    def from_proto(cls, msg: pb.LoadedStage) -> StageInfo:
        return cls(msg.index, msg.sha256, msg.size_bytes)


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

    def to_proto(self) -> pb.NodeInfo:
        return pb.NodeInfo(
            name=self.name,
            hostname=self.hostname,
            cpu_model=self.cpu_model,
            cpu_count=self.cpu_count,
            torch_threads=self.torch_threads,
            memory_total_bytes=self.memory_total_bytes,
            memory_available_bytes=self.memory_available_bytes,
            torch_version=self.torch_version,
            device=_DEVICE_TO_PROTO[self.device],
            speed_factor=self.speed_factor,
            stage=self.stage.to_proto() if self.stage else None,
            requests_served=self.requests_served,
            queue_depth=self.queue_depth,
            p50_stage_seconds=self.p50_stage_seconds,
        )

    @classmethod
    def from_proto(cls, msg: pb.NodeInfo) -> NodeInfo:
        return cls(
            name=msg.name,
            hostname=msg.hostname,
            cpu_model=msg.cpu_model,
            cpu_count=msg.cpu_count,
            torch_threads=msg.torch_threads,
            memory_total_bytes=msg.memory_total_bytes,
            memory_available_bytes=msg.memory_available_bytes,
            torch_version=msg.torch_version,
            device=_DEVICE_FROM_PROTO[msg.device],
            speed_factor=msg.speed_factor,
            stage=StageInfo.from_proto(msg.stage) if msg.HasField("stage") else None,
            requests_served=msg.requests_served,
            queue_depth=msg.queue_depth,
            p50_stage_seconds=msg.p50_stage_seconds,
        )


def link_to_proto(link: LinkEmulation) -> pb.LinkEmulation:
    return pb.LinkEmulation(bytes_per_s=link.bytes_per_s, latency_s=link.latency_s)


def link_from_proto(msg: pb.LinkEmulation) -> LinkEmulation:
    return LinkEmulation(bytes_per_s=msg.bytes_per_s, latency_s=msg.latency_s)

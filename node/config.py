"""The worker's configuration."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from node.rpc_options import MAX_MESSAGE_BYTES
from node.security import Security
from node.sysinfo import memory_bytes

UPLOAD_STALL_S = 10.0
"""Default time an upload may go without a chunk before the node cancels it."""

RESULTS_STALL_S = 10.0
"""Default time a full results buffer may go unread before the node cuts its reader."""


class Device(StrEnum):
    """Where a node runs its stage."""

    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


def default_max_stage_bytes() -> int:
    """Half of this machine's memory: the largest upload a node accepts by default."""
    return memory_bytes()[0] // 2


def best_device() -> Device:
    """CUDA if available, else MPS if available, else the CPU."""
    if torch.cuda.is_available():
        return Device.CUDA
    if torch.backends.mps.is_available():
        return Device.MPS
    return Device.CPU


@dataclass(frozen=True)
class NodeConfig:
    """How one ``edge-node`` runs.

    ``speed_factor`` emulates a slower device: each stage's compute is stretched to take
    ``1 / speed_factor`` times as long (0.5 = half as fast), by sleeping, not by burning CPU.
    ``threads`` of ``None`` keeps torch's default thread count. ``max_stage_bytes`` bounds
    a stage artifact or model file sent to the node, ``upload_stall_s`` how long an upload
    may go without a chunk, and ``results_stall_s`` how long a full results buffer may go
    unread before its reader is cut off. ``security`` of ``None`` serves without TLS or token.
    ``media`` maps each shared medium's name to its arbiter's ``host:port``
    (:mod:`node.arbiter`): the media this node's emulated links may cross.
    """

    listen: str
    name: str = field(default_factory=socket.gethostname)
    threads: int | None = None
    device: Device = field(default_factory=best_device)
    speed_factor: float = 1.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_stage_bytes: int = field(default_factory=default_max_stage_bytes)
    upload_stall_s: float = UPLOAD_STALL_S
    results_stall_s: float = RESULTS_STALL_S
    security: Security | None = None
    media: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.speed_factor <= 1:
            raise ValueError(
                f"speed factor must be in (0, 1], got {self.speed_factor}: sleeping can make "
                "a device slower, not faster; give the fastest node 1"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.max_stage_bytes < 1:
            raise ValueError(f"max stage bytes must be positive, got {self.max_stage_bytes}")
        for label, seconds in (("upload", self.upload_stall_s), ("results", self.results_stall_s)):
            if not seconds > 0:
                raise ValueError(f"the {label} stall time must be positive, got {seconds}")

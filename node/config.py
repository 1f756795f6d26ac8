"""The worker's configuration."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from node.rpc_options import MAX_MESSAGE_BYTES
from node.security import Security


class Device(StrEnum):
    """Where a node runs its stage."""

    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


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
    ``threads`` of ``None`` keeps torch's default thread count. ``security`` of ``None``
    serves without TLS or token.
    """

    listen: str
    name: str = field(default_factory=socket.gethostname)
    threads: int | None = None
    device: Device = field(default_factory=best_device)
    speed_factor: float = 1.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    security: Security | None = None

    def __post_init__(self) -> None:
        if not 0 < self.speed_factor <= 1:
            raise ValueError(
                f"speed factor must be in (0, 1], got {self.speed_factor}: sleeping can make "
                "a device slower, not faster; give the fastest node 1"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")

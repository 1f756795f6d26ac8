"""Profiling a model on this node, as the node's (possibly emulated) device would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from node.errors import ArtifactError
from node.loading import MAX_UPLOAD_BYTES
from node.rpc import edgesplit_pb2 as pb
from partition.profile_store import profile_model_bytes
from partition.profiler import Profile


@dataclass(frozen=True)
class ProfileOptions:
    """How to profile: the layer granularity, torch threads, timed repeats and warm-ups."""

    granularity: str
    threads: int
    repeats: int
    warmup: int


async def receive_model(
    chunks: AsyncIterator[pb.ProfileChunk], max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[ProfileOptions, bytes]:
    """Collect a ``Profile`` stream into ``(options, model file bytes)``."""
    first = await anext(chunks, None)
    if first is None or not first.HasField("options"):
        raise ArtifactError("Profile stream must start with a chunk carrying the options")
    msg = first.options
    options = ProfileOptions(msg.granularity, msg.threads, msg.repeats, msg.warmup)
    data = bytearray(first.data)
    async for chunk in chunks:
        data += chunk.data
        if len(data) > max_bytes:
            raise ArtifactError(f"model file exceeds {max_bytes} bytes")
    return options, bytes(data)


def profile_on_node(data: bytes, options: ProfileOptions, speed_factor: float) -> dict[str, Any]:
    """Profile the model file ``data`` here, scaled to the emulated speed (blocking)."""
    profile = profile_model_bytes(
        data,
        granularity=options.granularity,
        threads=options.threads,
        repeats=options.repeats,
        warmup=options.warmup,
    )
    return scale_profile(profile, speed_factor)


def scale_profile(profile: dict[str, Any], speed_factor: float) -> dict[str, Any]:
    """The profile a device ``speed_factor`` times as fast would measure (emulation)."""
    if speed_factor == 1:
        return profile
    return Profile.from_dict(profile).scaled(speed_factor).to_dict()

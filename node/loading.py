"""Receiving a stage artifact (or a model file) in chunks, within the node's limits.

An upload is refused as soon as it breaks a limit: a declared size over ``max_bytes`` before
any chunk is read, a byte past the declared size (or past ``max_bytes``) as it arrives, and
an upload that sends no chunk for ``stall_s`` seconds. What was received is dropped with the
refusal.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from node.errors import ArtifactError, LimitError
from node.rpc import edgesplit_pb2 as pb
from partition.spec import StageSpec


class Chunk(Protocol):
    """A chunk of an upload: ``StageChunk`` or ``ProfileChunk``."""

    data: bytes


C = TypeVar("C", bound=Chunk)


async def next_chunk(chunks: AsyncIterator[C], stall_s: float) -> C | None:
    """The next chunk, or ``None`` at the end of the stream.

    Raises
    ------
    LimitError
        If no chunk arrives within ``stall_s`` seconds.
    """
    try:
        async with asyncio.timeout(stall_s):
            return await anext(chunks, None)
    except TimeoutError:
        raise LimitError(
            f"the upload sent nothing for {stall_s:g} s, so the node cancelled it; "
            "send the chunks without pausing"
        ) from None


async def collect_upload(
    first: bytes, chunks: AsyncIterator[Chunk], *, max_bytes: int, stall_s: float,
    too_long: str,
) -> bytes:
    """``first`` followed by the data of every remaining chunk, at most ``max_bytes``.

    Raises
    ------
    LimitError
        With the message ``too_long`` if the data grows past ``max_bytes``; if a chunk takes
        longer than ``stall_s`` seconds to arrive.
    """
    parts = [first]
    received = len(first)
    try:
        while (chunk := await next_chunk(chunks, stall_s)) is not None:
            received += len(chunk.data)
            if received > max_bytes:
                raise LimitError(too_long)
            parts.append(chunk.data)
        return b"".join(parts)
    finally:
        parts.clear()  # a refusal's traceback must not keep what arrived


async def receive_artifact(
    chunks: AsyncIterator[pb.StageChunk], *, max_bytes: int, stall_s: float
) -> tuple[StageSpec, bytes]:
    """Collect a ``LoadStage`` stream into ``(spec, artifact)``, checking size and hash.

    Raises
    ------
    LimitError
        If the header declares more than ``max_bytes``, more bytes arrive than it declares,
        or the stream stalls for ``stall_s`` seconds.
    ArtifactError
        If the header is missing or unreadable, the artifact is shorter than the header
        says, or its SHA-256 differs.
    """
    first = await next_chunk(chunks, stall_s)
    if first is None or not first.HasField("header"):
        raise ArtifactError("LoadStage stream must start with a chunk carrying the header")
    header = first.header
    spec = _parse_spec(header.spec_json)
    if header.sha256 != spec.artifact_sha256:
        raise ArtifactError(
            f"header hash {header.sha256!r} differs from the stage spec's "
            f"{spec.artifact_sha256!r}"
        )
    if header.total_bytes > max_bytes:
        raise LimitError(
            f"the stage artifact declares {header.total_bytes} bytes, more than this node's "
            f"limit of {max_bytes} (edge-node --max-stage-bytes); plan for a larger node"
        )
    data = await collect_upload(
        first.data, chunks, max_bytes=header.total_bytes, stall_s=stall_s,
        too_long=f"the artifact is longer than the {header.total_bytes} bytes its header declares",
    )
    if len(data) != header.total_bytes:
        raise ArtifactError(
            f"artifact is truncated: {len(data)} of {header.total_bytes} bytes arrived"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != header.sha256:
        raise ArtifactError(
            f"artifact hash mismatch: expected {header.sha256!r}, got {digest!r}; "
            "the file changed or was corrupted in transit"
        )
    return spec, data


def _parse_spec(spec_json: str) -> StageSpec:
    try:
        return StageSpec.from_dict(json.loads(spec_json))
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"stage spec in the LoadStage header is unreadable ({err!r})") from err

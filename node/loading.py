"""Receiving a stage artifact in chunks and checking it before it is loaded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator

from node.errors import ArtifactError
from node.rpc import edgesplit_pb2 as pb
from partition.spec import StageSpec

MAX_UPLOAD_BYTES = 8 * 1024**3
"""Largest stage artifact or model file a node accepts."""


async def receive_artifact(
    chunks: AsyncIterator[pb.StageChunk], max_bytes: int = MAX_UPLOAD_BYTES
) -> tuple[StageSpec, bytes]:
    """Collect a ``LoadStage`` stream into ``(spec, artifact)``, checking size and hash.

    Raises
    ------
    ArtifactError
        If the header is missing or unreadable, the artifact is larger than the header
        says (or than ``max_bytes``), shorter than it says, or its SHA-256 differs.
    """
    first = await anext(chunks, None)
    if first is None or not first.HasField("header"):
        raise ArtifactError("LoadStage stream must start with a chunk carrying the header")
    header = first.header
    spec = _parse_spec(header.spec_json)
    if header.sha256 != spec.artifact_sha256:
        raise ArtifactError(
            f"header hash {header.sha256} differs from the stage spec's {spec.artifact_sha256}"
        )
    if header.total_bytes > max_bytes:
        raise ArtifactError(f"artifact of {header.total_bytes} bytes exceeds {max_bytes}")
    data = bytearray(first.data)
    async for chunk in chunks:
        data += chunk.data
        if len(data) > header.total_bytes:
            raise ArtifactError(f"artifact is longer than the {header.total_bytes} bytes declared")
    if len(data) != header.total_bytes:
        raise ArtifactError(
            f"artifact is truncated: {len(data)} of {header.total_bytes} bytes arrived"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != header.sha256:
        raise ArtifactError(
            f"artifact hash mismatch: expected {header.sha256}, got {digest}; "
            "the file changed or was corrupted in transit"
        )
    return spec, bytes(data)


def _parse_spec(spec_json: str) -> StageSpec:
    try:
        return StageSpec.from_dict(json.loads(spec_json))
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"stage spec in the LoadStage header is unreadable ({err!r})") from err

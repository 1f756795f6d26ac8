"""Crafted archives sent to a real ``edge-node`` (LoadStage, Profile) run no code there:
the node answers INVALID_ARGUMENT naming the entry, keeps serving, and no marker appears."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import crafted_archives
import pytest
import torch
from cluster_helpers import (
    CHAIN_SHAPE,
    NodeProcess,
    make_stage,
    running_node,
)
from crafted_archives import KINDS

from node.client import GrpcWorkerHandle
from node.errors import NodeRejectedError
from node.profiling import ProfileOptions
from partition.artifact import sha256
from partition.spec import TensorSpec
from partition.split import StageArtifact


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the marker module lives (on the node's path) and crafted code would write."""
    return tmp_path_factory.mktemp("crafted")


@pytest.fixture(scope="module")
def node(marker_dir: Path) -> Iterator[NodeProcess]:
    """One node for every kind: a refusal must leave it serving the next call."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(marker_dir), os.environ.get("PYTHONPATH", "")])}
    with running_node("target", marker_dir / "node.log", env=env) as process:
        yield process


@pytest.fixture(scope="module")
def stage() -> StageArtifact:
    """A stage with weights, so that weight payloads can be crafted."""
    width = CHAIN_SHAPE[-1]
    return make_stage(torch.nn.Linear(width, width), index=0,
                      receives=TensorSpec("x", "float32", CHAIN_SHAPE),
                      sends=TensorSpec("a", "float32", CHAIN_SHAPE))


@pytest.fixture
async def handle(node: NodeProcess) -> AsyncIterator[GrpcWorkerHandle]:
    opened = GrpcWorkerHandle(node.address, node.name)
    yield opened
    await opened.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_crafted_stage_and_model_run_no_code_on_the_node(
    kind: str, marker_dir: Path, node: NodeProcess, handle: GrpcWorkerHandle, stage: StageArtifact
) -> None:
    marker = marker_dir / f"{kind}.marker"
    crafted_archives.write_marker_module(marker_dir, marker)
    data = KINDS[kind].make(stage.data, marker)
    spec = dataclasses.replace(stage.spec, artifact_sha256=sha256(data))

    with pytest.raises(NodeRejectedError, match="LoadStage \\(INVALID_ARGUMENT\\)") as caught:
        await handle.load_stage(spec, data)
    assert KINDS[kind].names in str(caught.value) and not marker.exists()

    with pytest.raises(NodeRejectedError, match="Profile \\(INVALID_ARGUMENT\\)") as caught:
        await handle.profile(data, ProfileOptions("auto", threads=1, repeats=1, warmup=0))
    assert KINDS[kind].names in str(caught.value) and not marker.exists()

    assert node.process.poll() is None
    info = await handle.load_stage(stage.spec, stage.data)
    assert info.sha256 == stage.spec.artifact_sha256
    assert not marker.exists()

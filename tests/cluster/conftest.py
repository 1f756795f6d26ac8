"""Fixtures that start real ``edge-node`` processes on 127.0.0.1 and always stop them."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_helpers import coordinator_in_process, edge_node_running
from cluster_helpers import (
    CHAIN_SHAPE,
    NodeProcess,
    Scale,
    Shift,
    Split,
    make_stage,
    spawn_node,
    split_in_three,
    stop_node_processes,
    three_node_cluster,
    wait_listening,
)

from coordinator.local_cluster import LocalCluster, LocalNode, read_state, stop_nodes
from coordinator.ports import free_ports
from partition.cluster import ClusterSpec
from partition.errors import EdgesplitError
from partition.spec import TensorSpec
from partition.split import StageArtifact


@pytest.fixture
def start_nodes(tmp_path: Path) -> Iterator[Callable[..., list[NodeProcess]]]:
    """``start_nodes(n, *extra_args)`` starts ``n`` nodes and waits until they listen.

    Every node started through it is stopped when the test ends, pass or fail.
    """
    started: list[NodeProcess] = []

    def start(count: int, *extra_args: str) -> list[NodeProcess]:
        nodes = []
        for port in free_ports(count):
            name = f"node{len(started)}"
            address = f"127.0.0.1:{port}"
            log_path = tmp_path / f"{name}.log"
            node = spawn_node(name, address, log_path, *extra_args)
            started.append(node)
            nodes.append(node)
        for node in nodes:
            wait_listening(node)
        return nodes

    try:
        yield start
    finally:
        stop_node_processes(started)


@pytest.fixture(scope="session")
def chain_stages() -> tuple[StageArtifact, StageArtifact]:
    """Two stages whose composition is ``x -> 2 * x + 3``, on float32 of :data:`CHAIN_SHAPE`."""
    x = TensorSpec("x", "float32", CHAIN_SHAPE)
    a = TensorSpec("a", "float32", CHAIN_SHAPE)
    b = TensorSpec("b", "float32", CHAIN_SHAPE)
    return (
        make_stage(Scale(2.0), index=0, receives=x, sends=a),
        make_stage(Shift(3.0), index=1, receives=a, sends=b),
    )


@pytest.fixture(scope="session")
def three_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSpec]:
    """Three real ``edge-node`` processes of :func:`three_node_cluster`, shared by the modules
    whose tests each deploy the plan they run; stopped when the session ends."""
    spec = three_node_cluster()
    with LocalCluster(spec, tmp_path_factory.mktemp("three-workers")):
        yield spec


@pytest.fixture(scope="session")
def three_stages(three_workers: ClusterSpec, sample_exported) -> Callable[[str], Split]:
    """``three_stages(name)``: :func:`split_in_three` of the sample over
    :func:`three_workers` (made once per model and session)."""
    return functools.cache(lambda name: split_in_three(three_workers, sample_exported(name)))


@pytest.fixture
def cli_env(tmp_path: Path, sample_cache_dir: Path) -> dict[str, str]:
    """The environment of ``coordinator`` subprocesses: a private state dir and cache."""
    return {
        **os.environ,
        "EDGESPLIT_STATE": str(tmp_path / "state"),
        "EDGESPLIT_CACHE": str(sample_cache_dir),
    }


@pytest.fixture
def coordinator_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``coordinator_here(*args)``: ``coordinator ARGS`` run in this process (see
    :func:`cli_helpers.coordinator_in_process`), with :func:`cli_env`'s state directory."""
    monkeypatch.setenv("EDGESPLIT_STATE", str(tmp_path / "state"))
    return functools.partial(coordinator_in_process, capsys)


@pytest.fixture
def up_nodes(tmp_path: Path) -> Iterator[list[LocalNode]]:
    """A list for the nodes ``coordinator up`` reports; whatever is still running of them, or
    of the state directory's record, is stopped when the test ends."""
    started: list[LocalNode] = []
    try:
        yield started
    finally:
        try:
            recorded = read_state(tmp_path / "state")
        except EdgesplitError:
            recorded = []
        stop_nodes([n for n in [*started, *recorded] if edge_node_running(n.pid)])

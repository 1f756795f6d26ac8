"""Fixtures that start real ``edge-node`` processes on 127.0.0.1 and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_helpers import (
    CHAIN_SHAPE,
    NodeProcess,
    Scale,
    Shift,
    make_stage,
    spawn_node,
    stop_node,
    wait_listening,
)

from coordinator.ports import free_ports
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
        for node in started:
            stop_node(node)


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

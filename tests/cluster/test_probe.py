"""``coordinator probe`` against real workers: it recovers a simulated cluster's emulated
links, writes a nodes.yaml the planner reads, names an unreachable node, and a node's Probe
cannot be turned against the node or an address that is not a worker."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import ok, one_error_line

from coordinator.local_cluster import LocalNode
from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle
from node.errors import NodeRejectedError
from node.probe import MAX_PROBE_BYTES, MAX_PROBE_ROUNDS, ProbeOptions
from partition.cluster import load_cluster

TOLERANCE = 0.15
"""How close a probe must come to an emulated link's bandwidth and latency."""


def write_nodes(path: Path, names: list[str]) -> Path:
    """A cluster of ``names`` on free ports: 100 Mbps / 2 ms links, but 20 Mbps / 5 ms
    between the first two (both ways)."""
    lines = ["nodes:"]
    lines += [f"  - {{name: {name}, address: '127.0.0.1:{port}', memory: 1GiB}}"
              for name, port in zip(names, free_ports(len(names)), strict=True)]
    lines += ["links:", "  default: {bandwidth: 100Mbps, latency: 2ms}", "  overrides:",
              f"    - {{from: {names[0]}, to: {names[1]}, bandwidth: 20Mbps, latency: 5ms}}",
              f"sink: {names[-1]}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_probe_recovers_the_emulated_links_and_writes_a_nodes_yaml(
    tmp_path: Path, coordinator_here, up_nodes: list[LocalNode],
) -> None:
    nodes = write_nodes(tmp_path / "nodes.yaml", ["camera", "gateway", "laptop"])
    out = ok(coordinator_here("up", nodes))
    for match in re.finditer(r"(\w+) listening on (\S+) \(pid (\d+), log (\S+)\)", out):
        up_nodes.append(LocalNode(match[1], match[2], int(match[3]), match[4]))
    measured_path = tmp_path / "measured.yaml"
    out = ok(coordinator_here("probe", nodes, "-o", measured_path))
    assert "through the emulated links" in out
    assert re.search(r"coordinator\s+│\s+camera \(source\)", out), out
    assert re.search(r"coordinator\s+│\s+laptop \(sink\)", out), out

    given, measured = load_cluster(nodes), load_cluster(measured_path)
    assert measured.nodes == given.nodes
    assert (measured.source, measured.sink) == (given.source, given.sink)
    pairs = [(a, b) for a in given.names for b in given.names if a != b]
    assert set(measured.links) == set(pairs)
    for a, b in pairs:
        want, got = given.link(a, b), measured.link(a, b)
        assert got.bytes_per_s == pytest.approx(want.bytes_per_s, rel=TOLERANCE), (a, b, got)
        assert got.latency_s == pytest.approx(want.latency_s, rel=TOLERANCE), (a, b, got)
    ok(coordinator_here("down"))


def test_probe_names_an_unreachable_node(
    tmp_path: Path, coordinator_here, start_nodes,
) -> None:
    [alive] = start_nodes(1)
    [dead_port] = free_ports(1)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(
        f"nodes:\n  - {{name: alive, address: '{alive.address}', memory: 1GiB}}\n"
        f"  - {{name: ghost, address: '127.0.0.1:{dead_port}', memory: 1GiB}}\n"
        "links:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n"
    )
    line = one_error_line(coordinator_here("probe", nodes, "--no-emulate-links"))
    assert "node 'ghost'" in line and f"127.0.0.1:{dead_port}" in line, line


def test_probe_refuses_options_out_of_range(tmp_path: Path, coordinator_here) -> None:
    nodes = write_nodes(tmp_path / "nodes.yaml", ["a", "b"])
    line = one_error_line(coordinator_here("probe", nodes, "--rounds", "0"))
    assert "--rounds 0" in line, line
    line = one_error_line(coordinator_here("probe", nodes, "--bytes", "1GiB"))
    assert "--bytes" in line, line


class CountingListener:
    """A TCP port that accepts connections, never answers, and counts the bytes it gets."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.received = 0
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._drain, args=(connection,), daemon=True).start()

    def _drain(self, connection: socket.socket) -> None:
        while data := _recv(connection):
            self.received += len(data)

    @property
    def connected(self) -> bool:
        """True once something connected (a node's probe reached this address)."""
        return bool(self._connections)

    def close(self) -> None:
        self.socket.close()
        for connection in self._connections:
            connection.close()


def _recv(connection: socket.socket) -> bytes:
    try:
        return connection.recv(1 << 16)
    except OSError:
        return b""


@pytest.fixture
def listener() -> Iterator[CountingListener]:
    counting = CountingListener()
    try:
        yield counting
    finally:
        counting.close()


async def test_a_probe_sends_nothing_sized_to_an_address_that_is_not_a_worker(
    start_nodes, listener: CountingListener,
) -> None:
    [node] = start_nodes(1)
    handle = GrpcWorkerHandle(node.address, node.name)
    try:
        asked = ProbeOptions(MAX_PROBE_BYTES, MAX_PROBE_ROUNDS)
        first = asyncio.create_task(handle.probe(listener.address, asked))
        async with asyncio.timeout(30):  # the first probe waits on the silent target
            while not listener.connected:
                await asyncio.sleep(0.05)
        with pytest.raises(NodeRejectedError, match="RESOURCE_EXHAUSTED.*one link at a time"):
            await handle.probe(listener.address, ProbeOptions(1, 1))
        with pytest.raises(NodeRejectedError, match="FAILED_PRECONDITION.*does not answer"):
            await first
        assert listener.received < 64 * 1024  # the HTTP/2 preface, never a payload
        for options, field in ((ProbeOptions(MAX_PROBE_BYTES + 1, 1), "payload_bytes"),
                               (ProbeOptions(1, MAX_PROBE_ROUNDS + 1), "rounds"),
                               (ProbeOptions(1, 0), "rounds")):
            with pytest.raises(NodeRejectedError, match=f"RESOURCE_EXHAUSTED.*{field}"):
                await handle.probe(node.address, options)
        await handle.describe()  # and it serves on
    finally:
        await handle.close()

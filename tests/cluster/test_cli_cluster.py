"""The ``coordinator`` command line against real worker processes, and the emulation of slow
devices and slow links.

Every process a test starts is stopped when it ends, pass or fail: the ``up`` tests stop
the nodes recorded in the state directory, the demo test kills any worker left on its ports.
The long up-to-down flow runs its commands in this process (``coordinator_here``); the
others run ``python -m coordinator.cli`` as the console script would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import (
    REPO,
    coordinator,
    edge_node_running,
    edge_nodes_listening_on,
    nodes_yaml,
    ok,
    one_error_line,
    split_in_two_memory,
    status_rows,
)
from cluster_helpers import Shift, answer, make_stage, p50_stage_seconds

from coordinator.local_cluster import LocalNode, read_state
from coordinator.ports import free_ports
from coordinator.samples import build_sample, skip_dag, write_sample
from node.client import GrpcWorkerHandle
from node.link import LinkEmulation
from node.messages import Wiring
from partition.spec import TensorSpec

DEMO_TIMEOUT_S = 480
SKIP_DAG_INPUT = (4, 64)


@pytest.fixture(scope="module")
def skip_dag_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(skip_dag(), tmp_path_factory.mktemp("cli-model") / "skip_dag.pt2")


def test_up_plan_deploy_run_status_down(
    tmp_path: Path, coordinator_here, up_nodes: list[LocalNode], skip_dag_file: Path
) -> None:
    # The model fits on neither node alone, so the plan uses both.
    alpha, beta = free_ports(2)
    addresses = {"alpha": f"127.0.0.1:{alpha}", "beta": f"127.0.0.1:{beta}"}
    memory = str(split_in_two_memory(skip_dag_file))
    nodes = nodes_yaml(tmp_path / "nodes.yaml",
                       [(name, address, memory) for name, address in addresses.items()])

    out = ok(coordinator_here("up", nodes))
    for match in re.finditer(r"(\w+) listening on (\S+) \(pid (\d+), log (\S+)\)", out):
        up_nodes.append(LocalNode(match[1], match[2], int(match[3]), match[4]))
    assert {(n.name, n.address) for n in up_nodes} == set(addresses.items()), out
    assert all(edge_node_running(n.pid) for n in up_nodes)

    rows = status_rows(ok(coordinator_here("status")))
    assert {name: rows[name][1:3] for name in addresses} == {
        name: [address, "up"] for name, address in addresses.items()
    }

    plan_path = tmp_path / "plan.json"
    ok(coordinator_here("plan", skip_dag_file, "--nodes", nodes, "-o", plan_path,
                   "--repeats", "3"))
    ok(coordinator_here("deploy", plan_path))
    x = torch.randn(SKIP_DAG_INPUT, generator=torch.Generator().manual_seed(7))
    torch.save(x, tmp_path / "in.pt")
    ok(coordinator_here("run", plan_path, "--input", tmp_path / "in.pt",
                   "--output", tmp_path / "out.pt"))
    module, _ = build_sample(skip_dag())
    with torch.no_grad():
        expected = module(x)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(got, expected, atol=1e-5)

    deployed = json.loads((tmp_path / "plan.deployed.json").read_text())
    assert len(deployed["artifact_sha256"]) == 2
    rows = status_rows(ok(coordinator_here("status")))
    for address, sha in zip(deployed["addresses"], deployed["artifact_sha256"], strict=True):
        [row] = [cells for cells in rows.values() if cells[1] == address]
        assert row[2] == "up" and row[4] == sha[:12], row
        assert int(row[5]) >= 1, row  # requests served

    bad = torch.randn(4, 32)
    torch.save(bad, tmp_path / "bad.pt")
    line = one_error_line(coordinator_here("run", plan_path, "--input", tmp_path / "bad.pt",
                                      "--output", tmp_path / "bad-out.pt"))
    assert "float32[4, 32]" in line and "the model takes x: float32[4, 64]" in line, line
    assert not (tmp_path / "bad-out.pt").exists()

    assert "stopped 2 node(s)" in ok(coordinator_here("down"))
    deadline = time.monotonic() + 15
    while any(edge_node_running(n.pid) for n in up_nodes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(edge_node_running(n.pid) for n in up_nodes)
    assert read_state(tmp_path / "state") == []


def test_deploy_to_an_unreachable_node_is_one_line(
    tmp_path: Path, cli_env: dict[str, str], coordinator_here, skip_dag_file: Path
) -> None:
    address = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    nodes = nodes_yaml(tmp_path / "nodes.yaml", [("ghost", address, "1GiB")])
    plan_path = tmp_path / "plan.json"
    ok(coordinator_here("plan", skip_dag_file, "--nodes", nodes, "-o", plan_path,
                        "--repeats", "1"))
    line = one_error_line(coordinator(cli_env, "deploy", plan_path))
    assert f"node 'ghost' at {address} is unreachable" in line, line


def test_up_with_a_remote_address_is_one_line(
    tmp_path: Path, cli_env: dict[str, str], up_nodes: list[LocalNode]
) -> None:
    nodes = nodes_yaml(tmp_path / "nodes.yaml", [
        ("here", f"127.0.0.1:{free_ports(1)[0]}", "1GiB"), ("there", "10.20.30.40:50051", "1GiB"),
    ])
    line = one_error_line(coordinator(cli_env, "up", nodes))
    assert "'there' has address 10.20.30.40:50051" in line and "127.0.0.1:PORT" in line, line
    assert read_state(tmp_path / "state") == []  # nothing was started


# --- emulation on bare workers ----------------------------------------------------------------


async def test_slow_node_takes_proportionally_longer(start_nodes) -> None:
    [fast] = start_nodes(1)
    [slow] = start_nodes(1, "--speed-factor", "0.25")
    p50 = {}
    for node in (fast, slow):  # one at a time: the machine has two cores
        p50[node.name] = await p50_stage_seconds(node.address, node.name, rows=128)
    assert p50[fast.name] > 0
    ratio = p50[slow.name] / p50[fast.name]
    assert 2.5 < ratio < 6, f"speed 0.25 vs 1: p50 stage times {p50}, ratio {ratio:.2f}"


async def test_emulated_link_delays_a_megabyte_by_a_second(start_nodes) -> None:
    spec = TensorSpec("x", "float32", (256 * 1024,))  # 1 MiB
    stage = make_stage(Shift(1.0), index=0, receives=spec,
                       sends=TensorSpec("y", "float32", spec.shape))
    [node] = start_nodes(1)
    handle = GrpcWorkerHandle(node.address, node.name)
    x = torch.randn(spec.shape)

    async def one_request(request_id: int) -> float:
        started = time.perf_counter()
        [result] = (await answer(handle, {request_id: {"x": x}})).values()
        elapsed = time.perf_counter() - started
        torch.testing.assert_close(result.outputs["y"], x + 1)
        return elapsed

    try:
        await handle.load_stage(stage.spec, stage.data)
        await handle.wire(Wiring())
        await one_request(1)  # warm up the connections
        plain = await one_request(2)
        await handle.wire(Wiring(outbound=LinkEmulation(bytes_per_s=1e6, latency_s=0.0)))
        emulated = await one_request(3)
    finally:
        await handle.close()
    assert 0.7 < emulated - plain < 2.0, f"plain {plain:.3f} s, emulated {emulated:.3f} s"


# --- the demo -------------------------------------------------------------------------------


def test_demo_end_to_end(tmp_path: Path, cli_env: dict[str, str]) -> None:
    example = (REPO / "examples" / "cluster-heterogeneous.yaml").read_text()
    addresses: set[str] = set()
    ports = iter(free_ports(4))

    def fresh(match: re.Match[str]) -> str:
        address = f"127.0.0.1:{next(ports)}"
        addresses.add(address)
        return address

    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(re.sub(r"127\.0\.0\.1:\d+", fresh, example))
    assert len(addresses) == 4
    out = tmp_path / "demo"
    try:
        done = coordinator(cli_env, "demo", "--requests", "20", "--out", out, "--nodes", nodes,
                           timeout=DEMO_TIMEOUT_S)
        stdout = ok(done)
        assert re.search(r"checked\s+20 outputs: all equal the single-process model's", stdout), \
            stdout
        assert (out / "plan.json").is_file() and (out / "plan.png").is_file()
        assert edge_nodes_listening_on(addresses) == []
    finally:
        for pid in edge_nodes_listening_on(addresses):  # only if the demo failed to stop them
            os.kill(pid, signal.SIGKILL)

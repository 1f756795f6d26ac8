"""Running the ``coordinator`` command line in subprocesses, and reading what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from coordinator.cli import main
from partition.cluster import WORKER_OVERHEAD_BYTES
from partition.cost_builder import stage_memory_matrix
from partition.layers import LayerGraph, build_layer_graph
from partition.loader import load_model

REPO = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_S = 180


def coordinator(
    env: dict[str, str], *args: str | Path, timeout: float = COMMAND_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``coordinator ARGS`` to completion (as the console script would)."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *map(str, args)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def coordinator_in_process(
    capsys: pytest.CaptureFixture[str], *args: str | Path
) -> subprocess.CompletedProcess[str]:
    """Run ``coordinator ARGS`` through ``coordinator.cli.main`` in this process, in its
    environment: what :func:`coordinator` runs, without the seconds a fresh interpreter
    spends importing torch and every command."""
    capsys.readouterr()  # what the test printed before is not the command's
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["coordinator", *map(str, args)], code, out, err)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, after checking it succeeded."""
    assert done.returncode == 0, f"{done.args} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``coordinator: error:`` line of a command that failed as a user error."""
    assert done.returncode == 2, f"{done.args} exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("coordinator: error: "), lines[0]
    return lines[0]


def nodes_yaml(path: Path, nodes: list[tuple[str, str, str]], **extra: str) -> Path:
    """Write a cluster file with ``(name, address, memory)`` nodes on a 1 Gbps LAN."""
    lines = ["nodes:"]
    lines += [f"  - {{name: {n}, address: '{a}', memory: {m}}}" for n, a, m in nodes]
    lines += ["links:", "  default: {bandwidth: 1Gbps, latency: 1ms}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def split_in_two_memory(model_file: Path) -> int:
    """A node memory (for nodes.yaml) whose room for a stage, after the worker's own, holds
    the better half of the model but not all of it: a plan over two such nodes uses both."""
    layer_graph = build_layer_graph(load_model(model_file).program)
    return WORKER_OVERHEAD_BYTES + split_in_two_room(layer_graph)


def split_in_two_room(layer_graph: LayerGraph) -> int:
    """Room for stages that holds the better half of the model but not all of it."""
    need, end = stage_memory_matrix(layer_graph), layer_graph.num_layers
    half = min(max(need[0, cut], need[cut, end]) for cut in range(1, end))
    assert half < need[0, end]
    return int(half + need[0, end]) // 2


def edge_node_running(pid: int) -> bool:
    """True while ``pid`` is a running (not zombie) ``edge-node`` process."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "node.cli" in process.cmdline()
    except psutil.Error:
        return False


def edge_nodes_listening_on(addresses: set[str]) -> list[int]:
    """Pids of running ``edge-node`` processes started with ``--listen`` one of ``addresses``."""
    return [
        process.pid for process in psutil.process_iter(["cmdline"])
        if "node.cli" in (argv := process.info["cmdline"] or []) and addresses & set(argv)
    ]


def status_rows(output: str) -> dict[str, list[str]]:
    """``coordinator status``'s table: node name -> its cells."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells and cells[0] != "node":
            rows[cells[0]] = cells
    return rows

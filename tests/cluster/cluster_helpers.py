"""Helpers for cluster tests: real ``edge-node`` processes on 127.0.0.1, small stages."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle, Result
from node.messages import Wiring
from partition.artifact import program_to_bytes, sha256
from partition.spec import StageSpec, TensorSpec
from partition.split import StageArtifact

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass
class NodeProcess:
    """One running ``edge-node``: its address, process and log file."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def node_command(address: str, *args: str) -> list[str]:
    """The command line that runs ``edge-node --listen address``."""
    return [sys.executable, "-m", "node.cli", "--listen", address, "--threads", "1", *args]


def spawn_node(
    name: str, address: str, log_path: Path, *extra_args: str,
    env: Mapping[str, str] | None = None,
) -> NodeProcess:
    """Start ``edge-node`` named ``name`` on ``address``, logging to ``log_path``, in ``env``
    (default: this process's environment)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            node_command(address, "--name", name, *extra_args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return NodeProcess(name, address, process, log_path)


@contextlib.contextmanager
def running_node(
    name: str, log_path: Path, *extra_args: str, env: Mapping[str, str] | None = None
) -> Iterator[NodeProcess]:
    """``edge-node`` named ``name`` on a free port, listening; stopped when the block ends."""
    process = spawn_node(name, f"127.0.0.1:{free_ports(1)[0]}", log_path, *extra_args, env=env)
    try:
        wait_listening(process)
        yield process
    finally:
        stop_node(process)


def wait_listening(node: NodeProcess, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Block until ``node`` accepts TCP connections; fail with its log if it exits first."""
    host, _, port = node.address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            pytest.fail(f"{node.name} exited with {node.process.returncode}:\n{node.log()}")
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{node.name} did not listen on {node.address} in {timeout_s}s:\n{node.log()}")


def stop_node(node: NodeProcess) -> None:
    """SIGTERM, then SIGKILL if the node has not exited after :data:`STOP_TIMEOUT_S`."""
    if node.process.poll() is None:
        node.process.terminate()
        try:
            node.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()


def make_stage(
    module: torch.nn.Module,
    *,
    index: int,
    receives: TensorSpec,
    sends: TensorSpec,
) -> StageArtifact:
    """Export a one-input, one-output ``module`` as stage ``index`` of a chain."""
    example = torch.zeros(receives.shape, dtype=torch.float32)
    data = program_to_bytes(torch.export.export(module, (example,)))
    spec = StageSpec(
        index=index,
        node=f"node{index}",
        start=index,
        end=index + 1,
        receives=(receives,),
        inputs=(receives.name,),
        outputs=(sends,),
        sends=(sends,),
        artifact_sha256=sha256(data),
    )
    return StageArtifact(spec, data)


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Shift(torch.nn.Module):
    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


CHAIN_SHAPE = (2, 3)


class Repeated(torch.nn.Module):
    """One 1024x1024 linear layer applied eight times: about 15 ms of compute on 128 rows."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1024, 1024)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(8):
            x = torch.tanh(self.linear(x))
        return x


async def answer(handle: GrpcWorkerHandle, frames: dict[int, dict[str, torch.Tensor]]
                 ) -> dict[int, Result]:
    """Send ``frames`` into a single-stage node (wired to its Results) and collect each
    answer, failing on any failure result."""
    results = await handle.open_results()
    answers: dict[int, Result] = {}
    try:
        sender = await handle.open_sender()
        for request_id, tensors in frames.items():
            await sender.send(request_id, tensors)
        await sender.close()

        async def collect() -> None:
            async for result in results:
                assert result.failure is None, result.failure
                answers[result.request_id] = result
                if len(answers) == len(frames):
                    return

        await asyncio.wait_for(collect(), 60)
    finally:
        await results.close()
    return answers


async def p50_stage_seconds(address: str, name: str, *, rows: int, requests: int = 10) -> float:
    """Load :class:`Repeated` on ``rows`` rows into the node at ``address`` as its only
    stage, answer ``requests`` frames, and return the node's p50 stage time (Describe)."""
    shape = (rows, 1024)
    stage = make_stage(Repeated().eval(), index=0, receives=TensorSpec("x", "float32", shape),
                       sends=TensorSpec("y", "float32", shape))
    handle = GrpcWorkerHandle(address, name)
    try:
        await handle.load_stage(stage.spec, stage.data)
        await handle.wire(Wiring())
        await answer(handle, {rid: {"x": torch.randn(shape)} for rid in range(requests)})
        info = await handle.describe()
    finally:
        await handle.close()
    assert info.requests_served == requests
    return info.p50_stage_seconds

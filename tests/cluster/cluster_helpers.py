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
from model_zoo import ExportedSample

from coordinator.isolation import IsolationError
from coordinator.isolation import check_available as check_cgroups
from coordinator.netns import check_available as check_namespaces
from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle, Result
from node.messages import Wiring
from partition.artifact import ProgramRunner, program_to_bytes, sha256
from partition.cluster import ClusterSpec, parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import LayerGraph, build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.spec import StageSpec, TensorSpec
from partition.split import StageArtifact, split

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
    stop_node_processes([node])


def stop_node_processes(nodes: list[NodeProcess]) -> None:
    """:func:`stop_node` for each of ``nodes``, all sent SIGTERM before any is waited for
    (a node drains for a second before it exits)."""
    running = [node for node in nodes if node.process.poll() is None]
    for node in running:
        node.process.terminate()
    for node in running:
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


def three_node_cluster() -> ClusterSpec:
    """Three nodes of speed 1 on free ports of 127.0.0.1, 1 Gbps links; node-0 is the source
    and the sink."""
    return parse_cluster(
        {
            "nodes": [
                {"name": f"node-{i}", "address": f"127.0.0.1:{port}", "memory": "2GiB",
                 "speed": 1.0}
                for i, port in enumerate(free_ports(3))
            ],
            "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
            "source": "node-0",
            "sink": "node-0",
        },
        "three-node test cluster",
    )


@dataclass(frozen=True)
class Split:
    """A sample model planned into three stages over the cluster, and its stage artifacts."""

    sample: ExportedSample
    layer_graph: LayerGraph
    plan: Plan
    artifacts: list[StageArtifact]
    reference: ProgramRunner


def split_in_three(cluster: ClusterSpec, sample: ExportedSample) -> Split:
    """``sample`` split at ``L//3`` and ``2L//3`` onto the cluster's nodes 0, 1, 2, priced on
    a quick profile of this machine."""
    model = sample.model
    layer_graph = build_layer_graph(model.program)
    profile = profile_layers(layer_graph, model.sha256, model.example_inputs, repeats=1, warmup=1)
    cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
    count = layer_graph.num_layers
    cuts = [0, count // 3, 2 * count // 3, count]
    spans = [Span(index, start, end)
             for index, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False))]
    plan = plan_from_schedule(
        model, layer_graph, cluster, cost, evaluate(cost, spans), Objective.THROUGHPUT,
        exact=False, lower_bound_s=0.0,
    )
    return Split(sample, layer_graph, plan, split(plan, layer_graph), ProgramRunner(model.program))


def kernel_networks_unavailable() -> str | None:
    """Why CPU groups and network namespaces cannot be made here, or ``None`` if they can."""
    try:
        check_cgroups()
        check_namespaces()
    except IsolationError as err:
        return str(err)
    return None


def leftovers(prefix: str, block: str) -> list[str]:
    """Namespaces and root links named ``prefix...``, and routes into ``block``, that exist."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout.split()
    links = [path.name for path in Path("/sys/class/net").iterdir()]
    routes = subprocess.run(["ip", "route", "show", "root", block], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    return [*(n for n in [*namespaces, *links] if n.startswith(prefix)),
            *(route.strip() for route in routes)]

"""Real edge-node processes on 127.0.0.1: control calls, a two-stage chain, bad input."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator

import grpc
import msgpack
import pytest
import torch
from cluster_helpers import (
    CHAIN_SHAPE,
    STOP_TIMEOUT_S,
    NodeProcess,
    Shift,
    make_stage,
    node_command,
)

from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle, Result
from node.codec import encode_frame
from node.config import Device
from node.errors import NodeRejectedError, NodeUnreachableError
from node.messages import FailureCode, Hop, Wiring
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.rpc_options import grpc_options
from partition.spec import TensorSpec
from partition.split import StageArtifact


@pytest.fixture
async def handles() -> AsyncIterator[list[GrpcWorkerHandle]]:
    """A list to put handles in; each is closed after the test."""
    opened: list[GrpcWorkerHandle] = []
    yield opened
    for handle in opened:
        await handle.close()


def handle_for(node: NodeProcess, handles: list[GrpcWorkerHandle]) -> GrpcWorkerHandle:
    handle = GrpcWorkerHandle(node.address, node.name)
    handles.append(handle)
    return handle


async def deploy(
    nodes: list[GrpcWorkerHandle], stages: tuple[StageArtifact, ...]
) -> None:
    """Load ``stages[i]`` on ``nodes[i]`` and wire them into a chain, last node first."""
    for node, stage in zip(nodes, stages, strict=True):
        await node.load_stage(stage.spec, stage.data)
    nexts = [(Hop(n.address, n.name),) for n in nodes[1:]] + [()]
    for node, hops in reversed(list(zip(nodes, nexts, strict=True))):
        await node.wire(Wiring(hops))


async def collect(stream: AsyncIterator[Result], count: int) -> dict[int, Result]:
    results: dict[int, Result] = {}
    async for result in stream:
        assert result.request_id not in results, f"request {result.request_id} answered twice"
        results[result.request_id] = result
        if len(results) == count:
            break
    return results


async def test_describe(start_nodes, handles) -> None:
    [node] = start_nodes(1)
    info = await handle_for(node, handles).describe()
    assert info.name == node.name
    assert info.device is Device.CPU
    assert info.torch_version == torch.__version__
    assert info.torch_threads == 1
    assert info.cpu_count >= 1 and info.memory_total_bytes > 0
    assert info.stage is None and info.requests_served == 0


async def test_unreachable_node_is_reported(handles) -> None:
    handle = GrpcWorkerHandle(f"127.0.0.1:{free_ports(1)[0]}", "ghost")
    handles.append(handle)
    with pytest.raises(NodeUnreachableError, match="'ghost' .* is unreachable; is `edge-node"):
        await handle.describe()


async def test_stage_with_bad_hash_is_refused(start_nodes, handles, chain_stages) -> None:
    [node] = start_nodes(1)
    handle = handle_for(node, handles)
    stage = chain_stages[0]
    corrupt = bytearray(stage.data)
    corrupt[len(corrupt) // 2] ^= 0xFF
    with pytest.raises(NodeRejectedError, match="INVALID_ARGUMENT.*hash mismatch"):
        await handle.load_stage(stage.spec, bytes(corrupt))
    assert (await handle.describe()).stage is None

    sent: list[int] = []
    info = await handle.load_stage(stage.spec, stage.data, lambda done, total: sent.append(done))
    assert info.sha256 == stage.spec.artifact_sha256 and info.size_bytes == len(stage.data)
    assert sent[-1] == len(stage.data)


async def test_chain_answers_each_concurrent_request(start_nodes, handles, chain_stages) -> None:
    nodes = [handle_for(node, handles) for node in start_nodes(2)]
    await deploy(nodes, chain_stages)
    results_stream = await nodes[1].open_results(expected=chain_stages[1].spec.sends)
    inputs = {rid: torch.randn(CHAIN_SHAPE) for rid in range(50)}

    async def send_some(ids: range) -> None:
        sender = await nodes[0].open_sender()
        for rid in ids:
            await sender.send(rid, {"x": inputs[rid]})
        await sender.close()

    collecting = asyncio.create_task(collect(results_stream, len(inputs)))
    await asyncio.gather(*(send_some(range(start, start + 10)) for start in range(0, 50, 10)))
    results = await asyncio.wait_for(collecting, 60)
    await results_stream.close()

    assert sorted(results) == sorted(inputs)
    for rid, result in results.items():
        assert result.failure is None, result.failure
        torch.testing.assert_close(result.outputs["b"], 2 * inputs[rid] + 3)
    assert (await nodes[0].describe()).requests_served == 50
    assert (await nodes[1].describe()).stage.index == 1


def malformed_frames() -> dict[str, pb.Frame]:
    good = pb.Frame.FromString(encode_frame(7, {"x": torch.ones(CHAIN_SHAPE)}))
    header, payload = good.header, good.payload
    meta = msgpack.unpackb(header)

    def with_entry(**changes) -> bytes:
        name, dtype, shape, nbytes = meta["tensors"][0]
        entry = {"name": name, "dtype": dtype, "shape": shape, "nbytes": nbytes} | changes
        return msgpack.packb({"id": 7, "tensors": [list(entry.values())]})

    return {
        "lengths disagree": pb.Frame(header=with_entry(nbytes=4), payload=payload[:4]),
        "unknown dtype": pb.Frame(header=with_entry(dtype="float8"), payload=payload),
        "truncated body": pb.Frame(header=header, payload=payload[:-1]),
        "garbage header": pb.Frame(header=b"\xc1\xff", payload=payload),
    }


async def test_malformed_frame_is_rejected_and_node_keeps_serving(
    start_nodes, handles, chain_stages
) -> None:
    [node] = start_nodes(1)
    handle = handle_for(node, handles)
    await deploy([handle], chain_stages[:1])
    results = await handle.open_results()
    async with grpc.aio.insecure_channel(node.address, options=grpc_options()) as channel:
        stub = pb_grpc.EdgeNodeStub(channel)
        for kind, frame in malformed_frames().items():
            call = stub.Submit()
            await call.write(frame)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kind
            assert "frame" in caught.value.details(), kind

    sender = await handle.open_sender()
    await sender.send(1, {"x": torch.ones(3)})  # well-formed, wrong shape: a failure result
    await sender.send(2, {"x": torch.ones(CHAIN_SHAPE)})
    await sender.close()
    answers = await asyncio.wait_for(collect(results, 2), 30)
    await results.close()
    assert answers[1].failure.code is FailureCode.INVALID_ARGUMENT
    assert "expected x: float32[2, 3]" in answers[1].failure.message
    torch.testing.assert_close(answers[2].outputs["a"], torch.full(CHAIN_SHAPE, 2.0))


async def test_sender_reports_a_rejected_stream(start_nodes, handles, chain_stages) -> None:
    [node] = start_nodes(1)
    handle = handle_for(node, handles)
    sender = await handle.open_sender()  # nothing loaded yet: the node refuses the stream
    with pytest.raises(NodeRejectedError, match="FAILED_PRECONDITION.*no stage loaded"):
        await sender.send(1, {"x": torch.ones(CHAIN_SHAPE)})
        await sender.close()


async def test_64_mb_tensor_passes_through_a_node(start_nodes, handles) -> None:
    spec = TensorSpec("x", "float32", (16 * 1024 * 1024,))
    stage = make_stage(
        Shift(1.0), index=0, receives=spec, sends=TensorSpec("y", "float32", spec.shape)
    )
    [node] = start_nodes(1)
    handle = handle_for(node, handles)
    await deploy([handle], (stage,))
    results = await handle.open_results()
    x = torch.randn(spec.shape)
    sender = await handle.open_sender()
    await sender.send(5, {"x": x})
    await sender.close()
    answers = await asyncio.wait_for(collect(results, 1), 60)
    await results.close()
    torch.testing.assert_close(answers[5].outputs["y"], x + 1)


def test_port_taken_exits_with_one_clear_line_and_sigterm_stops_cleanly(start_nodes) -> None:
    """A second node on a node's port exits with one line; the first, sent SIGTERM, exits
    cleanly (one node serves both checks: each start costs seconds of imports)."""
    [node] = start_nodes(1)
    done = subprocess.run(
        node_command(node.address), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"edge-node: cannot listen on {node.address}: address already in use; "
        "pick another --listen port"
    )
    assert "Traceback" not in done.stderr

    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(STOP_TIMEOUT_S) == 0
    assert "stopping" in node.log()

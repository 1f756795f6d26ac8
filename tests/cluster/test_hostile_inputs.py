"""A stranger on the network against a real ``edge-node``: oversized, stalled and unfinished
uploads, a wrong-shape 200 MB frame, a second and a stalled Results reader, greedy Profile
calls. Each is refused without a lasting cost: the node's memory comes back, and it serves on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from cluster_helpers import (
    NodeProcess,
    Scale,
    make_stage,
    running_node,
    spawn_node,
)

from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle
from node.codec import encode_frame
from node.data_path import results_stream, submit_stream
from node.errors import NodeRejectedError
from node.messages import FailureCode, Wiring
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.rpc_options import grpc_options
from partition.spec import TensorSpec
from partition.split import StageArtifact

STALL_S = 1.0
"""The node's --upload-stall-s and --results-stall-s here."""

MiB = 1024 * 1024
MAX_FRAME_BYTES = 64 * MiB
SHAPE = (256, 1024)  # float32: 1 MiB a frame
WAIT_S = 60.0  # a guard against hanging, not a timing assertion


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the whole module: short stall times, 8 GiB uploads, 64 MiB frames."""
    log_path = tmp_path_factory.mktemp("hostile") / "node.log"
    with running_node(
        "target", log_path, "--max-stage-bytes", "8GiB",
        "--max-frame-bytes", f"{MAX_FRAME_BYTES}", "--upload-stall-s", str(STALL_S),
        "--results-stall-s", str(STALL_S),
    ) as process:
        yield process


@pytest.fixture(scope="module")
def stage() -> StageArtifact:
    """``x -> 2x`` on float32 of :data:`SHAPE`, as the first and last stage."""
    x = TensorSpec("x", "float32", SHAPE)
    return make_stage(Scale(2.0), index=0, receives=x, sends=TensorSpec("y", "float32", SHAPE))


@pytest.fixture
async def channel(node: NodeProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(node.address, options=grpc_options()) as opened:
        yield opened


@pytest.fixture
async def handle(node: NodeProcess) -> AsyncIterator[GrpcWorkerHandle]:
    opened = GrpcWorkerHandle(node.address, node.name)
    yield opened
    await opened.close()


@pytest.fixture
async def deployed(handle: GrpcWorkerHandle, stage: StageArtifact) -> GrpcWorkerHandle:
    """The node running :func:`stage` alone, results to its Results stream."""
    await handle.load_stage(stage.spec, stage.data)
    await handle.wire(Wiring())
    return handle


def rss(node: NodeProcess) -> int:
    return psutil.Process(node.process.pid).memory_info().rss


def assert_memory_back(node: NodeProcess, before: int, sent_bytes: int = 0) -> None:
    """The node's RSS grew by under a quarter of what was sent to it, or 10% if that is more.

    The allocator keeps some freed memory for reuse (tens of MiB after many streams at once);
    a node that kept what it was sent would grow by all of it.
    """
    after = rss(node)
    allowed = max(sent_bytes / 4, before * 0.1)
    assert after - before <= allowed, (
        f"RSS grew from {before / MiB:.0f} to {after / MiB:.0f} MiB after {sent_bytes / MiB:.0f} "
        f"MiB sent"
    )


def stage_header(stage: StageArtifact, total_bytes: int) -> pb.StageChunk:
    return pb.StageChunk(header=pb.StageHeader(
        spec_json=json.dumps(stage.spec.to_dict()), total_bytes=total_bytes,
        sha256=stage.spec.artifact_sha256,
    ))


async def hang_after(*chunks: object) -> AsyncIterator[object]:
    """Send ``chunks``, then send nothing more, ever."""
    for chunk in chunks:
        yield chunk
    await asyncio.Event().wait()


async def status_of(call: grpc.aio.Call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await asyncio.wait_for(call, WAIT_S)
    return raised.value


async def test_over_declared_stage_is_refused_before_a_byte(node, channel, stage) -> None:
    before = rss(node)
    stub = pb_grpc.EdgeNodeStub(channel)
    error = await status_of(stub.LoadStage(hang_after(stage_header(stage, 16 * 1024**3))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-stage-bytes" in error.details()
    assert_memory_back(node, before)


async def test_unfinished_upload_is_refused_and_its_memory_released(node, channel, stage) -> None:
    before = rss(node)
    stub = pb_grpc.EdgeNodeStub(channel)

    def chunks() -> Iterator[pb.StageChunk]:  # 512 MiB of a declared 8 GiB
        yield stage_header(stage, 8 * 1024**3)
        block = bytes(MiB)
        for _ in range(512):
            yield pb.StageChunk(data=block)

    error = await status_of(stub.LoadStage(chunks()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated: 536870912 of 8589934592 bytes" in error.details()
    assert_memory_back(node, before, sent_bytes=512 * MiB)


async def test_bytes_past_the_declared_size_are_refused(node, channel, stage) -> None:
    stub = pb_grpc.EdgeNodeStub(channel)
    chunks = [stage_header(stage, MiB), pb.StageChunk(data=bytes(MiB)), pb.StageChunk(data=b"!")]
    error = await status_of(stub.LoadStage(hang_after(*chunks)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"longer than the {MiB} bytes its header declares" in error.details()


async def test_stalled_uploads_are_cancelled(node, channel, stage) -> None:
    stub = pb_grpc.EdgeNodeStub(channel)

    async def stall_twenty_uploads_and_a_profile() -> None:
        first = [stage_header(stage, 64 * MiB), pb.StageChunk(data=bytes(4 * MiB))]
        calls = [stub.LoadStage(hang_after(*first)) for _ in range(20)]
        calls.append(stub.Profile(hang_after(pb.ProfileChunk(
            options=pb.ProfileOptions(granularity="auto", threads=1, repeats=1, warmup=0),
            data=bytes(4 * MiB),
        ))))
        errors = await asyncio.gather(*(status_of(call) for call in calls))
        assert {error.code() for error in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(f"sent nothing for {STALL_S:g} s" in error.details() for error in errors)

    # Twenty streams at once leave freed memory in the arenas of gRPC's threads, which the
    # allocator keeps for reuse: a first round sets that level, then six more are measured.
    await stall_twenty_uploads_and_a_profile()
    before = rss(node)
    rounds = 6
    for _ in range(rounds):
        await stall_twenty_uploads_and_a_profile()
    assert_memory_back(node, before, sent_bytes=rounds * 21 * 4 * MiB)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (pb.ProfileOptions(granularity="auto", threads=1, repeats=10**9, warmup=0), "repeats"),
        (pb.ProfileOptions(granularity="auto", threads=1, repeats=1, warmup=10**6), "warmup"),
        (pb.ProfileOptions(granularity="auto", threads=10**4, repeats=1, warmup=0), "threads"),
        (pb.ProfileOptions(granularity="auto", threads=0, repeats=1, warmup=0), "threads"),
    ],
)
async def test_greedy_profile_options_are_refused(channel, options, field) -> None:
    stub = pb_grpc.EdgeNodeStub(channel)
    error = await status_of(stub.Profile(hang_after(pb.ProfileChunk(options=options))))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"Profile option {field} is" in error.details()


async def test_one_profile_at_a_time(channel) -> None:
    stub = pb_grpc.EdgeNodeStub(channel)
    second_done = asyncio.Event()

    async def slow_upload() -> AsyncIterator[pb.ProfileChunk]:
        yield pb.ProfileChunk(
            options=pb.ProfileOptions(granularity="auto", threads=1, repeats=1, warmup=0)
        )
        while not second_done.is_set():  # never stalls, so it holds the node until then
            await asyncio.sleep(STALL_S / 4)
            yield pb.ProfileChunk(data=b"x")

    first = stub.Profile(slow_upload())
    await asyncio.sleep(STALL_S)
    second = stub.Profile(hang_after(pb.ProfileChunk(
        options=pb.ProfileOptions(granularity="auto", threads=1, repeats=1, warmup=0)
    )))
    error = await status_of(second)
    second_done.set()
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already profiling" in error.details()
    assert (await status_of(first)).code() == grpc.StatusCode.INVALID_ARGUMENT  # not a model


async def test_wrong_shape_frame_is_answered_and_its_memory_released(node, deployed) -> None:
    results = await deployed.open_results()
    answers = []
    try:
        for request_id, tensor in ((1, torch.ones(SHAPE)), (2, torch.ones(12 * MiB))):
            if request_id == 2:  # 48 MiB of float32, once the node has served a request
                before = rss(node)
            sender_node = GrpcWorkerHandle(node.address)  # on a connection of its own
            sender = await sender_node.open_sender()
            await sender.send(request_id, {"x": tensor})
            answers.append(await anext(aiter(results)))
            await sender.close()
            await sender_node.close()
    finally:
        await results.close()
    assert torch.equal(answers[0].outputs["y"], torch.full(SHAPE, 2.0))
    assert answers[1].failure.code is FailureCode.INVALID_ARGUMENT
    assert "expected x: float32[256, 1024]" in answers[1].failure.message
    assert_memory_back(node, before)


async def test_frame_over_the_limit_is_refused_unread(node, deployed) -> None:
    results = await deployed.open_results()
    sender = await deployed.open_sender()
    try:
        await sender.send(1, {"x": torch.ones(SHAPE)})
        await anext(aiter(results))
        before = rss(node)
        with pytest.raises(NodeRejectedError, match="RESOURCE_EXHAUSTED"):
            await sender.send(2, {"x": torch.ones(50 * MiB)})  # 200 MiB of float32
            await sender.close()
    finally:
        await results.close()
    assert_memory_back(node, before)


async def test_a_second_results_reader_is_refused(node, deployed) -> None:
    owner = await deployed.open_results()
    stranger = GrpcWorkerHandle(node.address)
    try:
        with pytest.raises(NodeRejectedError, match="ALREADY_EXISTS.*another client"):
            await stranger.open_results()
        await owner.close()
        taken_over = await stranger.open_results()  # free again once the owner has left
        await taken_over.close()
    finally:
        await stranger.close()


async def test_a_stalled_results_reader_is_cut_off(node, deployed, channel) -> None:
    stalled = results_stream(channel)
    await stalled.initial_metadata()  # it owns the results, and never reads them
    submit = submit_stream(channel)
    frames = 0

    async def flood() -> None:
        nonlocal frames
        while True:
            await submit.write(encode_frame(frames, {"x": torch.ones(SHAPE)}))
            frames += 1

    flooding = asyncio.create_task(flood())
    try:
        async with asyncio.timeout(WAIT_S):
            while "cut off a Results reader" not in node.log():
                await asyncio.sleep(0.1)
            sent = frames  # the stages keep going: results nobody owns are dropped
            while frames < sent + 8:
                await asyncio.sleep(0.1)
                assert not flooding.done(), flooding
    finally:
        flooding.cancel()
        submit.cancel()
    results = await deployed.open_results()  # the stalled stream owns nothing any more
    sender = await deployed.open_sender()
    try:
        await sender.send(2**64 - 1, {"x": torch.ones(SHAPE)})
        async for result in results:
            if result.request_id == 2**64 - 1:
                assert torch.equal(result.outputs["y"], torch.full(SHAPE, 2.0))
                break
    finally:
        await sender.close()
        await results.close()
        stalled.cancel()


def test_stall_flags_are_checked(tmp_path: Path) -> None:
    [port] = free_ports(1)
    process = spawn_node("bad", f"127.0.0.1:{port}", tmp_path / "log", "--upload-stall-s", "0")
    assert process.process.wait(WAIT_S) == 2
    assert "upload stall time must be positive" in process.log()

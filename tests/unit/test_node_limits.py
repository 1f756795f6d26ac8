"""The node's limits below the gRPC seam: one results owner, stalls, frame headers, options."""

from __future__ import annotations

import asyncio

import grpc
import msgpack
import pytest

import node.results
from coordinator.ports import free_ports
from node.codec import MAX_HEADER_BYTES, MAX_TENSORS, decode_frame
from node.errors import FrameError, LimitError
from node.next_hop import NextHop
from node.probe import EchoService
from node.profiling import MAX_REPEATS, ProfileOptions
from node.results import ResultsOwner
from node.rpc import edgesplit_pb2 as pb

STALL_S = 0.05


async def test_results_go_to_one_owner_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.results, "HANDOVER_S", STALL_S)  # the second owner waits this long
    owner = ResultsOwner(depth=2, stall_s=STALL_S)
    written: list[bytes] = []

    async def write(frame: bytes) -> None:
        written.append(frame)

    async with owner.own():
        pumping = asyncio.create_task(owner.pump(write))
        with pytest.raises(LimitError, match="another client already reads"):
            async with owner.own():
                pass
        for index in range(5):
            await owner.deliver(index, bytes([index]))
        while len(written) < 5:
            await asyncio.sleep(0)
        pumping.cancel()
    assert written == [bytes([i]) for i in range(5)]


async def test_a_stalled_owner_is_cut_off() -> None:
    owner = ResultsOwner(depth=1, stall_s=STALL_S)

    async def never(frame: bytes) -> None:
        await asyncio.Event().wait()

    async with owner.own():
        await owner.deliver(1, b"a")
        with pytest.raises(LimitError, match="read nothing"):
            await owner.pump(never)
    async with owner.own():  # free again
        pass


async def test_an_owner_cancelled_as_its_write_completes_lets_go() -> None:
    """gRPC cancels a Results handler when its client leaves, often just as the last write
    completes; Python 3.11's ``wait_for`` lost that cancel and the node's results stayed
    owned by nobody, refusing every later client (a CI failure)."""
    owner = ResultsOwner(depth=2, stall_s=5.0)
    written = asyncio.get_running_loop().create_future()

    async def handler() -> None:
        async with owner.own():
            await owner.pump(lambda frame: written)

    task = asyncio.create_task(handler())
    await owner.deliver(1, b"a")
    await asyncio.sleep(0.01)
    written.set_result(None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1):  # the cancel ends the handler, it does not run on
            await task
    async with asyncio.timeout(1), owner.own():  # free at once, not after the handover wait
        pass


async def test_a_frame_for_a_closed_next_hop_is_dropped_not_fatal(caplog) -> None:
    """A Wire closes the old next hop while the send loop still holds a frame for it (an
    emulated link's delay is long enough); the frame is dropped with a log line, and the
    send loop lives on (it died with gRPC's UsageError once, leaving the node silent)."""
    hop = NextHop(f"127.0.0.1:{free_ports(1)[0]}", max_message_bytes=1 << 20)
    await hop.close()
    await hop.deliver(7, b"frame")
    assert "request 7 not forwarded" in caplog.text


async def test_results_nobody_owns_are_dropped_not_waited_on_forever() -> None:
    owner = ResultsOwner(depth=2, stall_s=STALL_S)
    for index in range(5):  # returns: the full buffer is dropped after the stall time
        await owner.deliver(index, bytes([index]))


def test_header_limits() -> None:
    with pytest.raises(FrameError, match="more than the"):
        decode_frame(bytes(MAX_HEADER_BYTES + 1), b"")
    entries = [[f"t{i}", "float32", [0], 0] for i in range(MAX_TENSORS + 1)]
    with pytest.raises(FrameError, match=f"carries {MAX_TENSORS + 1} tensors"):
        decode_frame(msgpack.packb({"id": 1, "tensors": entries}), b"")


@pytest.mark.parametrize(
    "options",
    [
        ProfileOptions("auto", 1, MAX_REPEATS + 1, 0),
        ProfileOptions("auto", 0, 1, 0),
        ProfileOptions("auto", 3, 1, 0),
    ],
)
def test_profile_options_beyond_bounds(options: ProfileOptions) -> None:
    with pytest.raises(LimitError, match="Profile option"):
        options.check(max_threads=2)
    ProfileOptions("auto", 2, MAX_REPEATS, 0).check(max_threads=2)


class _Aborted(Exception):
    pass


class _EchoContext:
    """A servicer context that reads queued Echo messages (``None``: wait forever)."""

    def __init__(self, *messages: bytes | None) -> None:
        self._messages = list(messages)
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def read(self):
        if not self._messages:
            return grpc.aio.EOF
        payload = self._messages.pop(0)
        if payload is None:
            await asyncio.Event().wait()
        return pb.EchoRequest(payload=payload)

    async def abort(self, code: grpc.StatusCode, details: str):
        self.status = (code, details)
        raise _Aborted


async def test_echo_answers_byte_counts_and_closes_an_idle_stream() -> None:
    echo = EchoService(max_streams=1, idle_s=0.05)
    ended = _EchoContext(b"abc", b"")
    assert [r.received_bytes async for r in echo.answer(ended)] == [3, 0]
    idle = _EchoContext(b"x", None)
    replies = []
    with pytest.raises(_Aborted):
        async for reply in echo.answer(idle):
            replies.append(reply.received_bytes)
    assert replies == [1]
    assert idle.status[0] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no Echo message for 0.05 s" in idle.status[1]


async def test_echo_refuses_a_stream_beyond_its_limit_and_frees_closed_ones() -> None:
    echo = EchoService(max_streams=1, idle_s=5.0)
    holding = echo.answer(_EchoContext(b"x", None))
    assert (await anext(holding)).received_bytes == 1
    extra = _EchoContext(b"y")
    with pytest.raises(_Aborted):
        await anext(echo.answer(extra))
    assert extra.status[0] is grpc.StatusCode.RESOURCE_EXHAUSTED
    await holding.aclose()
    assert [r.received_bytes async for r in echo.answer(_EchoContext(b"zz"))] == [2]

"""The emulated link: frames pipeline over it, each arriving its latency after it left."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from node.config import Device
from node.link import NO_EMULATION, LinkEmulation, LinkSchedule
from node.pipeline import Outlet, StageRunner, Work

TRANSFER_S, LATENCY_S = 0.01, 0.05
FRAME_BYTES = 1000
LINK = LinkEmulation(bytes_per_s=FRAME_BYTES / TRANSFER_S, latency_s=LATENCY_S)


def test_back_to_back_frames_pipeline_over_the_link() -> None:
    """Two frames offered at once arrive at T+L and 2T+L, not 2(T+L)."""
    schedule = LinkSchedule(LINK)
    first, second = schedule.send(0.0, FRAME_BYTES), schedule.send(0.0, FRAME_BYTES)
    assert (first.sent_at, first.arrives_at) == pytest.approx((TRANSFER_S,
                                                               TRANSFER_S + LATENCY_S))
    assert (second.sent_at, second.arrives_at) == pytest.approx((2 * TRANSFER_S,
                                                                 2 * TRANSFER_S + LATENCY_S))


def test_a_frame_offered_to_a_free_link_starts_at_once() -> None:
    schedule = LinkSchedule(LINK)
    schedule.send(0.0, FRAME_BYTES)
    later = schedule.send(1.0, FRAME_BYTES // 2)  # the link was free since 0.01
    assert later.sent_at == pytest.approx(1.0 + TRANSFER_S / 2)
    assert later.arrives_at == pytest.approx(1.0 + TRANSFER_S / 2 + LATENCY_S)


def test_latency_alone_keeps_the_link_free() -> None:
    schedule = LinkSchedule(LinkEmulation(latency_s=LATENCY_S))
    crossings = [schedule.send(0.0, FRAME_BYTES) for _ in range(3)]
    assert [c.sent_at for c in crossings] == [0.0] * 3
    assert [c.arrives_at for c in crossings] == [LATENCY_S] * 3


def test_no_emulation_delivers_at_once() -> None:
    crossing = LinkSchedule(NO_EMULATION).send(2.0, 10**9)
    assert (crossing.sent_at, crossing.arrives_at) == (2.0, 2.0)


class RecordingSink:
    """A next hop that records each frame and the loop time it was delivered."""

    def __init__(self, destination: str = "next") -> None:
        self.delivered: list[tuple[int, bytes, float]] = []
        self.backlog = 0
        self.destination = destination

    async def deliver(self, request_id: int, frame: bytes) -> None:
        self.delivered.append((request_id, frame, asyncio.get_running_loop().time()))

    async def close(self) -> None:
        pass


async def run(works: list[Work], outbound: LinkEmulation) -> tuple[StageRunner, RecordingSink]:
    """Submit ``works`` to a runner wired to a recording sink over ``outbound`` and wait
    until it has delivered them all."""
    sink = RecordingSink()
    runner = await run_dealt(works, [Outlet(sink, "next", 1.0, outbound)])
    return runner, sink


async def run_dealt(works: list[Work], outlets: list[Outlet]) -> StageRunner:
    """Submit ``works`` to a runner wired to ``outlets`` and wait until it has delivered
    them all."""
    runner = StageRunner(node_name="n", device=Device.CPU, speed_factor=1.0)
    await runner.wire(outlets, inbound=NO_EMULATION)
    runner.start()
    try:
        for work in works:
            await runner.submit(work)
        async with asyncio.timeout(10):
            while runner.holding:
                await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    return runner


async def test_the_runner_delivers_in_order_when_due() -> None:
    """Frames cross the outbound link in order and none before its arrival time: T+L,
    2T+L, 3T+L after they were queued at once."""
    started = asyncio.get_running_loop().time()
    runner, sink = await run([Work(r, failure=bytes(FRAME_BYTES)) for r in range(3)], LINK)
    assert [request for request, _, _ in sink.delivered] == [0, 1, 2]
    for k, (_, frame, at) in enumerate(sink.delivered):
        assert len(frame) == FRAME_BYTES
        assert at >= started + (k + 1) * TRANSFER_S + LATENCY_S
    assert runner.bytes_sent == 3 * FRAME_BYTES
    [link] = runner.outbound_links()
    assert (link.node, link.frames_dealt, link.link_frames) == ("next", 3, 3)


async def test_the_runner_deals_frames_among_replicas_by_share_each_over_its_link() -> None:
    """A next stage on two nodes (shares 3:1): frames are dealt 3:1, each crossing its own
    emulated link (the slow one delays only its own frames' arrival)."""
    fast, slow = RecordingSink("fast"), RecordingSink("slow")
    started = asyncio.get_running_loop().time()
    runner = await run_dealt([Work(r, failure=b"x") for r in range(8)], [
        Outlet(fast, "fast", 0.75), Outlet(slow, "slow", 0.25, LinkEmulation(latency_s=LATENCY_S)),
    ])
    assert [r for r, _, _ in fast.delivered] == [0, 1, 3, 4, 5, 7]
    assert [r for r, _, _ in slow.delivered] == [2, 6]
    assert all(at >= started + LATENCY_S for _, _, at in slow.delivered)
    assert [(link.node, link.frames_dealt) for link in runner.outbound_links()] == [
        ("fast", 6), ("slow", 2)]


async def test_an_inbound_frame_waits_in_the_queue_until_due() -> None:
    due = asyncio.get_running_loop().time() + LATENCY_S
    _, sink = await run([Work(7, failure=b"x", due=due)], NO_EMULATION)
    assert [(request, at >= due) for request, _, at in sink.delivered] == [(7, True)]


async def test_a_new_stage_starts_its_links_statistics_afresh_a_rewire_keeps_them() -> None:
    """A re-wire to the same next node keeps the link's times (a failover shows a change);
    a newly loaded stage does not: its frames differ, and a pipeline watching the new plan
    would read the old frames' times as drift."""
    runner, sink = await run([Work(r, failure=bytes(FRAME_BYTES)) for r in range(3)], LINK)
    await runner.wire([Outlet(sink, "next", 1.0, LINK)], inbound=NO_EMULATION)
    assert runner.outbound_links()[0].link_frames == 3
    runner.install(SimpleNamespace())  # type: ignore[arg-type]  # its frames are not sent here
    assert runner.outbound_links()[0].link_frames == 0

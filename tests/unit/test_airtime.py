"""Shared media at run time: the arbiter's schedule and refusals, a worker's reservations,
an emulated link waiting for its media, and what deploy asks each link to reserve."""

from __future__ import annotations

import asyncio
import math
import struct
import time

import msgpack
import pytest

from coordinator.deploy import link_emulation
from node.airtime import Arbiters
from node.arbiter import Medium, pack, read_message
from node.link import EmulatedLink, LinkEmulation, MediumUse
from node.server import media_problem
from partition.cluster import MediumSpec
from partition.plan import Link


def ask(medium: Medium, request: object, now: float = 0.0) -> dict:
    return medium.answer(msgpack.packb(request), now)


def test_reservations_queue_on_the_medium() -> None:
    medium = Medium("wifi")
    assert ask(medium, {"earliest": 1.0, "seconds": 0.5}) == {"start": 1.0}
    assert ask(medium, {"earliest": 1.2, "seconds": 0.25}) == {"start": 1.5}  # busy until 1.5
    assert ask(medium, {"earliest": 3.0, "seconds": 0.1}) == {"start": 3.0}  # free again


@pytest.mark.parametrize("request_, problem", [
    ([1, 2], "exactly 'earliest' and 'seconds'"),
    ({"earliest": 0.0}, "exactly 'earliest' and 'seconds'"),
    ({"earliest": 0.0, "seconds": 1.0, "more": 1}, "exactly 'earliest' and 'seconds'"),
    ({"earliest": "now", "seconds": 1.0}, "finite numbers"),
    ({"earliest": 0.0, "seconds": math.nan}, "finite numbers"),
    ({"earliest": 0.0, "seconds": True}, "finite numbers"),
    ({"earliest": 0.0, "seconds": -1.0}, "must be within"),
    ({"earliest": 0.0, "seconds": 1e12}, "must be within"),
    ({"earliest": 1e12, "seconds": 1.0}, "ahead"),
])
def test_the_arbiter_refuses_bad_requests_and_keeps_its_schedule(request_, problem) -> None:
    medium = Medium("wifi")
    assert problem in ask(medium, request_)["error"]
    assert "not a msgpack message" in medium.answer(b"\xc1", 0.0)["error"]
    assert ask(medium, {"earliest": 0.0, "seconds": 1.0}) == {"start": 0.0}


async def _serve(medium: Medium) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(medium.serve_connection, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


def test_a_frame_too_long_gets_a_refusal_and_the_arbiter_serves_on() -> None:
    async def scenario() -> None:
        server, address = await _serve(Medium("wifi"))
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(struct.pack(">I", 10**9))
        await writer.drain()
        refusal = msgpack.unpackb(await read_message(reader))
        assert "longer than" in refusal["error"]
        assert await reader.read() == b""  # then it hangs up
        writer.close()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(pack({"earliest": 5.0, "seconds": 1.0}))
        await writer.drain()
        assert msgpack.unpackb(await read_message(reader)) == {"start": 5.0}
        writer.close()
        server.close()

    asyncio.run(scenario())


def test_each_use_is_reserved_after_the_one_before() -> None:
    async def scenario() -> None:
        server, address = await _serve(Medium("wifi"))
        arbiters = Arbiters({"wifi": address})
        station_to_station = [MediumUse("wifi", 1000.0, 2)]
        now = time.monotonic()
        assert await arbiters.hold(station_to_station, 100, now) == pytest.approx(now + 0.2)
        # a second frame offered at the same time waits for the first one's airtime
        assert await arbiters.hold(station_to_station, 100, now) == pytest.approx(now + 0.4)
        await arbiters.close()
        server.close()

    asyncio.run(scenario())


def test_an_idle_connection_is_closed_and_the_worker_reconnects(monkeypatch) -> None:
    monkeypatch.setattr("node.arbiter.IDLE_S", 0.05)
    monkeypatch.setattr("node.arbiter.MAX_CONNECTIONS", 1)

    async def scenario() -> None:
        server, address = await _serve(Medium("wifi"))
        arbiters = Arbiters({"wifi": address})
        use = [MediumUse("wifi", 1000.0, 1)]
        now = time.monotonic()
        assert await arbiters.hold(use, 100, now) == pytest.approx(now + 0.1)
        # a second connection beyond the limit is refused while the first one is open
        reader, writer = await asyncio.open_connection(*address.split(":"))
        assert "connections already" in msgpack.unpackb(await read_message(reader))["error"]
        writer.close()
        await asyncio.sleep(0.2)  # the arbiter closes the idle connection
        later = time.monotonic()
        assert await arbiters.hold(use, 100, later) == pytest.approx(later + 0.1)
        await arbiters.close()
        server.close()

    asyncio.run(scenario())


def test_an_unreachable_arbiter_is_skipped() -> None:
    async def scenario() -> float:
        arbiters = Arbiters({"wifi": "127.0.0.1:1"})
        return await arbiters.hold([MediumUse("wifi", 1000.0, 1)], 100, 7.0)

    assert asyncio.run(scenario()) == 7.0


class FakeBroker:
    def __init__(self, clear_after_s: float) -> None:
        self.clear_after_s = clear_after_s
        self.asked: list[tuple[tuple[MediumUse, ...], int]] = []

    async def hold(self, media, nbytes: int, now: float) -> float:
        self.asked.append((tuple(media), nbytes))
        return now + self.clear_after_s


@pytest.mark.parametrize("clear_after_s, busy_s", [(0.15, 0.15), (0.01, 0.05)])
def test_a_frame_leaves_when_its_link_and_its_media_have_carried_it(
    clear_after_s: float, busy_s: float
) -> None:
    wifi = (MediumUse("wifi", 2000.0, 2),)
    broker = FakeBroker(clear_after_s)
    link = EmulatedLink(LinkEmulation(bytes_per_s=2000.0, latency_s=0.5, media=wifi), broker)

    async def send() -> tuple[float, float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        arrives = await link.send(100)  # 0.05 s on the link
        return start, loop.time(), arrives

    start, left, arrives = asyncio.run(send())
    assert broker.asked == [(wifi, 100)]
    assert left - start == pytest.approx(busy_s, abs=0.03)
    assert arrives - left == pytest.approx(0.5, abs=0.03)


def test_a_link_across_media_needs_a_broker() -> None:
    with pytest.raises(ValueError, match="airtime broker"):
        EmulatedLink(LinkEmulation(media=(MediumUse("wifi", 1.0, 1),)))


def test_deploy_asks_each_link_for_its_uses_of_each_medium() -> None:
    wifi = MediumSpec("wifi", 1e6, ("cam", "board"))
    radio = MediumSpec("radio", 2e5, ("box",))

    def uses(src: str, dst: str) -> tuple[MediumUse, ...]:
        return link_emulation(Link(src, dst, 1e7, 0.001), True, (wifi, radio)).media

    assert uses("cam", "board") == (MediumUse("wifi", 1e6, 2),)
    assert uses("board", "box") == (MediumUse("wifi", 1e6, 1), MediumUse("radio", 2e5, 1))
    assert uses("cam", "cam") == ()
    assert link_emulation(Link("cam", "board", 1e7, 0.001), False, (wifi,)).media == ()


def test_a_worker_refuses_media_it_has_no_arbiter_for_or_bad_uses() -> None:
    arbiters = {"wifi": "127.0.0.1:9"}
    assert media_problem([MediumUse("wifi", 1e6, 2)], arbiters) is None
    assert "without its arbiter" in media_problem([MediumUse("mesh", 1e6, 1)], arbiters)
    assert "1 or 2 uses" in media_problem([MediumUse("wifi", 1e6, 3)], arbiters)
    assert "positive finite" in media_problem([MediumUse("wifi", 0.0, 1)], arbiters)

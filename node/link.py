"""Link emulation: a frame keeps a slow link busy for its transfer time, and arrives its
latency after that.

Frames pipeline over a link, as they do over a real one: the next frame starts crossing
when the previous one has left the sender, not when it has arrived. :class:`LinkSchedule`
says when each frame leaves and arrives (plain arithmetic on a clock the caller passes);
:class:`EmulatedLink` applies it in asyncio, and the caller releases each frame when it is
due (frames are due in the order they were sent).

A link may also cross shared media (one Wi-Fi's airtime): then the frame leaves only when
the media have carried it too, each reserved from its arbiter process
(:mod:`node.arbiter`) through :class:`AirtimeBroker`; the event loop's clock is
``time.monotonic``, the same system-wide clock the arbiters schedule on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MediumUse:
    """A shared medium a link crosses ``uses`` times (once per end of the link on it)."""

    name: str
    bytes_per_s: float
    uses: int

    def airtime_s(self, nbytes: int) -> float:
        """How long one use keeps the medium busy with a frame of ``nbytes``."""
        return nbytes / self.bytes_per_s


@dataclass(frozen=True)
class LinkEmulation:
    """A link's bandwidth and one-way latency (0 in a field means no emulation of it), and
    the shared media it crosses."""

    bytes_per_s: float = 0.0
    latency_s: float = 0.0
    media: tuple[MediumUse, ...] = ()

    def transfer_seconds(self, nbytes: int) -> float:
        """How long a frame of ``nbytes`` keeps the link busy (its latency does not), as
        the cost model prices a boundary's transfer."""
        return nbytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0


@dataclass(frozen=True)
class Crossing:
    """When a frame has left the sender (the link is free again) and when it arrives."""

    sent_at: float
    arrives_at: float


class LinkSchedule:
    """The times frames cross one link: each starts when it is offered or when the frame
    before it has left, whichever is later, leaves its transfer time after that, and
    arrives the link's latency after leaving.

    >>> schedule = LinkSchedule(LinkEmulation(bytes_per_s=1000, latency_s=0.5))
    >>> schedule.send(0.0, 100), schedule.send(0.0, 100)
    (Crossing(sent_at=0.1, arrives_at=0.6), Crossing(sent_at=0.2, arrives_at=0.7))
    """

    def __init__(self, emulation: LinkEmulation) -> None:
        self.emulation = emulation
        self._free_at = float("-inf")

    def send(self, now: float, nbytes: int) -> Crossing:
        """Reserve the link for a frame of ``nbytes`` offered at ``now``."""
        sent_at = self.reserve(now, self.emulation.transfer_seconds(nbytes))
        return Crossing(sent_at, sent_at + self.emulation.latency_s)

    def reserve(self, now: float, seconds: float) -> float:
        """Hold the link ``seconds`` from ``now`` or from when it is free, whichever is
        later; when it is free again."""
        self._free_at = max(now, self._free_at) + seconds
        return self._free_at


class AirtimeBroker(Protocol):
    """Reserves a medium's airtime from its arbiter (:class:`node.airtime.Arbiters`)."""

    async def hold(self, media: Sequence[MediumUse], nbytes: int, now: float) -> float:
        """Reserve every use of ``media`` for a frame of ``nbytes`` in turn, the first not
        before ``now``; the clock time when the last one ends."""
        ...


class EmulatedLink:
    """One emulated link, on the event loop's clock; ``broker`` reserves the airtime of the
    shared media it crosses (required when it crosses any)."""

    def __init__(self, emulation: LinkEmulation, broker: AirtimeBroker | None = None) -> None:
        if emulation.media and broker is None:
            raise ValueError("a link that crosses shared media needs an airtime broker")
        self.emulation = emulation
        self._schedule = LinkSchedule(emulation)
        self._broker = broker

    async def send(self, nbytes: int) -> float:
        """Wait until a frame of ``nbytes`` has left the sender (the link and its media are
        busy with the frames before it meanwhile); the loop time when it arrives at the
        other end."""
        now = asyncio.get_running_loop().time()
        sent_at = self._schedule.send(now, nbytes).sent_at
        if self.emulation.media and self._broker is not None:
            sent_at = max(sent_at, await self._broker.hold(self.emulation.media, nbytes, now))
        await until(sent_at)
        return sent_at + self.emulation.latency_s


async def until(due: float) -> None:
    """Wait until the event loop's clock reaches ``due``."""
    wait = due - asyncio.get_running_loop().time()
    if wait > 0:
        await asyncio.sleep(wait)


NO_EMULATION = LinkEmulation()
"""A link used as it is."""

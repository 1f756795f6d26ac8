"""Link emulation: a frame keeps a slow link busy for its transfer time, and arrives its
latency after that.

Frames pipeline over a link, as they do over a real one: the next frame starts crossing
when the previous one has left the sender, not when it has arrived. :class:`LinkSchedule`
says when each frame leaves and arrives (plain arithmetic on a clock the caller passes);
:class:`EmulatedLink` applies it in asyncio, and the caller releases each frame when it is
due (frames are due in the order they were sent).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LinkEmulation:
    """A link's bandwidth and one-way latency; 0 in a field means no emulation of it."""

    bytes_per_s: float = 0.0
    latency_s: float = 0.0

    def transfer_seconds(self, nbytes: int) -> float:
        """How long a frame of ``nbytes`` keeps the link busy (its latency does not), as
        the cost model prices a boundary's transfer."""
        return nbytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0

    def latency_only(self) -> LinkEmulation:
        """This link without its bandwidth: for a link the network itself limits."""
        return replace(self, bytes_per_s=0.0)


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
        sent_at = max(now, self._free_at) + self.emulation.transfer_seconds(nbytes)
        self._free_at = sent_at
        return Crossing(sent_at, sent_at + self.emulation.latency_s)


class EmulatedLink:
    """One emulated link, on the event loop's clock."""

    def __init__(self, emulation: LinkEmulation) -> None:
        self.emulation = emulation
        self._schedule = LinkSchedule(emulation)

    async def send(self, nbytes: int) -> float:
        """Wait until a frame of ``nbytes`` has left the sender (the link is busy with the
        frames before it meanwhile); the loop time when it arrives at the other end."""
        loop = asyncio.get_running_loop()
        crossing = self._schedule.send(loop.time(), nbytes)
        await until(crossing.sent_at)
        return crossing.arrives_at


async def until(due: float) -> None:
    """Wait until the event loop's clock reaches ``due``."""
    wait = due - asyncio.get_running_loop().time()
    if wait > 0:
        await asyncio.sleep(wait)


NO_EMULATION = LinkEmulation()
"""A link used as it is."""

"""Link emulation: hold each frame for its transfer time over a slow link."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkEmulation:
    """A link's bandwidth and one-way latency; 0 in a field means no emulation of it."""

    bytes_per_s: float = 0.0
    latency_s: float = 0.0

    def seconds(self, nbytes: int) -> float:
        """Time a frame of ``nbytes`` occupies the link, as the cost model prices it."""
        transfer = nbytes / self.bytes_per_s if self.bytes_per_s > 0 else 0.0
        return transfer + self.latency_s


class EmulatedLink:
    """One emulated link: frames cross it one at a time, each held :meth:`seconds` long.

    The link is occupied for the whole transfer time, latency included, which is how
    ``partition.costs.CostModel.transfer_seconds`` prices a boundary.
    """

    def __init__(self, emulation: LinkEmulation) -> None:
        self.emulation = emulation
        self._busy = asyncio.Lock()

    async def carry(self, nbytes: int) -> None:
        """Wait until a frame of ``nbytes`` has crossed the link."""
        delay = self.emulation.seconds(nbytes)
        if delay > 0:
            async with self._busy:
                await asyncio.sleep(delay)


NO_EMULATION = LinkEmulation()
"""A link used as it is."""

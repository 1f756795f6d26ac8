"""A worker's side of the shared media: reserving airtime from each medium's arbiter."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import msgpack

from node.arbiter import pack, read_message
from node.link import MediumUse
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)


class ArbiterError(EdgesplitError):
    """An arbiter refused a reservation or could not be reached."""


class _Arbiter:
    """One connection to a medium's arbiter, opened on first use; one request at a time."""

    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self._lock = asyncio.Lock()
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def reserve(self, earliest: float, seconds: float) -> float:
        """The start of ``seconds`` of airtime, not before ``earliest``."""
        async with self._lock:
            request = pack({"earliest": earliest, "seconds": seconds})
            try:
                try:
                    reply = await self._ask(request)
                except (OSError, asyncio.IncompleteReadError):
                    # The arbiter may have closed an idle connection: one new one.
                    reply = await self._ask(request)
            except (OSError, ValueError, asyncio.IncompleteReadError) as err:
                raise ArbiterError(f"medium {self.name!r}: arbiter at {self.address} is "
                                   f"unreachable ({err!r})") from err
        if not isinstance(reply, dict) or "start" not in reply:
            raise ArbiterError(f"medium {self.name!r}: arbiter refused: {reply!r}")
        return float(reply["start"])

    async def _ask(self, request: bytes) -> object:
        """Send ``request`` (a connection opened if none is) and read the reply; a failed
        connection is dropped."""
        try:
            if self._stream is None:
                host, _, port = self.address.rpartition(":")
                self._stream = await asyncio.open_connection(host, int(port))
            reader, writer = self._stream
            writer.write(request)
            await writer.drain()
            return msgpack.unpackb(await read_message(reader))
        except (OSError, ValueError, asyncio.IncompleteReadError):
            self._stream = None
            raise

    async def close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None


class Arbiters:
    """The arbiters of the media this worker may cross, by medium name (``edge-node
    --medium NAME=HOST:PORT``)."""

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self._arbiters = {name: _Arbiter(name, address) for name, address in addresses.items()}

    def missing(self, media: Sequence[MediumUse]) -> list[str]:
        """The names in ``media`` this worker has no arbiter for."""
        return [use.name for use in media if use.name not in self._arbiters]

    async def hold(self, media: Sequence[MediumUse], nbytes: int, now: float) -> float:
        """Reserve every use of ``media`` for a frame of ``nbytes`` in turn (a use starts
        when the one before it ends), the first not before ``now``; when the last ends.

        An arbiter that refuses or cannot be reached is logged and skipped: the frame then
        crosses that medium without waiting for it.
        """
        free = now
        for use in media:
            seconds = use.airtime_s(nbytes)
            for _ in range(use.uses):
                try:
                    free = await self._arbiters[use.name].reserve(free, seconds) + seconds
                except ArbiterError as err:
                    log.error("%s; the frame crosses without its airtime", err)
        return free

    async def close(self) -> None:
        await asyncio.gather(*(arbiter.close() for arbiter in self._arbiters.values()))

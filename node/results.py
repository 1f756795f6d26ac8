"""The last stage's result frames, held in order for the one client that owns them.

One ``Results`` stream at a time owns the results: the client that connected first (the
one that deployed and runs the pipeline). The frames wait in a bounded buffer. A stalled
reader never stalls the stages for long:

* an owner that reads nothing for ``stall_s`` seconds while a frame waits to be written to
  it is cut off (its stream ends with RESOURCE_EXHAUSTED, the node logs one line), and the
  frames buffered for it are dropped with it, as they are when an owner leaves;
* with no owner, results are held until the buffer is full; a full buffer that nobody claims
  for ``stall_s`` seconds is dropped (logged), so the stages go on.

A dropped result is never answered: its client has lost its results stream, and fails its
requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from node.errors import LimitError

log = logging.getLogger(__name__)

HANDOVER_S = 10.0
"""How long a new ``Results`` stream waits for the owner before it to go (a client that
closes its stream and at once opens another, before the node has seen the close; on a loaded
machine that can take seconds)."""


class ResultsOwner:
    """Result frames for the one ``Results`` stream that owns them; the last stage's sink."""

    def __init__(self, depth: int, stall_s: float) -> None:
        self._buffer: asyncio.Queue[bytes] = asyncio.Queue(depth)
        self._stall_s = stall_s
        self._free = asyncio.Event()
        self._free.set()

    @contextlib.asynccontextmanager
    async def own(self) -> AsyncIterator[None]:
        """Own the results for the duration of the ``async with`` block.

        Raises
        ------
        LimitError
            If another stream still owns them after :data:`HANDOVER_S` seconds.
        """
        try:
            async with asyncio.timeout(HANDOVER_S):
                while not self._free.is_set():  # another waiter may have taken it first
                    await self._free.wait()
        except TimeoutError:
            raise LimitError(
                "another client already reads this node's results; only the client that "
                "runs the pipeline may read them"
            ) from None
        self._free.clear()
        try:
            yield
        finally:
            self._drop_buffered()
            self._free.set()

    async def pump(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        """Write buffered frames to the owner, in order, for ever (call inside :meth:`own`).

        Raises
        ------
        LimitError
            If one write takes longer than the stall time: the owner stopped reading.
        """
        while True:
            frame = await self._buffer.get()
            try:
                async with asyncio.timeout(self._stall_s):
                    await write(frame)
            except TimeoutError:
                log.warning(
                    "cut off a Results reader that read nothing for %g s (%d result(s) dropped)",
                    self._stall_s, self._buffer.qsize() + 1,
                )
                raise LimitError(
                    f"this Results stream read nothing for {self._stall_s:g} s while results "
                    "waited, so the node closed it; read results as they arrive"
                ) from None

    async def deliver(self, request_id: int, frame: bytes) -> None:
        """Buffer ``frame``; waits while the buffer is full, at most about the stall time."""
        while True:
            try:
                async with asyncio.timeout(self._stall_s):
                    await self._buffer.put(frame)
                return
            except TimeoutError:
                if self._free.is_set():  # an owner frees the buffer or is cut off by pump()
                    dropped = self._drop_buffered()
                    log.warning(
                        "dropped %d result(s) that no Results stream claimed for %g s",
                        dropped, self._stall_s,
                    )

    @property
    def destination(self) -> str:
        return "the Results stream"

    @property
    def backlog(self) -> int:
        """Result frames waiting for the owner to read them."""
        return self._buffer.qsize()

    async def close(self) -> None:
        """The node was wired elsewhere: drop the results held here (the coordinator
        replays their requests), which also frees a delivery waiting on a full buffer."""
        dropped = self._drop_buffered()
        if dropped:
            log.info("dropped %d held result(s): the node was wired elsewhere", dropped)

    def _drop_buffered(self) -> int:
        dropped = self._buffer.qsize()
        while not self._buffer.empty():
            self._buffer.get_nowait()
        return dropped

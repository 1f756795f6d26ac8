"""Fan-out of the last stage's frames to every ``Results`` subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)


class ResultsHub:
    """Delivers each serialized result frame to every subscriber, each through a bounded queue.

    With no subscriber, delivery waits for one: results are held (pushing back on the
    pipeline), never dropped. A slow subscriber slows delivery to all.
    """

    def __init__(self, depth: int) -> None:
        self._depth = depth
        self._subscribers: list[asyncio.Queue[bytes]] = []
        self._changed = asyncio.Condition()
        self._closed = 0

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes]]:
        """Register a subscriber for the duration of the ``async with`` block."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(self._depth)
        async with self._changed:
            self._subscribers.append(queue)
            self._changed.notify_all()
        try:
            yield queue
        finally:
            self._subscribers.remove(queue)
            while not queue.empty():  # unblock a delivery waiting on this queue
                queue.get_nowait()

    async def deliver(self, request_id: int, frame: bytes) -> None:
        """Put ``frame`` on every subscriber's queue, waiting for a subscriber if none."""
        if not self._subscribers:
            log.info("holding result %d until a Results subscriber connects", request_id)
            closed = self._closed
            async with self._changed:
                await self._changed.wait_for(
                    lambda: bool(self._subscribers) or self._closed != closed
                )
            if not self._subscribers:
                log.info("dropped result %d: the node was wired elsewhere", request_id)
                return
        for queue in list(self._subscribers):
            await queue.put(frame)

    async def close(self) -> None:
        """Stop holding a result for a subscriber (the node was wired elsewhere); the
        subscribers themselves end with their calls."""
        async with self._changed:
            self._closed += 1
            self._changed.notify_all()

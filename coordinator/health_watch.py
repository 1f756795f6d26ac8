"""Watching one node: the standard health service, probed with deadlines and watched for
changes, turned into one of a few states.

A node is DEAD once it has not answered a health check for :data:`DEAD_AFTER_S` and the
last :data:`DEAD_AFTER_FAILURES` checks failed (killed, hung with SIGSTOP, unplugged); a
refused connection or a broken watch stream in between is retried, not believed, and a
coordinator that was itself stalled (a busy event loop) checks again before judging.
DRAINING means the process reports NOT_SERVING (it is leaving on SIGTERM), NO_STAGE that
it answers but runs no stage (for example after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable

from node.client import WorkerHandle
from node.health import OVERALL, STAGE_SERVICE
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.25
"""Time between two health checks of a node."""
PROBE_TIMEOUT_S = 0.8
"""Deadline of one health check."""
DEAD_AFTER_S = 1.5
"""A node that has not answered for this long is dead (the issue asks for < 2 s)."""
DEAD_AFTER_FAILURES = 2
"""Consecutive failed health checks before a node can be declared dead."""
STALL_SLACK_S = 0.3
"""A failed check that took this much longer than its deadline says that the coordinator's
own event loop was stalled (a busy CPU), so it does not count against the node."""
WATCH_BACKOFF_S = (0.1, 0.2, 0.4, 0.8)
"""Waits before re-opening a broken watch stream (the last one repeats)."""


class NodeState(enum.Enum):
    """What the coordinator believes about a node."""

    UNKNOWN = "unknown"
    SERVING = "serving"
    NO_STAGE = "no stage"
    DRAINING = "draining"
    DEAD = "dead"

    @property
    def usable(self) -> bool:
        """The node answers and is not leaving: a plan may give it a stage."""
        return self in (NodeState.SERVING, NodeState.NO_STAGE)


StateCallback = Callable[["NodeWatch", NodeState], None]


class NodeWatch:
    """Probes and watches ``handle``'s health until cancelled; calls ``on_change`` on each
    change of state. ``last_ok`` is when the node last answered (monotonic seconds)."""

    def __init__(self, handle: WorkerHandle, on_change: StateCallback) -> None:
        self.handle = handle
        self.state = NodeState.UNKNOWN
        self.last_ok = time.monotonic()
        self.changed_at = self.last_ok
        self.was_lost = False
        """The state before the last change was DEAD or DRAINING."""
        self._on_change = on_change
        self._stage_serving: bool | None = None
        self._failures = 0
        self._draining = False
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def name(self) -> str:
        return self.handle.name

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._probe_loop()),
                       asyncio.create_task(self._watch_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def suspect(self) -> None:
        """The data path saw trouble with this node: probe it now."""
        self._kick.set()

    async def _probe_loop(self) -> None:
        while True:
            # never wait past the moment the node would be declared dead
            left = DEAD_AFTER_S - (time.monotonic() - self.last_ok)
            timeout = max(0.05, min(PROBE_TIMEOUT_S, left + 0.05))
            sent = time.monotonic()
            try:
                serving, stage = await asyncio.gather(
                    self.handle.check_health(OVERALL, timeout),
                    self.handle.check_health(STAGE_SERVICE, timeout),
                )
            except EdgesplitError:
                if time.monotonic() - sent < timeout + STALL_SLACK_S:
                    self._failures += 1
                else:  # this process was stalled, not (necessarily) the node: ask again
                    log.debug("health check of %s judged late; not counted", self.name)
            else:
                self._failures = 0
                self.last_ok = time.monotonic()
                self._draining = not serving
                self._stage_serving = stage
            self._update()
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_INTERVAL_S):
                    await self._kick.wait()

    async def _watch_loop(self) -> None:
        """Changes of the stage service arrive at once (a drain, a lost stage)."""
        failures = 0
        while True:
            try:
                async for serving in self.handle.watch_health(STAGE_SERVICE):
                    failures = 0
                    self.last_ok = time.monotonic()
                    if serving:
                        self._stage_serving = True
                        self._update()
                    else:
                        self._kick.set()  # draining or stageless: the probe tells which
            except EdgesplitError:
                self._kick.set()
            await asyncio.sleep(WATCH_BACKOFF_S[min(failures, len(WATCH_BACKOFF_S) - 1)])
            failures += 1

    def _update(self) -> None:
        if (time.monotonic() - self.last_ok > DEAD_AFTER_S
                and self._failures >= DEAD_AFTER_FAILURES):
            state = NodeState.DEAD
        elif self._draining:
            state = NodeState.DRAINING
        elif self._stage_serving is None:
            state = self.state
        else:
            state = NodeState.SERVING if self._stage_serving else NodeState.NO_STAGE
        if state is not self.state and state is not NodeState.UNKNOWN:
            log.debug("node %s: %s -> %s", self.name, self.state.value, state.value)
            self.was_lost = self.state in (NodeState.DEAD, NodeState.DRAINING)
            self.state = state
            self.changed_at = time.monotonic()
            self._on_change(self, state)

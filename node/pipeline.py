"""The stage runner: a bounded queue in, a compute loop, a send loop and a delivery loop.

Frames are checked by the receiver and queued (a full queue makes the receiver wait, which
gRPC flow control turns into backpressure on the sender); a frame that crossed an emulated
inbound link waits in the queue until it is due. The compute loop decodes them, runs the
stage and encodes its output for the outbound link, all in a worker thread, stretches that
to the emulated speed (its calibrated time over the speed factor), and queues the frame;
the send loop deals it to one of the node's outbound routes (one per node of the next
stage, in proportion to their shares; the Results stream on a last stage's node), holds
that route's emulated link for the frame's transfer time, and the
delivery loop hands each frame to the sink when the link's latency has passed, in order,
while the send loop already sends the next. Compute, send and delivery overlap, so
consecutive stages work on different requests at once, like a pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from node.codec import ReceivedFrame, StageReport, encode_failure, encode_frame
from node.config import Device
from node.dealer import Dealer
from node.link import AirtimeBroker, EmulatedLink, LinkEmulation, until
from node.messages import Failure, FailureCode, OutboundLink, StageInfo
from partition.artifact import ProgramRunner, run_stage
from partition.compression import LinkEncoding
from partition.loader import example_tensor
from partition.queues import IN_FLIGHT_FRAMES, QUEUE_DEPTH
from partition.spec import StageSpec

log = logging.getLogger(__name__)

CALIBRATION_RUNS = 10
"""Runs of a freshly loaded stage whose median time is its compute time on this machine (the
median, as a profile's layer times are: a plan's predictions come from those), at least."""

CALIBRATION_S = 0.5
"""Seconds the runs should last, at least (see :func:`calibration_runs`): ten runs of a short
stage last a fifth of a second, and a burst of other work that long can move their median
(an emulated device's time is that median over its speed factor)."""

CALIBRATION_MAX_RUNS = 50
"""Runs of a stage, at most (a very short stage stops here, well short of half a second)."""

STATS_WINDOW = 100
"""How many recent requests the median stage time is taken over."""


def calibration_runs(times: Sequence[float]) -> int:
    """How many runs to time a stage over, given the times of its runs so far: enough that
    runs as fast as the fastest so far last :data:`CALIBRATION_S` (bursts of other work make
    runs slower, never faster), between :data:`CALIBRATION_RUNS` and
    :data:`CALIBRATION_MAX_RUNS`."""
    if not times:
        return CALIBRATION_RUNS
    wanted = math.ceil(CALIBRATION_S / max(min(times), 1e-9))
    return max(CALIBRATION_RUNS, min(CALIBRATION_MAX_RUNS, wanted))


@dataclass(frozen=True)
class LoadedStage:
    """A stage ready to run: its spec, its program (on the node's device), its size, and
    the median of its calibration runs here (what an emulated slower device is scaled
    from)."""

    spec: StageSpec
    program: ProgramRunner
    size_bytes: int
    calibrated_s: float

    @property
    def info(self) -> StageInfo:
        return StageInfo(self.spec.index, self.spec.artifact_sha256, self.size_bytes,
                         self.calibrated_s)


@dataclass(frozen=True)
class Work:
    """A frame checked for ``stage`` (its tensors are decoded when it runs), or
    (``failure``) a failure frame to pass on."""

    request_id: int
    stage: LoadedStage | None = None
    frame: ReceivedFrame | None = None
    failure: bytes | None = None
    due: float = float("-inf")
    """Event loop time the frame arrives over the emulated inbound link."""


@dataclass(frozen=True)
class InFlight:
    """A frame that left this node over one route's emulated link: when it arrives, and how
    long it kept the link busy."""

    request_id: int
    frame: bytes
    route: Route
    arrives_at: float
    busy_s: float


class FrameSink(Protocol):
    """Where the send loop delivers frames: a next hop, or the Results subscribers."""

    async def deliver(self, request_id: int, frame: bytes) -> None: ...

    @property
    def destination(self) -> str:
        """Where frames go: the next node's address, or the Results subscribers."""
        ...

    @property
    def backlog(self) -> int:
        """Frames handed over that the receiver has not taken yet."""
        ...

    async def close(self) -> None: ...


class RecentStats:
    """How many samples were recorded, and the median of the most recent ones."""

    def __init__(self) -> None:
        self.count = 0
        self._recent: deque[float] = deque(maxlen=STATS_WINDOW)

    def record(self, value: float) -> None:
        self.count += 1
        self._recent.append(value)

    @property
    def p50(self) -> float:
        """The median of the last :data:`STATS_WINDOW` samples; 0 before the first."""
        return statistics.median(self._recent) if self._recent else 0.0


class LinkStats:
    """The outbound link's throughput and busy time per frame (its emulated transfer time
    and the write to the next node; not its latency, which keeps the link free), over
    frames the next node took at once (a frame sent while the next node holds back earlier
    ones measures the next node, not the link)."""

    def __init__(self) -> None:
        self.bytes_per_s = RecentStats()
        self.seconds = RecentStats()

    def record(self, nbytes: int, seconds: float) -> None:
        self.bytes_per_s.record(nbytes / max(seconds, 1e-9))
        self.seconds.record(seconds)


@dataclass(frozen=True)
class Outlet:
    """A way out of this node as ``Wire`` names it: the sink, the receiving node's name
    (``None`` for the Results stream), its share of the frames and the link's emulation."""

    sink: FrameSink
    node: str | None
    share: float = 1.0
    link: LinkEmulation = field(default_factory=LinkEmulation)


@dataclass(eq=False)
class Route:
    """An outlet in use: its emulated link, the frames dealt to it and its statistics."""

    outlet: Outlet
    link: EmulatedLink
    stats: LinkStats
    dealt: int = 0

    def report(self) -> OutboundLink:
        return OutboundLink(self.outlet.node, self.dealt, self.stats.seconds.count,
                            self.stats.bytes_per_s.p50, self.stats.seconds.p50)


class StageRunner:
    """Runs this node's stage on queued frames and sends the results on; ``airtime``
    reserves the shared media its emulated links cross."""

    def __init__(self, *, node_name: str, device: Device, speed_factor: float,
                 airtime: AirtimeBroker | None = None) -> None:
        self.node_name = node_name
        self._airtime = airtime
        self.stats = RecentStats()
        """Stage time (real plus emulated) per request."""
        self.stage: LoadedStage | None = None
        self.inbound = EmulatedLink(LinkEmulation())
        self._routes: list[Route] = []
        self._dealer = Dealer([1.0])
        self._encoding = LinkEncoding.RAW
        self._device = torch.device(device.value)
        self._speed_factor = speed_factor
        self._inbox: asyncio.Queue[Work] = asyncio.Queue(QUEUE_DEPTH)
        self._outbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(QUEUE_DEPTH)
        self._in_flight: asyncio.Queue[InFlight] = asyncio.Queue(IN_FLIGHT_FRAMES)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self.holding = 0
        self.bytes_sent = 0
        """Bytes of the frames sent on since the node started."""
        """Frames accepted and not yet handed to the sink."""

    @property
    def wired(self) -> bool:
        return bool(self._routes)

    @property
    def destinations(self) -> list[str]:
        """Where frames go: the next nodes' addresses, or the Results subscribers."""
        return [route.outlet.sink.destination for route in self._routes]

    def outbound_links(self) -> list[OutboundLink]:
        """Each route's frames dealt and link statistics since it was wired."""
        return [route.report() for route in self._routes]

    @property
    def queue_depth(self) -> int:
        return self._inbox.qsize()

    @property
    def speed_factor(self) -> float:
        return self._speed_factor

    def set_speed_factor(self, speed_factor: float) -> None:
        """Emulate another speed from the next request on (a device slowing down)."""
        log.warning("speed factor %g -> %g", self._speed_factor, speed_factor)
        self._speed_factor = speed_factor

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._compute_loop(), name="compute"),
            asyncio.create_task(self._send_loop(), name="send"),
            asyncio.create_task(self._delivery_loop(), name="delivery"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_crash)

    async def stop(self) -> None:
        """Stop both loops, close the sink and release the worker thread."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for route in self._routes:
            await route.outlet.sink.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def place(self, program: ProgramRunner, spec: StageSpec, size_bytes: int) -> LoadedStage:
        """Put a freshly loaded program on this node's device, warm it up (so the first
        request pays no one-time initialization) and time it (blocking)."""
        program = program.to(self._device)
        frame = {t.name: example_tensor(t).to(self._device) for t in spec.receives}
        run_stage(program, spec, frame)
        times: list[float] = []
        while len(times) < calibration_runs(times):
            started = time.perf_counter()  # the same work as a request: compute and encode
            encode_frame(0, run_stage(program, spec, frame))
            times.append(time.perf_counter() - started)
        return LoadedStage(spec, program, size_bytes, statistics.median(times))

    def install(self, stage: LoadedStage) -> None:
        """Run ``stage`` from the next frame on; its statistics start afresh, and so do its
        outbound links' (their frames are the new stage's: times per frame of the old ones
        would read as drift to a pipeline watching the new plan)."""
        self.stage = stage
        self.stats = RecentStats()
        for route in self._routes:
            route.stats = LinkStats()

    async def wire(
        self, outlets: Sequence[Outlet], inbound: LinkEmulation,
        encoding: LinkEncoding = LinkEncoding.RAW,
    ) -> None:
        """Deal output frames among ``outlets`` in proportion to their shares, in
        ``encoding``, from now on; a link's statistics start afresh if it goes elsewhere or
        carries another encoding (a re-wire of the same link keeps them, so a change shows).
        Sinks no longer used are closed in the background (a hung next hop takes its close
        timeout, and the new wiring need not wait for it)."""
        kept = {route.outlet.sink.destination: route.stats for route in self._routes
                if encoding is self._encoding}
        old = [route.outlet.sink for route in self._routes]
        self._routes = [
            Route(outlet, EmulatedLink(outlet.link, self._airtime),
                  kept.get(outlet.sink.destination) or LinkStats())
            for outlet in outlets
        ]
        self._dealer = Dealer([outlet.share for outlet in outlets])
        self._encoding = encoding
        self.inbound = EmulatedLink(inbound, self._airtime)
        for sink in old:
            if all(sink is not outlet.sink for outlet in outlets):
                closing = asyncio.create_task(sink.close())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def submit(self, work: Work) -> None:
        """Queue ``work``; waits while the queue is full."""
        self.holding += 1
        try:
            await self._inbox.put(work)
        except BaseException:
            self.holding -= 1
            raise

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            work = await self._inbox.get()
            await until(work.due)
            if work.stage is None or work.frame is None:
                if work.failure is None:
                    raise RuntimeError(f"work for request {work.request_id} has nothing to do")
                await self._outbox.put((work.request_id, work.failure))
                continue
            started = time.perf_counter()
            frame = await loop.run_in_executor(
                self._executor, self._compute, work.stage, work.frame
            )
            if self._speed_factor < 1:
                # An emulated device takes its calibrated time over the speed factor, however
                # busy the machine hosting it is (sleeping, so it burns no CPU meanwhile).
                emulated_s = work.stage.calibrated_s / self._speed_factor
                await asyncio.sleep(emulated_s - (time.perf_counter() - started))
            self.stats.record(time.perf_counter() - started)
            await self._outbox.put((work.request_id, frame))

    def _compute(self, stage: LoadedStage, received: ReceivedFrame) -> bytes:
        """Decode one frame, run the stage on it and encode the result for the outbound
        link (in the worker thread); a traced request's frame gets this stage's report
        added to its trace."""
        request_id, trace = received.request_id, received.trace
        try:
            tensors = received.tensors()
            frame = {name: t.to(self._device) for name, t in tensors.items()}
            sends = run_stage(stage.program, stage.spec, frame)
            if trace is not None:
                report = StageReport(stage.spec.index, fingerprint(tensors), fingerprint(sends))
                trace = (*trace, report)
            return encode_frame(request_id, sends, trace, self._encoding)
        except Exception as err:  # the program raised: answer this request with a failure
            log.warning("stage %d failed on request %d: %r", stage.spec.index, request_id, err)
            return self.failure_frame(
                request_id,
                FailureCode.STAGE_FAILED,
                f"stage {stage.spec.index} on node {self.node_name!r} failed on request "
                f"{request_id}: {type(err).__name__}: {err}",
            )

    def failure_frame(self, request_id: int, code: FailureCode, message: str) -> bytes:
        """A serialized frame answering ``request_id`` with a failure at this node's stage."""
        index = self.stage.spec.index if self.stage is not None else -1
        return encode_failure(Failure(request_id, code, message, self.node_name, index))

    async def _send_loop(self) -> None:
        while True:
            request_id, frame = await self._outbox.get()
            try:
                if not self._routes:
                    raise RuntimeError("a frame was computed before the node was wired")
                route = self._routes[self._dealer.deal()]
                route.dealt += 1
                started = time.perf_counter()
                arrives_at = await route.link.send(len(frame))
                busy_s = time.perf_counter() - started
                await self._in_flight.put(InFlight(request_id, frame, route, arrives_at, busy_s))
            except BaseException:
                self.holding -= 1
                raise

    async def _delivery_loop(self) -> None:
        while True:
            sent = await self._in_flight.get()
            try:
                await until(sent.arrives_at)
                sink = sent.route.outlet.sink
                unhindered = sink.backlog <= 1  # one frame may still be crossing the link
                started = time.perf_counter()
                await sink.deliver(sent.request_id, sent.frame)
            finally:
                self.holding -= 1
            self.bytes_sent += len(sent.frame)
            if unhindered and any(route.outlet.sink is sink for route in self._routes):
                sent.route.stats.record(len(sent.frame),
                                        sent.busy_s + time.perf_counter() - started)


FINGERPRINT_WEIGHTS = 7
"""Period of the position weights (-3..3) of a fingerprint's weighted sum."""

FINGERPRINT_VALUES = 4
"""Values a fingerprint holds per tensor."""


def fingerprint(tensors: Mapping[str, torch.Tensor]) -> tuple[float, ...]:
    """A few float64 statistics of each tensor, by name: its element count, the sum of its
    absolute values, its sum and a sum weighted by position. Equal frames give equal
    fingerprints; frames equal up to float rounding give close ones (compare each value
    with a tolerance scaled by the absolute sum, which bounds the other sums)."""
    values: list[float] = []
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        if tensor.is_complex():
            tensor = torch.view_as_real(tensor)
        flat = tensor.reshape(-1).to(torch.float64)
        weights = torch.arange(flat.numel(), dtype=torch.float64) % FINGERPRINT_WEIGHTS - 3
        values += [float(flat.numel()), float(flat.abs().sum()), float(flat.sum()),
                   float((flat * weights).sum())]
    return tuple(values)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the %s loop died", task.get_name(), exc_info=task.exception())

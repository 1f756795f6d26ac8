"""The Python API: send requests through a deployed plan and get their outputs back.

    async with await Pipeline.connect(plan) as pipeline:
        outputs = await pipeline.infer(input_ids)            # one request
        many = await pipeline.map(batches)                   # concurrently, in order

Every accepted request is answered exactly once, only by a frame on the results stream of
the last stage and under a random id nobody else can guess: by its outputs, or by an error
naming the cause (:class:`RequestFailedError`, :class:`RequestTimeoutError`,
:class:`PipelineBrokenError`). With failover on (the default), a node that dies, hangs or
leaves is routed around: the plan is re-made over the nodes left, only the stages that
change are loaded, the chain is rewired and every unanswered request is replayed; a node
that comes back is used again. A node that replicates a stage with other nodes is just left
out: its share goes to the stage's other nodes, its neighbours are rewired and every
unanswered request is replayed, without re-planning. Inputs are dealt among the first
stage's nodes by their shares, and results are taken from every node of the last stage.
See :mod:`coordinator.ledger` for how answers count once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

import torch

from coordinator.deploy import hop_encoding, replica_wiring, replicas
from coordinator.drift import POLL_S, Drift, DriftWatch
from coordinator.events import EventLog, Replan, stage_names
from coordinator.health_watch import NodeState, NodeWatch
from coordinator.ledger import Ledger, Request, RequestFailedError
from coordinator.netns import RANGE
from coordinator.replicas import without_replicas
from node.client import FrameSender, GrpcWorkerHandle, Result, ResultStream, WorkerHandle
from node.dealer import Dealer
from node.security import client_security, is_loopback
from partition.errors import EdgesplitError, TensorSpecError
from partition.measured import AS_PLANNED, Measured
from partition.plan import Plan, PlannedStage, Priced
from partition.spec import TensorSpec
from partition.split import StageArtifact
from partition.units import format_bytes

if TYPE_CHECKING:
    from coordinator.recovery import PlanRecovery  # imported when needed: it loads the planner

__all__ = ["Pipeline", "PipelineBrokenError", "RequestFailedError", "RequestTimeoutError",
           "Replanning", "bind_inputs"]

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8
"""Requests in flight at once: enough to keep every stage of a short pipeline busy."""

DEADLINE_FLOOR_S = 10.0
"""The shortest default deadline of a request."""
DEADLINE_FACTOR = 4.0
"""Default deadline: this many times the predicted time of a full window of requests."""
TIMEOUT_RETRIES = 1
"""Resends of a request whose deadline passed while the chain looked healthy."""
SWITCH_ATTEMPTS = 5
"""Attempts at switching to a new plan (a node may fail while it is loaded) before giving up."""
REBALANCE_GAIN = 0.05
"""A better plan (a node came back, or one drifted) is switched to only if it is predicted
this much faster..."""
PAYBACK_S = 60.0
"""...and if the time it saves over this long exceeds the pause moving the stages costs."""

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


class PipelineBrokenError(EdgesplitError):
    """The pipeline lost a node and could not recover (or failover is off)."""


class RequestTimeoutError(EdgesplitError):
    """A request got no answer within its deadline."""


class Replanning(Protocol):
    """The pipeline's seam to the planner (:class:`coordinator.recovery.PlanRecovery`)."""

    async def prepare(self) -> object: ...

    async def prewarm(
        self, plan: Plan, usable: Collection[str], measured: Measured = AS_PLANNED
    ) -> None: ...

    async def replan(
        self, usable: Collection[str], measured: Measured = AS_PLANNED
    ) -> Plan: ...

    async def price(self, plan: Plan, measured: Measured = AS_PLANNED
                    ) -> Priced: ...

    async def repriced(self, plan: Plan, measured: Measured = AS_PLANNED) -> Plan: ...

    async def artifact(self, stage: PlannedStage) -> StageArtifact: ...


def default_deadline(plan: Plan, window: int) -> float:
    """A request's default deadline: generous against the plan's predicted latency."""
    predicted = plan.latency_s + window * plan.bottleneck_s
    return max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * predicted)


def loopback(plan: Plan) -> bool:
    """True if every node of the plan is on this machine (a simulated cluster): on the
    loopback, or on the home addresses ``coordinator up --isolation kernel`` gives its
    nodes' namespaces (:data:`coordinator.netns.RANGE`)."""
    return all(is_loopback(address) or _in_namespace_range(address)
               for address in plan.addresses.values())


def _in_namespace_range(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.rpartition(":")[0]) in RANGE
    except ValueError:  # a host name
        return False


def bind_inputs(specs: Sequence[TensorSpec], inputs: Inputs) -> dict[str, torch.Tensor]:
    """Name the inputs (a tensor, a tuple in call order, or a dict by name) and check each
    against the model's signature before anything is sent.

    Raises
    ------
    TensorSpecError
        If a tensor is missing, extra, or of the wrong dtype or shape; the message lists the
        expected signature.
    """
    signature = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in specs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        named = dict(inputs)
    else:
        values = list(inputs)
        if len(values) != len(specs):
            raise TensorSpecError(
                f"got {len(values)} input tensor(s), the model takes {len(specs)}: {signature}"
            )
        named = {spec.name: value for spec, value in zip(specs, values, strict=True)}
    if set(named) != {s.name for s in specs}:
        raise TensorSpecError(f"inputs are named {sorted(named)}, the model takes {signature}")
    for spec in specs:
        value = named[spec.name]
        if not isinstance(value, torch.Tensor):
            raise TensorSpecError(f"input {spec.name!r} is a {type(value).__name__}, not a tensor")
        try:
            spec.check(value)
        except TensorSpecError as err:
            raise TensorSpecError(f"{err}; the model takes {signature}") from None
    return named


class Pipeline:
    """A connection to a deployed plan: submit requests, await their outputs.

    Every node of the plan's cluster is watched through its health service. With
    ``failover``, a stage's node that dies, hangs or drains is replaced by re-planning over
    the nodes left; without it, the requests waiting fail with :class:`PipelineBrokenError`.
    """

    def __init__(
        self, plan: Plan, window: int, *, deadline_s: float | None, failover: bool,
        rebalance: bool, recovery: Replanning | None, emulate_links: bool | None,
        events_path: Path | None,
    ) -> None:
        self.plan = plan
        self.replans: list[Replan] = []
        self.events = EventLog(events_path)
        self.measured = AS_PLANNED
        """Nodes' slowdowns and links' bandwidths measured off the plan (see
        :mod:`coordinator.drift`)."""
        addresses = {**plan.addresses, **{r.node: r.address for _, r in replicas(plan)}}
        security = client_security(plan.security)
        self._handles: dict[str, WorkerHandle] = {
            name: GrpcWorkerHandle(address, name, security)
            for name, address in addresses.items()
        }
        self._ledger = Ledger(plan.outputs)
        self._window = asyncio.Semaphore(window)
        self._deadline_s = deadline_s or default_deadline(plan, window)
        self._failover = failover
        self._rebalance = rebalance
        self._recovery = recovery
        self._made_recovery: PlanRecovery | None = None
        """The recovery this pipeline made itself (none was given), which it closes."""
        self._emulate = loopback(plan) if emulate_links is None else emulate_links
        self._ready = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._senders: dict[str, FrameSender] = {}
        """The data path into each node of the first stage."""
        self._entry: tuple[str, ...] = ()
        self._dealer = Dealer([1.0])
        """Deals requests among the ``_entry`` nodes by their shares."""
        self._readers: dict[str, tuple[ResultStream, asyncio.Task[None]]] = {}
        self._watches: dict[str, NodeWatch] = {}
        self._loaded: dict[str, tuple[int, int, str]] = {}
        self._wake = asyncio.Event()
        self._trouble: set[str] = set()
        self._returned: set[str] = set()
        self._drift = DriftWatch()
        self._drifted = Drift()
        self._attempts = 0
        self._broken: EdgesplitError | None = None
        self._recovering: Replan | None = None
        self._preparing: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls, plan: Plan, window: int = DEFAULT_WINDOW, *, deadline_s: float | None = None,
        failover: bool = True, rebalance: bool = True, recovery: Replanning | None = None,
        emulate_links: bool | None = None, events_path: Path | None = None,
    ) -> Pipeline:
        """Subscribe to the last stage's results, open the data path into the first, and
        start watching the nodes.

        ``deadline_s`` bounds each request (default from the plan's predicted latency);
        ``rebalance`` moves back to a better plan when a lost node returns; ``recovery``
        re-plans (default: the plan's own cluster spec and profiles); ``emulate_links``
        says whether rewired hops emulate the plan's links (default: on a cluster of this
        machine); ``events_path`` also appends failover events to that file.
        """
        pipeline = cls(plan, window, deadline_s=deadline_s, failover=failover,
                       rebalance=rebalance, recovery=recovery, emulate_links=emulate_links,
                       events_path=events_path)
        try:
            await pipeline._open()
        except BaseException:
            await pipeline.close()
            raise
        return pipeline

    async def _open(self) -> None:
        placed = replicas(self.plan)
        infos = await asyncio.gather(*(self._handles[r.node].describe() for _, r in placed))
        for (k, replica), info in zip(placed, infos, strict=True):
            stage = self.plan.stages[k]
            if info.stage is not None:
                self._loaded[replica.node] = (stage.start, stage.end, info.stage.sha256)
        await self._switch_data_path(self.plan, force=())
        self._tasks.append(asyncio.create_task(self._deadlines()))
        self._tasks.append(asyncio.create_task(self._supervise()))
        if self._failover:
            self._tasks.append(asyncio.create_task(self._watch_drift()))
        for handle in self._handles.values():
            watch = NodeWatch(handle, self._on_state)
            self._watches[handle.name] = watch
            watch.start()
        if self._failover and (self.plan.replan is not None or self._recovery is not None):
            self._preparing = asyncio.create_task(self._prepare_recovery())
            self._tasks.append(self._preparing)

    async def prepared(self) -> None:
        """Wait until a failure would be recovered from at once (the model is loaded and the
        plan without each node is made and exported); failures before are recovered too,
        only more slowly."""
        while self._preparing is not None and not self._preparing.done():
            await asyncio.wait({self._preparing})

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def late_answers(self) -> int:
        """Answers dropped because their request was answered already (by another chain)."""
        return self._ledger.late

    async def infer(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        """Run one request; its outputs in the model's output order.

        Waits while ``window`` requests are already in flight.
        """
        tensors = bind_inputs(self.plan.inputs, inputs)
        async with self._window:
            if self._broken is not None:
                raise self._broken
            request = self._ledger.accept(tensors)
            try:
                await self._dispatch(request)
                return await request.answer
            finally:
                self._ledger.forget(request)

    async def map(self, many: Iterable[Inputs]) -> list[tuple[torch.Tensor, ...]]:
        """Run many requests concurrently (at most ``window`` in flight); outputs in order."""
        return list(await asyncio.gather(*(self.infer(inputs) for inputs in many)))

    # -- the data path ---------------------------------------------------------------------

    async def _dispatch(self, request: Request, *, again: bool = False) -> None:
        """Send ``request`` under the current plan version, unless it was already (or, with
        ``again``, send it once more); while the chain is switching, the switch replays it."""
        async with self._send_lock:
            if (request.answer.done() or not self._ready.is_set() or not self._senders
                    or (request.sent_version == self._ledger.version and not again)):
                return
            node = self._entry[self._dealer.deal()]
            wire_id = self._ledger.wire_id(request, self._deadline_s)
            try:
                await self._senders[node].send(wire_id, request.tensors)
            except EdgesplitError as err:
                self._data_path_trouble(node, f"sending failed: {err}")

    async def _subscribe(self, node: str) -> None:
        stream = await self._handles[node].open_results(self.plan.outputs)
        task = asyncio.create_task(self._read_results(node, stream))
        self._readers[node] = (stream, task)

    async def _read_results(self, node: str, results: ResultStream) -> None:
        reason = "its results stream closed"
        try:
            async for result in results:
                self._on_result(result)
        except EdgesplitError as err:
            reason = f"its results stream broke: {err}"
        if self._readers.get(node, (None,))[0] is results:
            del self._readers[node]
            if node in self.plan.stages[-1].nodes:
                self._data_path_trouble(node, reason)

    def _on_result(self, result: Result) -> None:
        if self._ledger.deliver(result) is None:
            return
        replan = self._recovering
        if replan is not None and self._ready.is_set():
            self._recovering = None
            replan.recovery_s = time.monotonic() - replan.failed_at
            self.events.record(f"recovered: first answer {replan.recovery_s:.2f} s after the "
                               f"failure ({replan.cause})")

    def _data_path_trouble(self, node: str | None, reason: str) -> None:
        if node is None or self._broken is not None:
            return
        log.info("data path trouble at %s: %s", node, reason)
        self._trouble.add(node)
        if node in self._watches:
            self._watches[node].suspect()
        self._wake.set()

    async def _deadlines(self) -> None:
        """Resend a request whose deadline passed once, then fail it; paused while the
        chain switches (a replay restarts the deadline)."""
        while True:
            await asyncio.sleep(0.2)
            if not self._ready.is_set():
                continue
            now = time.monotonic()
            for request in self._ledger.unanswered():
                if request.deadline_at > now:
                    continue
                if request.timeouts < TIMEOUT_RETRIES:
                    request.timeouts += 1
                    log.info("request %d: no answer in %.1f s, sending it again",
                             request.number, self._deadline_s)
                    await self._dispatch(request, again=True)
                elif not request.answer.done():
                    request.answer.set_exception(RequestTimeoutError(
                        f"request got no answer within {self._deadline_s:.1f} s, sent "
                        f"{request.timeouts + 1} times, though every node answers its health "
                        f"checks; look for errors in the nodes' logs "
                        f"({', '.join(r.node for _, r in replicas(self.plan))})"
                    ))

    # -- watching and switching ------------------------------------------------------------

    def _on_state(self, watch: NodeWatch, state: NodeState) -> None:
        name = watch.name
        in_plan = name in _nodes(self.plan)
        if state is NodeState.DEAD:
            detected = time.monotonic() - watch.last_ok
            self.events.record(f"node lost: {name} stopped answering (declared dead "
                               f"{detected:.2f} s after its last answer)", warning=in_plan)
        elif state is NodeState.DRAINING:
            self.events.record(f"node leaving: {name} drains (planned departure)",
                               warning=in_plan)
        elif state.usable and watch.was_lost:
            self.events.record(f"node back: {name} answers again ({state.value})")
            self._returned.add(name)
        elif state is NodeState.NO_STAGE and in_plan:
            self.events.record(f"node lost its stage: {name} answers without one "
                               "(restarted?)", warning=True)
        self._wake.set()

    async def _watch_drift(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if self._ready.is_set():
                drifted = await self._drift.poll(self.plan, self._handles)
                if drifted:
                    self._drifted.update(drifted)
                    self._wake.set()

    async def _supervise(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._broken is not None:
                return
            try:
                await self._check()
                if self._failover and self._broken is None and self._preparing is not None \
                        and self._preparing.done():
                    self._preparing = asyncio.create_task(self._prepare_recovery())
                    self._tasks.append(self._preparing)
            except Exception:  # a bug: keep the requests from hanging, say why
                log.exception("failover supervisor failed")
                self._break(PipelineBrokenError(
                    "the failover supervisor failed (see the log with --debug); "
                    "deploy again and retry"))
                return

    async def _check(self) -> None:
        plan = self.plan
        lost = [n for n in _nodes(plan)
                if self._watches[n].state in (NodeState.DEAD, NodeState.DRAINING)]
        stageless = [n for n in _nodes(plan)
                     if self._watches[n].state is NodeState.NO_STAGE
                     and not await self._holds_stage(n)]
        if lost or stageless:
            node = (lost or stageless)[0]
            state = self._watches[node].state
            cause = {NodeState.DEAD: f"node {node} lost",
                     NodeState.DRAINING: f"node {node} left (drained)"}.get(
                         state, f"node {node} lost its stage")
            if not self._failover:
                self._break(PipelineBrokenError(
                    f"{cause} and failover is off; {len(self._ledger.unanswered())} waiting "
                    "request(s) got no answer; check it with `coordinator status`, then "
                    "deploy again"))
                return
            smaller = without_replicas(plan, {*lost, *stageless})
            if smaller is not None:
                await self._leave_out(cause, self._watches[node], smaller)
            else:
                await self._switch(cause, self._watches[node], exclude=set(lost))
        elif self._trouble:
            await self._reopen()
        elif self._returned and self._rebalance and self._failover:
            names = sorted(self._returned)
            self._returned.clear()
            await self._switch(f"node {', '.join(names)} back", None, exclude=set(),
                               only_if_better=True)
        elif self._drifted:
            drifted, self._drifted = self._drifted, Drift()
            self.measured = self.measured.updated(drifted.nodes, drifted.bandwidth)
            for node, ratio in drifted.nodes.items():
                self.events.record(f"drift: stage on {node} runs {ratio:.2f}x its time when "
                                   "deployed, for a sustained while")
            for (src, dst), ratio in drifted.links.items():
                self.events.record(
                    f"drift: link {src}->{dst} takes {ratio:.2f}x its time per frame when "
                    "deployed, for a sustained while (re-planning with "
                    f"{format_bytes(drifted.bandwidth[src, dst])}/s)")
            self._drift.forget(set(drifted.nodes) | {src for src, _ in drifted.links})
            named = [f"{n} ({r:.2f}x)" for n, r in sorted(drifted.nodes.items())] + [
                f"{s}->{d} ({r:.2f}x)" for (s, d), r in sorted(drifted.links.items())]
            await self._switch("drift on " + ", ".join(named), None, exclude=set(),
                               only_if_better=True)

    async def _holds_stage(self, node: str) -> bool:
        """True if ``node`` runs the stage it was given last (its health lags behind)."""
        try:
            info = await self._handles[node].describe()
        except EdgesplitError:
            return False
        loaded = self._loaded.get(node)
        return loaded is not None and info.stage is not None and info.stage.sha256 == loaded[2]

    async def _reopen(self) -> None:
        """The data path broke but every node answers: reconnect with backoff, replay."""
        troubled, self._trouble = self._trouble, set()
        delay = 0.1
        for _ in range(SWITCH_ATTEMPTS):
            self._ready.clear()
            self._ledger.new_version()
            try:
                await self._switch_data_path(self.plan, force=troubled)
            except EdgesplitError as err:
                log.info("reopening the data path failed (%s); retrying in %.1f s", err, delay)
                await asyncio.sleep(delay)
                delay *= 2
                if any(not self._watches[n].state.usable for n in _nodes(self.plan)):
                    self._wake.set()  # a node died meanwhile: switch plans instead
                    return
                continue
            replayed = await self._replay()
            self.events.record(f"data path reopened at {', '.join(sorted(troubled))}; "
                               f"{replayed} request(s) replayed")
            return
        self._wake.set()

    async def _switch(
        self, cause: str, failed: NodeWatch | None, *, exclude: set[str],
        only_if_better: bool = False,
    ) -> None:
        """Re-plan over the usable nodes, load the stages that change, rewire, replay."""
        started = time.monotonic()
        usable = {n for n, w in self._watches.items() if w.state.usable and n not in exclude}
        recovery = self._get_recovery()
        if self._preparing is not None:  # this switch's exports go first
            self._preparing.cancel()
        if not only_if_better:
            self._ready.clear()
        try:
            new = await recovery.replan(usable, self.measured)
            gain = await self._gain(recovery, new)
        except EdgesplitError as err:
            if only_if_better:
                log.info("not rebalancing: %s", err)
                return
            self._break(PipelineBrokenError(f"{cause}, and no plan fits the nodes left: {err}"))
            return
        if only_if_better and not self._worth_moving(new, gain):
            self.events.record(f"kept the plan ({cause}): the best plan now is predicted "
                               f"{gain:+.0%} faster, not worth moving stages")
            return
        old = self.plan
        try:  # export what the switch ships while the old chain still runs (if it does)
            for stage, _ in self._to_load(new):
                await recovery.artifact(stage)
        except EdgesplitError as err:
            if only_if_better:
                log.warning("not switching plans (%s): %s", cause, err)
                return
            self._break(PipelineBrokenError(f"{cause}, and exporting the new stages failed: "
                                            f"{err}"))
            return
        replan = Replan(at_s=self.events.elapsed(), cause=cause,
                        old_stages=stage_names(old.stages), new_stages=stage_names(new.stages),
                        predicted_gain=gain if math.isfinite(gain) else None,
                        failed_at=failed.last_ok if failed else started)
        predicted = (f"{gain:+.0%} against the old plan" if math.isfinite(gain) else
                     "the old plan had lost a node")
        await self._move(
            replan, new, failed, recovering=not only_if_better,
            headline=f"re-planned ({cause}): {' '.join(replan.old_stages)} -> "
                     f"{' '.join(replan.new_stages)}, predicted "
                     f"{new.throughput_per_s:.1f} req/s ({predicted})")

    async def _leave_out(self, cause: str, failed: NodeWatch, new: Plan) -> None:
        """A node that replicates a stage is lost: run ``new``, the plan without it (its
        share dealt to the stage's other nodes), without re-planning: rewire its neighbours,
        replay. Then, if the plan can be priced (it carries the planner's inputs), predict
        what the nodes left do."""
        old = self.plan
        replan = Replan(at_s=self.events.elapsed(), cause=cause,
                        old_stages=stage_names(old.stages), new_stages=stage_names(new.stages),
                        failed_at=failed.last_ok)
        await self._move(
            replan, new, failed, recovering=True,
            headline=f"left out a replica ({cause}): {' '.join(replan.old_stages)} -> "
                     f"{' '.join(replan.new_stages)}, no re-plan")
        if self.plan is not new or (new.replan is None and self._recovery is None):
            return
        try:
            self.plan = await self._get_recovery().repriced(new, self.measured)
        except Exception:  # predictions are advisory: the plan left already runs, keep it
            log.warning("the plan without the replica keeps the old predictions",
                        exc_info=True)
            return
        self.events.record(f"predicted without the replica: {self.plan.throughput_per_s:.1f} "
                           f"req/s (was {old.throughput_per_s:.1f})")

    async def _move(
        self, replan: Replan, new: Plan, failed: NodeWatch | None, *, recovering: bool,
        headline: str,
    ) -> None:
        """Load ``new``'s stages (on nodes the old plan leaves idle while it still runs),
        rewire, move the data path onto it and replay; retried by the supervisor (up to
        :data:`SWITCH_ATTEMPTS`) if that fails."""
        old, cause = self.plan, replan.cause
        if failed is not None:
            replan.detection_s = failed.changed_at - failed.last_ok
        try:
            # nodes the old plan leaves idle are loaded while it still runs
            early = [(s, n) for s, n in self._to_load(new) if n not in _nodes(old)]
            replan.moved_bytes = await self._load(early)
            self._ready.clear()
            self._ledger.new_version()  # a failure while switching is the old chain's
            paused = time.monotonic()
            replan.moved_bytes += await self._apply(old, new, {n for _, n in early})
        except EdgesplitError as err:
            self._attempts += 1
            if self._attempts >= SWITCH_ATTEMPTS:
                self._break(PipelineBrokenError(f"{cause}, and switching plans failed "
                                                f"{self._attempts} times: {err}"))
                return
            log.warning("switching plans failed (%s); trying again", err)
            await asyncio.sleep(0.2 * 2 ** self._attempts)
            self._wake.set()
            return
        self._attempts = 0
        self.plan = new
        self._trouble.clear()
        replan.pause_s = time.monotonic() - paused
        if recovering:  # else a recovery still waiting for its first answer goes on
            self._recovering = replan
        self.replans.append(replan)
        self.events.record(headline)
        self.events.record(f"stages moved: {replan.moved_bytes} bytes; stream paused "
                           f"{replan.pause_s:.2f} s")
        replan.replayed = await self._replay()
        self.events.record(f"requests replayed: {replan.replayed}")
        if recovering and not self._ledger.unanswered() and self._recovering is replan:
            self._recovering = None
            replan.recovery_s = time.monotonic() - replan.failed_at
            self.events.record(f"recovered in {replan.recovery_s:.2f} s ({cause})")

    def _worth_moving(self, new: Plan, gain: float) -> bool:
        """A better plan pays for its switch: faster by :data:`REBALANCE_GAIN` at least, and
        saving more over :data:`PAYBACK_S` than the pause (the last switch's, or 1 s)."""
        if not self._to_load(new) and new.stages == self.plan.stages:
            return False
        pause = self.replans[-1].pause_s if self.replans else 1.0
        return gain >= REBALANCE_GAIN and gain / (1 + gain) * PAYBACK_S > pause

    async def _gain(self, recovery: Replanning, new: Plan) -> float:
        """How much faster ``new`` is predicted to run than the current plan would now
        (with the measured figures; a plan on a lost node counts as stopped)."""
        old = await recovery.price(self.plan, self.measured)
        fresh = await recovery.price(new, self.measured)
        if any(not self._watches[n].state.usable for n in _nodes(self.plan)):
            return float("inf")
        return old.bottleneck_s / fresh.bottleneck_s - 1

    async def _apply(self, old: Plan, new: Plan, fresh: set[str]) -> int:
        """Load the stages ``new`` changes (but on the ``fresh`` nodes, just loaded), wire
        its nodes downstream first (those whose wiring changes) and move the data path onto
        it; the bytes shipped."""
        placed = replicas(new)
        infos = await asyncio.gather(*(self._handles[r.node].describe() for _, r in placed))
        to_load = self._to_load(new)
        stale = [(new.stages[k], r.node) for (k, r), info in zip(placed, infos, strict=True)
                 if r.node not in fresh and (new.stages[k], r.node) not in to_load
                 and (info.stage is None  # a restarted node
                      or info.stage.sha256 != self._loaded[r.node][2])]
        loading = [(s, n) for s, n in to_load if n not in fresh] + stale
        moved = await self._load(loading)
        changed = fresh | {n for _, n in loading}
        before = {r.node: replica_wiring(old, k, r.node, self._emulate)
                  for k, r in replicas(old)}
        for k, replica in reversed(placed):
            wiring = replica_wiring(new, k, replica.node, self._emulate)
            if replica.node in changed or before.get(replica.node) != wiring:
                await self._handles[replica.node].wire(wiring)
                changed.add(replica.node)
        await self._switch_data_path(new, force=changed)
        return moved

    async def _load(self, placements: list[tuple[PlannedStage, str]]) -> int:
        """Ship each (stage, node) of ``placements`` at once (a stage exported once for all
        its nodes); the bytes shipped."""
        recovery = self._get_recovery()
        artifacts = [await recovery.artifact(s) for s, _ in placements]
        await asyncio.gather(*(self._handles[n].load_stage(a.spec, a.data)
                               for (_, n), a in zip(placements, artifacts, strict=True)))
        for (s, n), a in zip(placements, artifacts, strict=True):
            self._loaded[n] = (s.start, s.end, a.spec.artifact_sha256)
        return sum(len(a.data) for a in artifacts)

    def _to_load(self, plan: Plan) -> list[tuple[PlannedStage, str]]:
        """(stage, node) for each node of ``plan`` that does not hold its stage's layer
        range already."""
        return [(s, n) for s in plan.stages for n in s.nodes
                if self._loaded.get(n, (None, None))[:2] != (s.start, s.end)]

    async def _switch_data_path(self, plan: Plan, *, force: Collection[str]) -> None:
        """Results from every node of ``plan``'s last stage, requests dealt among its first
        stage's nodes (streams to nodes in ``force`` reopened); the old results streams of
        nodes still alive are closed."""
        last, first = plan.stages[-1], plan.stages[0]
        for node in last.nodes:
            if node in force and node in self._readers:
                await self._close_reader(node)
            if node not in self._readers:
                await self._subscribe(node)
        for node in [n for n in self._readers if n not in last.nodes]:
            if self._watches[node].state.usable:
                await self._close_reader(node)
        encoding = hop_encoding(plan, 0, plan.source)
        for node, sender in list(self._senders.items()):
            if node not in first.nodes or node in force or sender.encoding is not encoding:
                sender.abort()
                del self._senders[node]
        for node in first.nodes:
            if node not in self._senders:
                self._senders[node] = await self._handles[node].open_sender(encoding)
        self._entry = first.nodes
        self._dealer = Dealer([r.share for r in first.replicas])
        self._ready.set()

    async def _close_reader(self, node: str) -> None:
        """Close ``node``'s results stream; its reader ends once gRPC has ended the read
        it was waiting on (cancelled mid-read, gRPC would complete that read later, maybe
        after the event loop closed)."""
        stream, task = self._readers.pop(node)
        await stream.close()
        await asyncio.wait({task})

    async def _replay(self) -> int:
        """Send every unanswered request again under the new version."""
        waiting = self._ledger.unanswered()
        for request in waiting:
            await self._dispatch(request)
        return len(waiting)

    def _break(self, error: EdgesplitError) -> None:
        self._broken = error
        self.events.record(f"failed: {error}", warning=True)
        self._ledger.fail_all(error)

    def _get_recovery(self) -> Replanning:
        if self._recovery is None:
            from coordinator.recovery import PlanRecovery  # the planner only when needed

            self._recovery = self._made_recovery = PlanRecovery(self.plan)
        return self._recovery

    async def _prepare_recovery(self) -> None:
        """Load the plan's model and make the plans for losing each node, in the
        background, so that a failure re-plans at once."""
        try:
            recovery = self._get_recovery()
            await recovery.prepare()
            usable = {n for n, w in self._watches.items() if w.state is not NodeState.DEAD}
            await recovery.prewarm(self.plan, usable, self.measured)
        except EdgesplitError as err:
            log.warning("failover will not re-plan: %s", err)

    async def close(self) -> None:
        """Finish sending, stop listening and watching, and release the connections."""
        self._ready.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop() for w in self._watches.values()))
        senders, self._senders = self._senders, {}
        for sender in senders.values():
            try:
                async with asyncio.timeout(2.0):
                    await sender.close()
            except (EdgesplitError, TimeoutError):
                sender.abort()
        for node in list(self._readers):
            await self._close_reader(node)
        self._ledger.fail_all(PipelineBrokenError("the pipeline was closed"))
        await asyncio.gather(*(h.close() for h in self._handles.values()))
        if self._made_recovery is not None:
            self._made_recovery.close()
        if self._ledger.strays:
            log.warning("dropped %d answer(s) to requests never sent from here",
                        self._ledger.strays)


def _nodes(plan: Plan) -> list[str]:
    """Every node running a stage of ``plan``."""
    return [replica.node for _, replica in replicas(plan)]

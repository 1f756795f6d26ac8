"""The Python API: send requests through a deployed plan and get their outputs back.

    async with await Pipeline.connect(plan) as pipeline:
        outputs = await pipeline.infer(input_ids)            # one request
        many = await pipeline.map(batches)                   # concurrently, in order

Every request carries a random 64-bit id end to end, so nobody can guess the id of another
client's request; a request is answered exactly once, by its outputs or by a
:class:`RequestFailedError`, and only by a frame on the results stream of the last stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import torch

from node.client import FrameSender, GrpcWorkerHandle, Result, ResultStream
from node.errors import NodeUnreachableError
from node.security import client_security
from partition.errors import EdgesplitError, TensorSpecError
from partition.plan import Plan
from partition.spec import TensorSpec

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 8
"""Requests in flight at once: enough to keep every stage of a short pipeline busy."""

HEALTH_INTERVAL_S = 2.0
"""How often the nodes are checked while requests are in flight."""

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


class RequestFailedError(EdgesplitError):
    """A node answered a request with a failure instead of outputs."""


class PipelineBrokenError(EdgesplitError):
    """The data path closed while requests were in flight."""


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

    While requests are in flight a watchdog asks every stage's node whether it is alive; if
    one stops answering, every unanswered request fails with :class:`PipelineBrokenError`
    instead of waiting forever.
    """

    def __init__(self, plan: Plan, window: int, health_interval_s: float) -> None:
        self.plan = plan
        security = client_security(plan.security)
        self._nodes = [GrpcWorkerHandle(s.address, s.node, security) for s in plan.stages]
        self._window = asyncio.Semaphore(window)
        self._health_interval_s = health_interval_s
        self._stray_answers = 0
        self._pending: dict[int, asyncio.Future[tuple[torch.Tensor, ...]]] = {}
        self._send_lock = asyncio.Lock()
        self._sender: FrameSender | None = None
        self._results: ResultStream | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def connect(
        cls, plan: Plan, window: int = DEFAULT_WINDOW,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> Pipeline:
        """Subscribe to the last stage's results and open the data path into the first."""
        pipeline = cls(plan, window, health_interval_s)
        try:
            results = await pipeline._nodes[-1].open_results(plan.outputs)
            pipeline._results = results
            pipeline._tasks = [
                asyncio.create_task(pipeline._read_results(results)),
                asyncio.create_task(pipeline._watch_nodes()),
            ]
            pipeline._sender = await pipeline._nodes[0].open_sender()
        except BaseException:
            await pipeline.close()
            raise
        return pipeline

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def infer(self, inputs: Inputs) -> tuple[torch.Tensor, ...]:
        """Run one request; its outputs in the model's output order.

        Waits while ``window`` requests are already in flight.
        """
        tensors = bind_inputs(self.plan.inputs, inputs)
        async with self._window:
            request_id = self._new_id()
            answer = asyncio.get_running_loop().create_future()
            self._pending[request_id] = answer
            try:
                async with self._send_lock:
                    if self._sender is None:
                        raise PipelineBrokenError("the pipeline is closed")
                    await self._sender.send(request_id, tensors)
                return await answer
            finally:
                self._pending.pop(request_id, None)

    def _new_id(self) -> int:
        """A random 64-bit request id no request in flight has."""
        request_id = secrets.randbits(64)
        while request_id in self._pending:  # one chance in 2**64 per request in flight
            request_id = secrets.randbits(64)
        return request_id

    async def map(self, many: Iterable[Inputs]) -> list[tuple[torch.Tensor, ...]]:
        """Run many requests concurrently (at most ``window`` in flight); outputs in order."""
        return list(await asyncio.gather(*(self.infer(inputs) for inputs in many)))

    async def _read_results(self, results: ResultStream) -> None:
        error: EdgesplitError = PipelineBrokenError(
            f"the last stage on {self._nodes[-1].address} closed its results stream"
        )
        try:
            async for result in results:
                self._deliver(result)
        except NodeUnreachableError as err:
            error = PipelineBrokenError(f"lost the results stream: {err}")
        except EdgesplitError as err:
            error = err
        self._fail_pending(error)

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            if not self._pending:
                continue
            try:
                await asyncio.gather(*(node.describe() for node in self._nodes))
            except NodeUnreachableError as err:
                self._fail_pending(PipelineBrokenError(
                    f"{err} ({len(self._pending)} request(s) in flight got no answer); "
                    "check it with `coordinator status`, then deploy again"
                ))
                return

    def _fail_pending(self, error: EdgesplitError) -> None:
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(error)

    def _deliver(self, result: Result) -> None:
        answer = self._pending.get(result.request_id)
        if answer is None:  # no request of ours in flight has that id: drop it
            self._stray_answers += 1
            if self._stray_answers == 1:
                log.warning(
                    "dropped an answer for request %d, which is not in flight here "
                    "(counting further ones)", result.request_id,
                )
            return
        if answer.done():
            return  # already answered (a replay answered twice)
        if result.outputs is not None:
            answer.set_result(tuple(result.outputs[spec.name] for spec in self.plan.outputs))
        else:
            failure = result.failure
            answer.set_exception(RequestFailedError(
                f"stage {failure.stage_index} on {failure.node} failed the request: "
                f"{failure.message}"
            ))

    async def close(self) -> None:
        """Finish sending, stop listening, and release the connections."""
        if self._sender is not None:
            sender, self._sender = self._sender, None
            with contextlib.suppress(EdgesplitError):
                await sender.close()
        if self._results is not None:
            await self._results.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(node.close() for node in self._nodes))
        if self._stray_answers:
            log.warning("dropped %d answer(s) to requests not in flight", self._stray_answers)

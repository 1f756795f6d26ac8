"""Integrity checks: recompute requests here, stage by stage, and name the stage that differs.

A verified request is sent *traced* (``encode_frame(..., trace=())``): every stage adds to the
frame's header a fingerprint of the frame it received and of the frame it sent
(:func:`node.pipeline.fingerprint`, a few float64 sums per tensor, so float rounding does not
count as a difference). The coordinator runs the same stage programs on the same input, one
after the other, and compares: the first stage whose *received* fingerprint differs got other
data than the stage before it reported sending (the hop between them, or a node lying in its
report); the first whose *sent* fingerprint differs computed something else from the same
input (a faulty or tampered node). Frames cross each link here as they do there: in the
link's encoding, decoded (:func:`partition.compression.roundtrip`). A trace is only as
honest as the nodes that carry it, so the final outputs are compared too: they can never
differ unnoticed. Requests are dealt among a replicated first stage's nodes and answered by
any node of the last; a trace does not say which node of a replicated stage ran it, so a
difference there names the stage's nodes.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from coordinator.bench import InputFactory
from coordinator.deploy import hop_encoding
from coordinator.pipeline import bind_inputs
from node.client import FrameSender, GrpcWorkerHandle, Result, ResultStream
from node.codec import StageReport, Trace
from node.dealer import Dealer
from node.pipeline import FINGERPRINT_VALUES, fingerprint
from partition.artifact import ProgramRunner, load_program, run_stage
from partition.compression import LinkEncoding, roundtrip
from partition.errors import EdgesplitError
from partition.plan import Plan, PlannedStage
from partition.spec import StageSpec
from partition.split import StageArtifact

RTOL = 1e-3
"""Largest difference of a fingerprint's sums, relative to the tensor's absolute sum."""

ANSWER_TIMEOUT_S = 60.0
"""How long a verified request may take before the check gives up."""


@dataclass(frozen=True)
class Difference:
    """Request ``request`` differed first at ``stage`` (on ``node``): ``what`` says how."""

    request: int
    stage: int
    node: str
    what: str


async def verify(
    plan: Plan, artifacts: Sequence[StageArtifact], make_inputs: InputFactory,
    requests: Sequence[int],
) -> list[Difference]:
    """Send ``make_inputs(i)`` for each ``i`` in ``requests`` traced through the deployed
    plan, one at a time, and return the first difference of each request that has one.

    Raises
    ------
    NodeUnreachableError, NodeRejectedError
        If the first or last node cannot be reached.
    EdgesplitError
        If a verified request gets no answer within :data:`ANSWER_TIMEOUT_S`.
    """
    programs = [(load_program(a.data), a.spec) for a in artifacts]
    first = [GrpcWorkerHandle(r.address, r.node) for r in plan.stages[0].replicas]
    last = [GrpcWorkerHandle(r.address, r.node) for r in plan.stages[-1].replicas]
    dealer = Dealer([r.share for r in plan.stages[0].replicas])
    streams: list[ResultStream] = []
    senders: list[FrameSender] = []
    encodings = [plan.hop_links(k)[0].encoding for k in range(len(plan.stages) + 1)]
    found = []
    try:
        for handle in last:
            streams.append(await handle.open_results(plan.outputs))
        answers = aiter(_merged(streams))
        encoding = hop_encoding(plan, 0, plan.source)
        for handle in first:
            senders.append(await handle.open_sender(encoding))
        for index in requests:
            inputs = bind_inputs(plan.inputs, make_inputs(index))
            request_id = secrets.randbits(64)
            await senders[dealer.deal()].send(request_id, inputs, trace=())
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                while (result := await anext(answers)).request_id != request_id:
                    pass
            local, outputs = _local_trace(programs, inputs, encodings)
            if result.outputs is None:
                failure = result.failure
                difference = Difference(index, failure.stage_index, failure.node,
                                        f"failed the request: {failure.message}")
            else:
                final = fingerprint({s.name: outputs[s.name] for s in plan.outputs})
                difference = first_difference(plan, index, local, result.trace or (),
                                              final, fingerprint(result.outputs))
            if difference is not None:
                found.append(difference)
    except (TimeoutError, StopAsyncIteration):
        names = ", ".join(f"{h.name!r} at {h.address}" for h in last)
        raise EdgesplitError(
            f"a verified request got no answer from the last stage ({names}); check the "
            "nodes with `coordinator status`"
        ) from None
    finally:
        for sender in senders:
            await sender.close()
        for stream in streams:
            await stream.close()
        for handle in (*first, *last):
            await handle.close()
    return found


async def _merged(streams: Sequence[ResultStream]) -> AsyncIterator[Result]:
    """The results of every stream as they arrive, until all have ended (an error ending
    one is raised)."""
    queue: asyncio.Queue[Result | EdgesplitError | None] = asyncio.Queue()

    async def forward(stream: ResultStream) -> None:
        try:
            async for result in stream:
                await queue.put(result)
            await queue.put(None)
        except EdgesplitError as err:
            await queue.put(err)

    tasks = [asyncio.create_task(forward(stream)) for stream in streams]
    try:
        ended = 0
        while ended < len(streams):
            item = await queue.get()
            if isinstance(item, EdgesplitError):
                raise item
            if item is None:
                ended += 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def _local_trace(
    programs: Sequence[tuple[ProgramRunner, StageSpec]], inputs: dict[str, torch.Tensor],
    encodings: Sequence[LinkEncoding],
) -> tuple[list[StageReport], dict[str, torch.Tensor]]:
    """Each stage's report of running here on ``inputs``, and the last stage's frame as
    the client gets it; ``encodings`` are the plan's links'."""
    frame, reports = _across(inputs, encodings[0]), []
    for (program, spec), encoding in zip(programs, encodings[1:], strict=True):
        sends = run_stage(program, spec, frame)
        reports.append(StageReport(spec.index, fingerprint(frame), fingerprint(sends)))
        frame = _across(sends, encoding)
    return reports, frame


def _across(frame: dict[str, torch.Tensor], encoding: LinkEncoding) -> dict[str, torch.Tensor]:
    """``frame`` as the far end of a link of ``encoding`` gets it."""
    return {name: roundtrip(tensor, encoding) for name, tensor in frame.items()}


def first_difference(
    plan: Plan, request: int, local: Sequence[StageReport], remote: Trace,
    final: tuple[float, ...], answered: tuple[float, ...],
) -> Difference | None:
    """Where ``remote`` (the nodes' trace) first departs from ``local`` (this machine's),
    or, if nowhere, whether the answered outputs depart from the computed ones."""
    for k, (stage, mine) in enumerate(zip(plan.stages, local, strict=True)):
        theirs = remote[k] if k < len(remote) and remote[k].index == k else None
        if theirs is None:
            return Difference(request, k, _named(stage), "sent no report for a traced request")
        if not same(theirs.received, mine.received):
            source = (f"stage {k - 1} on {_named(plan.stages[k - 1])!r}" if k
                      else "the coordinator")
            return Difference(request, k, _named(stage),
                              f"received other tensors than {source} sent")
        if not same(theirs.sent, mine.sent):
            return Difference(request, k, _named(stage), "computed other outputs from the "
                              "same inputs (a faulty or tampered stage)")
    if not same(answered, final):
        stage = plan.stages[-1]
        return Difference(request, stage.index, _named(stage),
                          "answered other outputs than it reported computing")
    return None


def _named(stage: PlannedStage) -> str:
    """The node of ``stage``, or ``a or b`` for one replicated on ``a`` and ``b``."""
    return " or ".join(stage.nodes)


def same(theirs: Sequence[float], mine: Sequence[float]) -> bool:
    """True if two fingerprints agree within :data:`RTOL` of each tensor's absolute sum."""
    if len(theirs) != len(mine):
        return False
    for at in range(0, len(mine), FINGERPRINT_VALUES):  # count, |sum|, sum, weighted sum
        tolerance = RTOL * (3 * abs(mine[at + 1]) + 1)
        end = at + FINGERPRINT_VALUES
        for a, b in zip(theirs[at:end], mine[at:end], strict=True):
            if not (a == b or abs(a - b) <= tolerance or (math.isnan(a) and math.isnan(b))):
                return False
    return True

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
differ unnoticed.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coordinator.bench import InputFactory
from coordinator.pipeline import bind_inputs
from node.client import GrpcWorkerHandle
from node.codec import StageReport, Trace
from node.pipeline import FINGERPRINT_VALUES, fingerprint
from partition.artifact import ProgramRunner, load_program, run_stage
from partition.compression import LinkEncoding, roundtrip
from partition.errors import EdgesplitError
from partition.plan import Plan
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
    first = GrpcWorkerHandle(plan.stages[0].address, plan.stages[0].node)
    last = GrpcWorkerHandle(plan.stages[-1].address, plan.stages[-1].node)
    results = await last.open_results(plan.outputs)
    sender = await first.open_sender(plan.links[0].encoding)
    answers = aiter(results)
    found = []
    try:
        for index in requests:
            inputs = bind_inputs(plan.inputs, make_inputs(index))
            request_id = secrets.randbits(64)
            await sender.send(request_id, inputs, trace=())
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                while (result := await anext(answers)).request_id != request_id:
                    pass
            encodings = [link.encoding for link in plan.links]
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
        raise EdgesplitError(
            f"a verified request got no answer from {last.name!r} at {last.address}; "
            "check the nodes with `coordinator status`"
        ) from None
    finally:
        await sender.close()
        await results.close()
        await first.close()
        await last.close()
    return found


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
            return Difference(request, k, stage.node, "sent no report for a traced request")
        if not same(theirs.received, mine.received):
            source = f"stage {k - 1} on {plan.stages[k - 1].node!r}" if k else "the coordinator"
            return Difference(request, k, stage.node,
                              f"received other tensors than {source} sent")
        if not same(theirs.sent, mine.sent):
            return Difference(request, k, stage.node, "computed other outputs from the same "
                              "inputs (a faulty or tampered stage)")
    if not same(answered, final):
        stage = plan.stages[-1]
        return Difference(request, stage.index, stage.node,
                          "answered other outputs than it reported computing")
    return None


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

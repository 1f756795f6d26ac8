"""Choosing link compression together with the split: measure, search, check, tighten.

1. Every candidate encoding is measured at every cut alone (:mod:`partition.compression_choice`):
   its bytes, encode and decode seconds, and the output error it causes by itself.
2. The exact search (:func:`partition.optimizer.optimize` over
   :mod:`partition.choice_tables`) picks the split, the nodes and each cut's encoding,
   admitting only plans whose summed errors (an additive bound, in whole budget units) fit
   ``max_error``.
3. The chosen plan runs on the calibration inputs with all its encodings at once. Errors need
   not add up (they can compound), so if the measured error exceeds ``max_error`` the
   chosen encoding with the largest error alone is withheld at its cut and the search runs
   again. A plan with nothing encoded has no error, so this ends, each time with a plan
   whose measured error is within the budget.

Weight formats (a :class:`~partition.compression_choice.WeightOffer` of
:class:`~partition.quantize.WeightFormat`) join the same search and the same loop: a stage's
format is measured per layer alone, and a stage format that is the worst contributor is
withheld for that stage's layer range. A stage left at option 0 keeps its node's own format
(``quantize`` in nodes.yaml); the check in step 3 runs it so, but the search counts it as no
error (it is the operator's choice, not the planner's).

With one fixed encoding (``fp16``, ``bf16``, ``int8``, ``int8-channel``) every link between
two nodes carries it: the search has nothing to trade, and a plan whose measured error
exceeds ``max_error`` is refused. Weight formats are offered only with ``auto`` or ``none``,
where the budget is searched.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from partition.choice_tables import budget_units_that_fit
from partition.compression import LinkEncoding, roundtrip
from partition.compression_choice import (
    Alter,
    ErrorMeter,
    Inputs,
    WeightOffer,
    link_choices,
    weight_choices,
)
from partition.costs import Compression, CostModel
from partition.errors import AccuracyBudgetError, PlanningError
from partition.layers import LayerGraph
from partition.optimizer import OptimizeResult, Schedule, optimize
from partition.plan import Accuracy, Objective
from partition.quantize import WeightFormat


class CompressMode(enum.Enum):
    """``coordinator plan --compress``: no encoding, one for every link, or the planner's
    choice per link (and, offered, per stage weight format)."""

    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT8_CHANNEL = "int8-channel"
    AUTO = "auto"

    @property
    def encodings(self) -> tuple[LinkEncoding, ...]:
        """The encodings offered besides raw."""
        if self is CompressMode.AUTO:
            return tuple(e for e in LinkEncoding if e is not LinkEncoding.RAW)
        return () if self is CompressMode.NONE else (LinkEncoding(self.value),)

    @property
    def fixed(self) -> bool:
        """One encoding on every link, nothing to search."""
        return self not in (CompressMode.NONE, CompressMode.AUTO)


@dataclass(frozen=True)
class CompressionRequest:
    """What to offer, the budget on the output error, and the calibration inputs."""

    mode: CompressMode
    inputs: tuple[Inputs, ...]
    max_error: float = math.inf
    budget_units: int = 16
    weights: WeightOffer | None = None
    calibration_file: str | None = None
    """Where ``inputs`` were read from (``None``: random inputs of the model's signature)."""


@dataclass(frozen=True)
class MeasuredOffer:
    """A request's candidate compressions measured alone on its calibration inputs: what
    does not depend on the cluster, so re-planning on another node set measures nothing."""

    request: CompressionRequest
    meter: ErrorMeter
    compression: Compression


def measure_offer(layer_graph: LayerGraph, request: CompressionRequest) -> MeasuredOffer:
    """Measure every encoding ``request`` offers at every cut, and every weight format at
    every layer, each alone (budget units are fitted to a cluster in :func:`choose`).

    Raises
    ------
    PlanningError
        Weight formats offered with a fixed encoding.
    """
    fixed = request.mode.fixed
    if fixed and request.weights is not None:
        raise PlanningError(f"weight formats are chosen only with --compress auto or none, not "
                            f"{request.mode.value}; pass --compress auto")
    meter = ErrorMeter(layer_graph, list(request.inputs))
    compression = Compression(
        link_choices(meter, layer_graph, request.mode.encodings, raw=not fixed),
        weight_choices(meter, request.weights) if request.weights else None,
        math.inf if fixed else request.max_error,
        request.budget_units,
    )
    return MeasuredOffer(request, meter, compression)


@dataclass(frozen=True)
class Chosen:
    """The plan found, the cost model it was priced on, each link's encoding, each stage's
    weight format and the plan's measured accuracy."""

    result: OptimizeResult
    cost: CostModel
    encodings: tuple[LinkEncoding, ...]
    formats: tuple[WeightFormat, ...]
    accuracy: Accuracy


def choose(
    cost: CostModel, layer_graph: LayerGraph, objective: Objective,
    request: CompressionRequest | MeasuredOffer, node_weights: Sequence[WeightFormat] = (),
) -> Chosen:
    """The best plan for ``objective`` with compression as ``request`` asks (measured
    here, or already by :func:`measure_offer`); ``node_weights`` is each node's own weight
    format (default: none on every node).

    Raises
    ------
    AccuracyBudgetError
        With a fixed encoding, the plan's measured error exceeds ``request.max_error``.
    PlanningError
        As :func:`measure_offer`, or as :func:`partition.optimizer.optimize`
        (``NoFeasiblePlanError`` among them).
    """
    offer = request if isinstance(request, MeasuredOffer) else measure_offer(layer_graph, request)
    request, meter = offer.request, offer.meter
    offered, fixed = request.mode.encodings, request.mode.fixed
    own = tuple(node_weights) or (WeightFormat.NONE,) * cost.num_nodes
    compression = replace(offer.compression, budget_units=budget_units_that_fit(
        cost.num_nodes, cost.num_layers, 1 + len(offered), request.budget_units))
    while True:
        priced = replace(cost, compression=compression)
        result = optimize(priced, objective)
        schedule = result.schedule
        encodings = tuple(LinkEncoding.RAW if e == 0 else offered[e - 1]
                          for e in schedule.encodings)
        formats = tuple(request.weights.formats[w - 1] if w else own[s.node]
                        for s, w in zip(schedule.spans, schedule.formats, strict=True))
        accuracy = meter.accuracy(_roundtrips(schedule, encodings),
                                  _layer_formats(schedule, formats), schedule.error_bound,
                                  request.max_error)
        if accuracy.max_rel_error <= request.max_error:
            return Chosen(result, priced, encodings, formats, accuracy)
        if fixed or not (any(schedule.encodings) or any(schedule.formats)):
            raise AccuracyBudgetError(_over_budget(request, accuracy))
        compression = _without_worst(compression, schedule)


def _boundaries(schedule: Schedule) -> list[int]:
    """The boundary each link of ``schedule`` carries."""
    return [0, *(s.end for s in schedule.spans)]


def _roundtrips(schedule: Schedule, encodings: tuple[LinkEncoding, ...]) -> dict[int, Alter]:
    """What the receiver of each encoded link sees, by boundary."""
    return {
        b: (lambda t, e=encoding: roundtrip(t, e))
        for b, encoding in zip(_boundaries(schedule), encodings, strict=True)
        if encoding is not LinkEncoding.RAW
    }


def _layer_formats(
    schedule: Schedule, formats: tuple[WeightFormat, ...]
) -> dict[int, WeightFormat]:
    """The weight format of every layer in a stage stored quantized, by layer."""
    return {
        k: fmt
        for s, fmt in zip(schedule.spans, formats, strict=True) if fmt is not WeightFormat.NONE
        for k in range(s.start, s.end)
    }


def _without_worst(compression: Compression, schedule: Schedule) -> Compression:
    """``compression`` without the schedule's choice of the largest error alone: that
    encoding at that cut, or that weight format for that stage's layer range."""
    links, weights = compression.links, compression.weights
    chosen = [(float(links.error[b, e - 1]), "link", b, b, e - 1)
              for b, e in zip(_boundaries(schedule), schedule.encodings, strict=True) if e]
    if weights is not None:
        chosen += [(float(weights.layer_error[w - 1, s.start:s.end].sum()), "stage", s.start,
                    s.end, w - 1) for s, w in zip(schedule.spans, schedule.formats, strict=True)
                   if w]
    _, kind, start, end, option = max(chosen)
    if kind == "link":
        nbytes = links.nbytes.copy()
        nbytes[start, option] = np.inf
        return replace(compression, links=replace(links, nbytes=nbytes))
    memory = weights.stage_memory_bytes.copy()
    memory[option, start, end] = np.inf
    return replace(compression, weights=replace(weights, stage_memory_bytes=memory))


def _over_budget(request: CompressionRequest, accuracy: Accuracy) -> str:
    agreements = [f"{name} {value:.1%}" for name, value in (
        ("top-1 agreement", accuracy.top1_agreement),
        ("next-token agreement", accuracy.next_token_agreement)) if value is not None]
    shown = "".join(f", {a}" for a in agreements)
    fix = ("use --compress auto" if request.mode.fixed else
           "set a finer `quantize` (or none) on the nodes in nodes.yaml")
    return (
        f"with --compress {request.mode.value} the plan's outputs differ from float32 by "
        f"{accuracy.max_rel_error:.3g} relative (max absolute {accuracy.max_abs_error:.3g}"
        f"{shown}) on {accuracy.inputs} calibration inputs, more than --max-error "
        f"{request.max_error:g}; raise --max-error or {fix}"
    )


"""The plan file: :class:`Plan` and its stable, versioned JSON form (``docs/plan-schema.md``).

It is the one thing passed from planning to running, so it imports no planning code: the
runtime reads plans without the optimizer. :func:`partition.planning.plan` makes them.
"""

from __future__ import annotations

import enum
import json
import math
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from partition.cluster import MediumSpec
from partition.compression import LinkEncoding
from partition.errors import PlanFormatError, TensorSpecError
from partition.quantize import WeightFormat
from partition.queueing import latency_under_load
from partition.security_spec import SecuritySpec
from partition.spec import TensorSpec, dtype_from_name

SCHEMA = "edgesplit.plan/2"
"""The schema plans are written in; :data:`READABLE` lists every one they are read in."""
READABLE = ("edgesplit.plan/1", SCHEMA)
"""Version 1 has one node per stage (``node`` and ``address``); version 2 a list of replicas
(``nodes``) and a link per replica pair."""
SHARE_TOLERANCE = 1e-6
"""How far a replicated stage's shares may sum from 1."""


class Priced(Protocol):
    """Anything with a predicted latency and bottleneck (a schedule, a plan)."""

    @property
    def latency_s(self) -> float: ...

    @property
    def bottleneck_s(self) -> float: ...


class Objective(enum.Enum):
    """What a plan is optimized for."""

    LATENCY = "latency"
    THROUGHPUT = "throughput"

    def key(self, priced: Priced) -> tuple[float, float]:
        """Sort key, smaller is better: the objective's measure, then the other one."""
        if self is Objective.LATENCY:
            return (priced.latency_s, priced.bottleneck_s)
        return (priced.bottleneck_s, priced.latency_s)


@dataclass(frozen=True)
class Link:
    """A hop of the pipeline: ``src`` sends boundary tensors to ``dst`` in ``encoding``."""

    src: str
    dst: str
    bytes_per_s: float
    latency_s: float
    encoding: LinkEncoding = LinkEncoding.RAW

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.src, "to": self.dst, "bytes_per_s": self.bytes_per_s,
                "latency_s": self.latency_s, "encoding": self.encoding.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Link:
        return cls(data["from"], data["to"], float(data["bytes_per_s"]), float(data["latency_s"]),
                   LinkEncoding(data["encoding"]))


@dataclass(frozen=True)
class PlannedMedium(MediumSpec):
    """A shared medium of the plan's cluster and how long one request keeps it busy (the
    airtime of every hop that uses it)."""

    busy_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes_per_s": self.bytes_per_s, "nodes": list(self.nodes),
                "busy_s": self.busy_s}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedMedium:
        return cls(data["name"], float(data["bytes_per_s"]), tuple(data["nodes"]),
                   float(data["busy_s"]))


@dataclass(frozen=True)
class Accuracy:
    """A compressed plan's outputs against float32 on ``inputs`` calibration inputs, all of
    its compressions applied together. ``max_rel_error`` is the largest absolute difference
    over the largest absolute reference output, the figure ``max_error`` bounds;
    ``error_bound`` is the sum of the errors the chosen compressions cause alone. The
    agreements are fractions of argmaxes that match: per row for a classifier's
    ``(batch, classes)`` output, per position for a language model's ``(batch, tokens,
    vocabulary)`` logits."""

    inputs: int
    max_abs_error: float
    max_rel_error: float
    error_bound: float
    max_error: float
    top1_agreement: float | None = None
    next_token_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        optional = {"top1_agreement": self.top1_agreement,
                    "next_token_agreement": self.next_token_agreement}
        return {"inputs": self.inputs, "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "error_bound": self.error_bound,
                "max_error": self.max_error,
                **{k: v for k, v in optional.items() if v is not None}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Accuracy:
        optional = {k: float(data[k]) for k in ("top1_agreement", "next_token_agreement")
                    if k in data}
        return cls(int(data["inputs"]), float(data["max_abs_error"]),
                   float(data["max_rel_error"]), float(data["error_bound"]),
                   float(data["max_error"]), **optional)


@dataclass(frozen=True)
class Replica:
    """One node running a stage, and the fraction of the requests dealt to it."""

    node: str
    address: str
    share: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "address": self.address, "share": self.share}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Replica:
        return cls(data["node"], data["address"], float(data["share"]))


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a plan: layers ``[start, end)`` on the nodes of ``replicas`` and its
    predicted costs.

    A replicated stage runs on every node of ``replicas`` at once, each taking its
    ``share`` of the requests; ``node`` and ``address`` name the first replica (for a stage
    on one node, its node).
    ``compute_s`` is the stage's busy time per request (with replicas, the busiest
    replica's share of its compute).
    ``weights`` is how the stage's artifact stores its weights; ``artifact_bytes`` the
    bytes of those weights in it (``None`` in plans made before it was recorded).
    """

    index: int
    replicas: tuple[Replica, ...]
    start: int
    end: int
    first_layer: str
    last_layer: str
    receives: tuple[TensorSpec, ...]
    sends: tuple[TensorSpec, ...]
    compute_s: float
    transfer_in_s: float
    memory_bytes: int
    memory_available_bytes: int
    weights: WeightFormat = WeightFormat.NONE
    artifact_bytes: int | None = None

    @property
    def node(self) -> str:
        """The first replica's node."""
        return self.replicas[0].node

    @property
    def address(self) -> str:
        """The first replica's address."""
        return self.replicas[0].address

    @property
    def nodes(self) -> tuple[str, ...]:
        """The names of the nodes that run the stage."""
        return tuple(r.node for r in self.replicas)

    @property
    def replicated(self) -> bool:
        return len(self.replicas) > 1

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes for t in self.receives)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.sends)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "nodes": [r.to_dict() for r in self.replicas],
            "start": self.start, "end": self.end,
            "first_layer": self.first_layer, "last_layer": self.last_layer,
            "receives": [t.to_dict() for t in self.receives],
            "sends": [t.to_dict() for t in self.sends],
            "compute_s": self.compute_s, "transfer_in_s": self.transfer_in_s,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "memory_bytes": self.memory_bytes,
            "memory_available_bytes": self.memory_available_bytes,
            "weights": self.weights.value,
            **({"artifact_bytes": self.artifact_bytes} if self.artifact_bytes is not None
               else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedStage:
        """Read a stage of either schema (version 1: ``node`` and ``address``)."""
        replicas = (tuple(Replica.from_dict(r) for r in data["nodes"]) if "nodes" in data
                    else (Replica(data["node"], data["address"]),))
        return cls(
            index=int(data["index"]), replicas=replicas,
            start=int(data["start"]), end=int(data["end"]),
            first_layer=data["first_layer"], last_layer=data["last_layer"],
            receives=tuple(TensorSpec.from_dict(t) for t in data["receives"]),
            sends=tuple(TensorSpec.from_dict(t) for t in data["sends"]),
            compute_s=float(data["compute_s"]), transfer_in_s=float(data["transfer_in_s"]),
            memory_bytes=int(data["memory_bytes"]),
            memory_available_bytes=int(data["memory_available_bytes"]),
            weights=WeightFormat(data.get("weights", WeightFormat.NONE.value)),
            artifact_bytes=int(data["artifact_bytes"]) if "artifact_bytes" in data else None,
        )


@dataclass(frozen=True)
class BaselineResult:
    """A baseline's stages and predicted totals (``fits`` false if it breaks a memory limit)."""

    name: str
    description: str
    stages: tuple[tuple[str, int, int], ...]
    links: tuple[Link, ...]
    latency_s: float
    throughput_per_s: float
    fits: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "stages": [{"node": n, "start": s, "end": e} for n, s, e in self.stages],
            "links": [link.to_dict() for link in self.links],
            "latency_s": self.latency_s, "throughput_per_s": self.throughput_per_s,
            "fits": self.fits, "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineResult:
        return cls(
            data["name"], data["description"],
            tuple((s["node"], int(s["start"]), int(s["end"])) for s in data["stages"]),
            tuple(Link.from_dict(x) for x in data["links"]),
            float(data["latency_s"]), float(data["throughput_per_s"]), bool(data["fits"]),
            data.get("note", ""),
        )


@dataclass(frozen=True)
class Plan:
    """Everything the runtime needs: the model, the stages on their nodes, the hops, the
    predictions, and where the coordinator's credentials are, if any.

    There is one hop more than stages: source -> first stage, between stages, last stage ->
    sink. ``links`` lists, hop after hop, a link from every sender of the hop to every
    receiver (one link per hop unless a stage is replicated): :meth:`hop_links`.
    """

    model_sha256: str
    model_path: str
    granularity: str
    layer_names: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    objective: Objective
    source: str
    sink: str
    addresses: dict[str, str]
    stages: tuple[PlannedStage, ...]
    links: tuple[Link, ...]
    latency_s: float
    bottleneck_s: float
    exact: bool
    lower_bound_s: float
    baselines: tuple[BaselineResult, ...] = field(default=())
    security: SecuritySpec | None = None
    replan: dict[str, Any] | None = None
    """What re-planning needs, as plain JSON data (see :mod:`partition.replan_inputs`)."""
    accuracy: Accuracy | None = None
    """Measured output error of a plan with compressed links (``None``: nothing measured)."""
    unreplicated: str = ""
    """Why the planner could not consider replicated stages though allowed to, or ``""``."""
    media: tuple[PlannedMedium, ...] = ()
    """The cluster's shared media (:mod:`partition.media`), each with its busy time."""
    latency_p50_s: float | None = None
    """One request's idle latency, median over the paths it may take (one replica a stage,
    :mod:`partition.path_latency`), where ``latency_s`` is their mean; what a measured p50
    is compared with. ``None`` (a plan written before it was recorded) reads as
    ``latency_s``, which it equals without replicated stages."""

    def __post_init__(self) -> None:
        if self.latency_p50_s is None:
            object.__setattr__(self, "latency_p50_s", self.latency_s)

    @property
    def throughput_per_s(self) -> float:
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else float("inf")

    def hop_ends(self, k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Hop ``k``'s senders and receivers (hop 0 leaves the source, the last one reaches
        the sink)."""
        return _hop_ends(self.source, self.sink, [s.nodes for s in self.stages], k)

    def hop_links(self, k: int) -> tuple[Link, ...]:
        """Hop ``k``'s links, sender-major: one per (sender, receiver) pair."""
        offsets = _hop_offsets(self.source, self.sink, [s.nodes for s in self.stages])
        return self.links[offsets[k]:offsets[k + 1]]

    def latency_under_load(self, in_flight: int, offered_per_s: float | None = None) -> float:
        """A request's predicted median latency with ``in_flight`` requests kept in flight, at
        most ``offered_per_s`` a second if given (:func:`partition.queueing.latency_under_load`
        from the idle median)."""
        return latency_under_load(self.latency_p50_s, self.bottleneck_s, max(in_flight, 1),
                                  offered_per_s)

    def throughput_under(self, offered_per_s: float | None) -> float:
        """The predicted throughput when at most ``offered_per_s`` requests a second come."""
        if offered_per_s is None:
            return self.throughput_per_s
        return min(self.throughput_per_s, offered_per_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": {
                "sha256": self.model_sha256, "path": self.model_path,
                "granularity": self.granularity, "layers": list(self.layer_names),
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
            },
            "objective": self.objective.value,
            "source": self.source,
            "sink": self.sink,
            "nodes": [{"name": n, "address": a} for n, a in self.addresses.items()],
            "stages": [s.to_dict() for s in self.stages],
            "links": [link.to_dict() for link in self.links],
            "predicted": {
                "latency_s": self.latency_s, "latency_p50_s": self.latency_p50_s,
                "bottleneck_s": self.bottleneck_s, "throughput_per_s": self.throughput_per_s,
                "exact": self.exact, "lower_bound_s": self.lower_bound_s,
                **({"unreplicated": self.unreplicated} if self.unreplicated else {}),
            },
            "baselines": [b.to_dict() for b in self.baselines],
            **({"security": self.security.to_dict()} if self.security else {}),
            **({"replan": self.replan} if self.replan is not None else {}),
            **({"accuracy": self.accuracy.to_dict()} if self.accuracy else {}),
            **({"media": [m.to_dict() for m in self.media]} if self.media else {}),
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "plan") -> Plan:
        """Read a plan's JSON form; ``origin`` names it in error messages.

        Raises
        ------
        PlanFormatError
            If ``data`` is not of this schema, a field is missing or of the wrong kind, or
            the stages, links and nodes do not fit together (one line naming the field).
        """
        if not isinstance(data, dict) or data.get("schema") not in READABLE:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise PlanFormatError(
                f"{origin}: not an edgesplit plan of schema {' or '.join(map(repr, READABLE))} "
                f"(found {reprlib.repr(found)}); make one with `coordinator plan`"
            )
        _check_fields(origin, data, _PLAN_FIELDS, "")
        for k, stage in enumerate(data["stages"]):
            if not stage.get("nodes") and not {"node", "address"} <= stage.keys():
                raise _invalid(origin, f"stages[{k}].nodes", "is missing (or empty)")
        model, predicted = data["model"], data["predicted"]
        plan = cls(
            model_sha256=model["sha256"], model_path=model["path"],
            granularity=model["granularity"], layer_names=tuple(model["layers"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in model["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in model["outputs"]),
            objective=Objective(data["objective"]),
            source=data["source"], sink=data["sink"],
            addresses={n["name"]: n["address"] for n in data["nodes"]},
            stages=tuple(PlannedStage.from_dict(s) for s in data["stages"]),
            links=tuple(Link.from_dict(x) for x in data["links"]),
            latency_s=float(predicted["latency_s"]),
            latency_p50_s=(float(predicted["latency_p50_s"]) if "latency_p50_s" in predicted
                           else None),
            bottleneck_s=float(predicted["bottleneck_s"]),
            exact=bool(predicted["exact"]), lower_bound_s=float(predicted["lower_bound_s"]),
            unreplicated=predicted.get("unreplicated", ""),
            baselines=tuple(BaselineResult.from_dict(b) for b in data["baselines"]),
            security=SecuritySpec.from_dict(data["security"]) if "security" in data else None,
            replan=data.get("replan"),
            accuracy=Accuracy.from_dict(data["accuracy"]) if "accuracy" in data else None,
            media=tuple(PlannedMedium.from_dict(m) for m in data.get("media", ())),
        )
        if len(plan.addresses) != len(data["nodes"]):
            raise _invalid(origin, "nodes", "names a node twice")
        _check_plan(origin, plan)
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and check ``plan.json``; every problem is one :class:`PlanFormatError`."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanFormatError(
                f"plan file '{path}' does not exist; make one with `coordinator plan`"
            ) from None
        except (OSError, ValueError, RecursionError) as err:
            raise PlanFormatError(
                f"cannot read plan '{path}' ({' '.join(str(err).split())}); "
                "make one with `coordinator plan`"
            ) from err
        return cls.from_dict(data, str(path))


class _Number(NamedTuple):
    """A JSON number that is at least 0; ``infinite`` also admits +inf (a free link, say)."""

    infinite: bool = False


class _Optional(NamedTuple):
    """A field that may be absent."""

    spec: Any


FieldSpec = Any
"""What a field must be: ``str``, ``bool``, ``int`` (>= 0), a :class:`_Number`, an
:class:`enum.Enum` (one of its values), ``[spec]`` (a list of spec), ``{key: spec}`` (a
mapping with those keys; others are ignored) or a function returning a problem or ``None``."""


def _dtype(value: Any) -> str | None:
    try:
        dtype_from_name(value if isinstance(value, str) else "")
    except TensorSpecError:
        return "is not a dtype name such as 'float32' or 'int64'"
    return None


_TENSOR = {"name": str, "dtype": _dtype, "shape": [int]}
_LINK = {"from": str, "to": str, "bytes_per_s": _Number(infinite=True), "latency_s": _Number(),
         "encoding": LinkEncoding}
_REPLICA = {"node": str, "address": str, "share": _Number()}
_STAGE = {
    "index": int, "node": _Optional(str), "address": _Optional(str),
    "nodes": _Optional([_REPLICA]), "start": int, "end": int,
    "first_layer": str, "last_layer": str, "receives": [_TENSOR], "sends": [_TENSOR],
    "compute_s": _Number(), "transfer_in_s": _Number(), "memory_bytes": int,
    "memory_available_bytes": int, "weights": _Optional(WeightFormat),
    "artifact_bytes": _Optional(int),
}
_BASELINE = {
    "name": str, "description": str, "stages": [{"node": str, "start": int, "end": int}],
    "links": [_LINK], "latency_s": _Number(infinite=True),
    "throughput_per_s": _Number(infinite=True), "fits": bool, "note": _Optional(str),
}
_PLAN_FIELDS = {
    "model": {"sha256": str, "path": str, "granularity": str, "layers": [str],
              "inputs": [_TENSOR], "outputs": [_TENSOR]},
    "objective": Objective, "source": str, "sink": str,
    "nodes": [{"name": str, "address": str}], "stages": [_STAGE], "links": [_LINK],
    "predicted": {"latency_s": _Number(infinite=True),
                  "latency_p50_s": _Optional(_Number(infinite=True)),
                  "bottleneck_s": _Number(infinite=True),
                  "exact": bool, "lower_bound_s": _Number(infinite=True),
                  "unreplicated": _Optional(str)},
    "baselines": [_BASELINE],
    "accuracy": _Optional({
        "inputs": int, "max_abs_error": _Number(infinite=True),
        "max_rel_error": _Number(infinite=True), "error_bound": _Number(infinite=True),
        "max_error": _Number(infinite=True), "top1_agreement": _Optional(_Number()),
        "next_token_agreement": _Optional(_Number()),
    }),
    "media": _Optional([{"name": str, "bytes_per_s": _Number(), "nodes": [str],
                         "busy_s": _Number(infinite=True)}]),
}
_KINDS = {str: "a string", bool: "true or false", int: "a non-negative integer"}


def _check_fields(origin: str, value: Any, spec: FieldSpec, path: str) -> None:
    """Raise :class:`PlanFormatError` at the first field of ``value`` that breaks ``spec``."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise _invalid(origin, path or "the plan", "must be a JSON object", value)
        for key, field_spec in spec.items():
            where = f"{path}.{key}" if path else key
            if isinstance(field_spec, _Optional):
                if key in value:
                    _check_fields(origin, value[key], field_spec.spec, where)
            elif key not in value:
                raise _invalid(origin, where, "is missing")
            else:
                _check_fields(origin, value[key], field_spec, where)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise _invalid(origin, path, "must be a list", value)
        for i, item in enumerate(value):
            _check_fields(origin, item, spec[0], f"{path}[{i}]")
    elif (problem := _problem(value, spec)) is not None:
        raise _invalid(origin, path, problem, value)


def _problem(value: Any, spec: FieldSpec) -> str | None:
    """What is wrong with the scalar ``value`` under ``spec``, or ``None``."""
    if isinstance(spec, type) and issubclass(spec, enum.Enum):
        known = [member.value for member in spec]
        return None if value in known else f"must be one of {', '.join(map(repr, known))}"
    if isinstance(spec, _Number):
        ok = (isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
              and (spec.infinite or math.isfinite(value)))
        return None if ok else "must be a non-negative number"
    if spec in _KINDS:
        ok = (isinstance(value, spec) and isinstance(value, bool) == (spec is bool)
              and (spec is not int or value >= 0))
        return None if ok else f"must be {_KINDS[spec]}"
    return spec(value)


def _check_plan(origin: str, plan: Plan) -> None:
    """The stages and every baseline cover the layers in order on known nodes, joined by
    their links, each stage receives what the one before it sends, and a replicated stage's
    shares add up to 1."""
    if not plan.stages:
        raise _invalid(origin, "stages", "is empty, but a plan needs at least one stage")
    for name, where in ((plan.source, "source"), (plan.sink, "sink")):
        if name not in plan.addresses:
            raise _invalid(origin, where, "is not one of nodes[].name", name)
    used = [node for stage in plan.stages for node in stage.nodes]
    if len(set(used)) != len(used):
        raise _invalid(origin, "stages", "put two stages or replicas on one node", used)
    _check_chain(origin, "", [(s.nodes, s.start, s.end) for s in plan.stages], plan.links, plan)
    for k, stage in enumerate(plan.stages):
        if stage.index != k:
            raise _invalid(origin, f"stages[{k}].index", f"must be {k}", stage.index)
        for r, replica in enumerate(stage.replicas):
            if plan.addresses[replica.node] != replica.address:
                raise _invalid(origin, f"stages[{k}].nodes[{r}].address",
                               f"must be {replica.node!r}'s address in nodes", replica.address)
        total = sum(r.share for r in stage.replicas)
        if abs(total - 1.0) > SHARE_TOLERANCE or any(r.share <= 0 for r in stage.replicas):
            raise _invalid(origin, f"stages[{k}].nodes",
                           "must have positive shares that add up to 1", total)
        if k and stage.receives != plan.stages[k - 1].sends:
            raise _invalid(origin, f"stages[{k}].receives", f"must equal stages[{k - 1}].sends")
    for b, baseline in enumerate(plan.baselines):
        if baseline.stages:
            spans = [((node,), start, end) for node, start, end in baseline.stages]
            _check_chain(origin, f"baselines[{b}].", spans, baseline.links, plan)
    for m, medium in enumerate(plan.media):
        if not 0 < medium.bytes_per_s < math.inf:
            raise _invalid(origin, f"media[{m}].bytes_per_s", "must be positive and finite",
                           medium.bytes_per_s)
        for k, node in enumerate(medium.nodes):
            if node not in plan.addresses:
                raise _invalid(origin, f"media[{m}].nodes[{k}]", "is not one of nodes[].name",
                               node)


def _hop_ends(
    source: str, sink: str, stage_nodes: Sequence[tuple[str, ...]], k: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Hop ``k``'s senders and receivers along stages run by ``stage_nodes``."""
    ends = [(source,), *stage_nodes, (sink,)]
    return ends[k], ends[k + 1]


def _hop_offsets(source: str, sink: str, stage_nodes: Sequence[tuple[str, ...]]) -> list[int]:
    """Where each hop's links begin in a plan's ``links`` (and, last, where they end)."""
    offsets = [0]
    for k in range(len(stage_nodes) + 1):
        senders, receivers = _hop_ends(source, sink, stage_nodes, k)
        offsets.append(offsets[-1] + len(senders) * len(receivers))
    return offsets


def _check_chain(
    origin: str, prefix: str, spans: Sequence[tuple[tuple[str, ...], int, int]],
    links: Sequence[Link], plan: Plan,
) -> None:
    """``spans`` (nodes, start, end) cover every layer in order and ``links`` join the
    source, the spans' nodes and the sink, hop after hop, every sender to every receiver."""
    layers = len(plan.layer_names)
    for k, (nodes, start, end) in enumerate(spans):
        at = f"{prefix}stages[{k}]"
        begin = spans[k - 1][2] if k else 0
        for r, node in enumerate(nodes):
            # A plan's stages list their replicas (``nodes``); a baseline's stages one node.
            field = f"{at}.node" if prefix else f"{at}.nodes[{r}].node"
            if node not in plan.addresses:
                raise _invalid(origin, field, "is not one of nodes[].name", node)
        if start != begin:
            where = f"{prefix}stages[{k - 1}] ends" if k else "the model begins"
            raise _invalid(origin, f"{at}.start", f"must be {begin}, where {where}", start)
        if end <= start:
            raise _invalid(origin, f"{at}.end", f"must be greater than start ({start})", end)
        if end > layers:
            raise _invalid(origin, f"{at}.end", f"must be at most {layers}, the number of "
                           "model.layers", end)
    if spans[-1][2] != layers:
        raise _invalid(origin, f"{prefix}stages[{len(spans) - 1}].end",
                       f"must be {layers}, the number of model.layers", spans[-1][2])
    stage_nodes = [nodes for nodes, _, _ in spans]
    pairs = [
        (src, dst)
        for k in range(len(spans) + 1)
        for src in _hop_ends(plan.source, plan.sink, stage_nodes, k)[0]
        for dst in _hop_ends(plan.source, plan.sink, stage_nodes, k)[1]
    ]
    if len(links) != len(pairs):
        raise _invalid(origin, f"{prefix}links", f"has {len(links)} entries, but must have "
                       f"{len(pairs)}: one per sender and receiver of each hop, from the "
                       f"source through {prefix}stages to the sink")
    for k, (link, (src, dst)) in enumerate(zip(links, pairs, strict=True)):
        for end_, value, want in (("from", link.src, src), ("to", link.dst, dst)):
            if value != want:
                raise _invalid(origin, f"{prefix}links[{k}].{end_}", f"must be {want!r}", value)


_NOTHING = object()


def _invalid(origin: str, path: str, problem: str, value: Any = _NOTHING) -> PlanFormatError:
    shown = "" if value is _NOTHING else f" ({reprlib.repr(value)})"
    return PlanFormatError(f"{origin}: {path}{shown} {problem}; "
                           "fix it or make a new plan with `coordinator plan`")

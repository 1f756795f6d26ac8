"""The plan: which node runs which layers, what it costs, and what the baselines would cost.

``plan(...)`` is the planning entry point; :class:`Plan` has a stable, versioned JSON form
(``docs/plan-schema.md``) that is the one thing the runtime reads.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from partition.baselines import baselines
from partition.cluster import ClusterSpec
from partition.cost_builder import build_cost_model
from partition.costs import CostModel
from partition.errors import PlanFormatError
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.optimizer import Objective, Schedule, optimize
from partition.profiler import Profile
from partition.replan_inputs import replan_inputs
from partition.spec import TensorSpec

SCHEMA = "edgesplit.plan/1"


class LinkEncoding(enum.Enum):
    """How tensors cross a link. A property of the plan, so that compressed encodings
    (float16, int8 with scale and zero point) can be chosen per link; today every link
    carries the tensors' raw bytes."""

    RAW = "raw"


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
class PlannedStage:
    """One stage of a plan: layers ``[start, end)`` on ``node`` and its predicted costs."""

    index: int
    node: str
    address: str
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

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes for t in self.receives)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.sends)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "node": self.node, "address": self.address,
            "start": self.start, "end": self.end,
            "first_layer": self.first_layer, "last_layer": self.last_layer,
            "receives": [t.to_dict() for t in self.receives],
            "sends": [t.to_dict() for t in self.sends],
            "compute_s": self.compute_s, "transfer_in_s": self.transfer_in_s,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "memory_bytes": self.memory_bytes,
            "memory_available_bytes": self.memory_available_bytes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedStage:
        return cls(
            index=int(data["index"]), node=data["node"], address=data["address"],
            start=int(data["start"]), end=int(data["end"]),
            first_layer=data["first_layer"], last_layer=data["last_layer"],
            receives=tuple(TensorSpec.from_dict(t) for t in data["receives"]),
            sends=tuple(TensorSpec.from_dict(t) for t in data["sends"]),
            compute_s=float(data["compute_s"]), transfer_in_s=float(data["transfer_in_s"]),
            memory_bytes=int(data["memory_bytes"]),
            memory_available_bytes=int(data["memory_available_bytes"]),
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
    """Everything the runtime needs: the model, the stages on their nodes, the hops, and the
    predictions (``links`` has one more entry than ``stages``: source -> first stage, between
    stages, last stage -> sink)."""

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
    replan: dict[str, Any] | None = None
    """What re-planning needs, as plain JSON data (see :mod:`partition.replan_inputs`)."""

    @property
    def throughput_per_s(self) -> float:
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else float("inf")

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
                "latency_s": self.latency_s, "bottleneck_s": self.bottleneck_s,
                "throughput_per_s": self.throughput_per_s,
                "exact": self.exact, "lower_bound_s": self.lower_bound_s,
            },
            "baselines": [b.to_dict() for b in self.baselines],
            **({"replan": self.replan} if self.replan is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise PlanFormatError(
                f"not an edgesplit plan of schema {SCHEMA!r} (found {found!r}); "
                "make one with `coordinator plan`"
            )
        model, predicted = data["model"], data["predicted"]
        return cls(
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
            bottleneck_s=float(predicted["bottleneck_s"]),
            exact=bool(predicted["exact"]), lower_bound_s=float(predicted["lower_bound_s"]),
            baselines=tuple(BaselineResult.from_dict(b) for b in data["baselines"]),
            replan=data.get("replan"),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanFormatError(
                f"plan file '{path}' does not exist; make one with `coordinator plan`"
            ) from None
        except (OSError, ValueError) as err:
            raise PlanFormatError(f"cannot read plan '{path}': {err}") from err
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise PlanFormatError(f"plan '{path}' is malformed ({err!r}); plan again") from err


def plan(
    model: LoadedModel,
    layer_graph: LayerGraph,
    cluster: ClusterSpec,
    profiles: dict[str, Profile],
    objective: Objective = Objective.THROUGHPUT,
) -> Plan:
    """Choose the stages that optimize ``objective`` and price the baselines beside them.

    ``profiles`` holds one profile per node of ``cluster`` (see
    :func:`partition.cost_builder.node_profiles`).
    """
    cost = build_cost_model(layer_graph, cluster, profiles)
    result = optimize(cost, objective)
    made = plan_from_schedule(
        model, layer_graph, cluster, cost, result.schedule, objective,
        exact=result.exact, lower_bound_s=result.lower_bound_s,
        baseline_results=tuple(
            _baseline_result(b.name, b.description, b.schedule, b.note, cost, cluster)
            for b in baselines(cost, objective)
        ),
    )
    return replace(made, replan=replan_inputs(cluster, profiles))


def plan_from_schedule(
    model: LoadedModel,
    layer_graph: LayerGraph,
    cluster: ClusterSpec,
    cost: CostModel,
    schedule: Schedule,
    objective: Objective,
    *,
    exact: bool,
    lower_bound_s: float,
    baseline_results: tuple[BaselineResult, ...] = (),
) -> Plan:
    """Describe a priced schedule as a :class:`Plan` (also used to deploy a baseline)."""
    names = cost.node_names
    stages = tuple(
        PlannedStage(
            index=k,
            node=names[span.node],
            address=cluster.node(names[span.node]).address,
            start=span.start,
            end=span.end,
            first_layer=layer_graph.layers[span.start].name,
            last_layer=layer_graph.layers[span.end - 1].name,
            receives=layer_graph.boundary_tensors(span.start),
            sends=layer_graph.boundary_tensors(span.end),
            compute_s=schedule.stage_seconds[k],
            transfer_in_s=schedule.transfer_seconds[k],
            memory_bytes=int(cost.stage_memory_bytes[span.start, span.end]),
            memory_available_bytes=int(cost.node_memory_bytes[span.node]),
        )
        for k, span in enumerate(schedule.spans)
    )
    links = _links(cluster, [s.node for s in stages])
    return Plan(
        model_sha256=model.sha256,
        model_path=model.source,
        granularity=layer_graph.granularity,
        layer_names=tuple(layer.name for layer in layer_graph.layers),
        inputs=model.input_specs,
        outputs=tuple(layer_graph.values[name] for name in layer_graph.user_outputs),
        objective=objective,
        source=cluster.source,
        sink=cluster.sink,
        addresses={node.name: node.address for node in cluster.nodes},
        stages=stages,
        links=links,
        latency_s=schedule.latency_s,
        bottleneck_s=schedule.bottleneck_s,
        exact=exact,
        lower_bound_s=lower_bound_s,
        baselines=baseline_results,
    )


def _links(cluster: ClusterSpec, nodes: list[str]) -> tuple[Link, ...]:
    """The hops source -> each node in turn -> sink."""
    hops = [cluster.source, *nodes, cluster.sink]
    return tuple(
        Link(a, b, cluster.link(a, b).bytes_per_s, cluster.link(a, b).latency_s)
        for a, b in zip(hops, hops[1:], strict=False)
    )


def _baseline_result(
    name: str, description: str, schedule: Schedule | None, note: str, cost: CostModel,
    cluster: ClusterSpec,
) -> BaselineResult:
    if schedule is None:
        return BaselineResult(name, description, (), (), float("inf"), 0.0, False, note)
    nodes = [cost.node_names[s.node] for s in schedule.spans]
    return BaselineResult(
        name, description,
        tuple((node, s.start, s.end) for node, s in zip(nodes, schedule.spans, strict=True)),
        _links(cluster, nodes),
        schedule.latency_s, schedule.throughput_per_s, schedule.fits, note,
    )


def baseline_plan(plan_: Plan, baseline: BaselineResult, layer_graph: LayerGraph) -> Plan:
    """A deployable plan that runs ``baseline``'s stages on the same cluster and links."""
    stages = tuple(
        PlannedStage(
            index=k, node=node, address=plan_.addresses[node], start=start, end=end,
            first_layer=layer_graph.layers[start].name,
            last_layer=layer_graph.layers[end - 1].name,
            receives=layer_graph.boundary_tensors(start),
            sends=layer_graph.boundary_tensors(end),
            compute_s=float("nan"), transfer_in_s=float("nan"),
            memory_bytes=0, memory_available_bytes=0,
        )
        for k, (node, start, end) in enumerate(baseline.stages)
    )
    return replace(
        plan_,
        stages=stages,
        links=baseline.links,
        latency_s=baseline.latency_s,
        bottleneck_s=1.0 / baseline.throughput_per_s,
        baselines=(),
    )

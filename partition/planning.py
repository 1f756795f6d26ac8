"""Planning: which node runs which layers, what it costs, and what the baselines would cost.

``plan(...)`` is the planning entry point; it returns a :class:`partition.plan.Plan`.
"""

from __future__ import annotations

from dataclasses import replace

from partition.baselines import baselines
from partition.choice_tables import Options
from partition.cluster import ClusterSpec
from partition.compression_planning import CompressionRequest, MeasuredOffer, choose
from partition.cost_builder import build_cost_model
from partition.costs import CostModel
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.optimizer import OptimizeResult, Schedule, optimize
from partition.plan import (
    Accuracy,
    BaselineResult,
    Link,
    LinkEncoding,
    Objective,
    Plan,
    PlannedMedium,
    PlannedStage,
    Replica,
)
from partition.profiler import Profile
from partition.quantize import WeightFormat, weight_bytes
from partition.replan_inputs import replan_inputs


def plan(
    model: LoadedModel,
    layer_graph: LayerGraph,
    cluster: ClusterSpec,
    profiles: dict[str, Profile],
    objective: Objective = Objective.THROUGHPUT,
    compression: CompressionRequest | None = None,
    replicate: bool = True,
) -> Plan:
    """Choose the stages that optimize ``objective`` and price the baselines beside them.

    ``profiles`` holds one profile per node of ``cluster`` (see
    :func:`partition.cost_builder.node_profiles`). With ``compression``, each link's
    encoding (and, offered, each stage's weight format) is chosen with the stages
    (:mod:`partition.compression_planning`) and the plan records its measured accuracy, the
    nodes' own weight formats included (pass a request with mode ``none`` to measure those
    alone); the baselines stay raw. With ``replicate``, a stage may run on several nodes
    (:func:`partition.optimizer.optimize`; not with weight formats to choose or more than
    one shared medium).
    """
    cost = build_cost_model(layer_graph, cluster, profiles)
    result, priced, accuracy = search(cost, layer_graph, cluster, objective, compression,
                                      replicate)
    made = plan_from_schedule(
        model, layer_graph, cluster, priced, result.schedule, objective,
        exact=result.exact, lower_bound_s=result.lower_bound_s,
        baseline_results=tuple(
            _baseline_result(b.name, b.description, b.schedule, b.note, cost, cluster)
            for b in baselines(cost, objective, layer_graph.value_flow())
        ),
    )
    return replace(made, replan=replan_inputs(cluster, profiles, compression, replicate),
                   accuracy=accuracy, unreplicated=result.unreplicated)


def search(
    cost: CostModel, layer_graph: LayerGraph, cluster: ClusterSpec, objective: Objective,
    compression: CompressionRequest | MeasuredOffer | None = None, replicate: bool = True,
) -> tuple[OptimizeResult, CostModel, Accuracy | None]:
    """The optimizer's best schedule for ``objective`` (replicated stages allowed if
    ``replicate``); with ``compression`` chosen with its encodings and weight formats (each
    node's own ``quantize`` as the default; replicated only where no weight format is offered),
    priced on the cost model with its compression, and its measured accuracy."""
    if compression is None:
        return optimize(cost, objective, replicate=replicate), cost, None
    own = [node.quantize or WeightFormat.NONE for node in cluster.nodes]
    chosen = choose(cost, layer_graph, objective, compression, own)
    result = chosen.result if replicate else replace(chosen.result, unreplicated="")
    return result, chosen.cost, chosen.accuracy


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
    """Describe a priced schedule as a :class:`Plan` (also used to deploy a baseline): each
    link in the schedule's encoding, each stage in its weight format (option 0: the node's
    ``quantize``), a replicated stage with each replica's share of the requests and, as its
    memory, the replica's whose stage takes the largest part of its memory."""
    addresses = {node.name: node.address for node in cluster.nodes}
    configured = {node.name: node.quantize or WeightFormat.NONE for node in cluster.nodes}
    opts = Options.of(cost)
    chosen = schedule.formats or (0,) * len(schedule.spans)
    stages = []
    for k, (span, w) in enumerate(zip(schedule.spans, chosen, strict=True)):
        node = cost.node_names[span.node]
        fmt = WeightFormat(opts.formats[w]) if w else configured[node]
        need = {d: int(opts.stage_memory[w, d, span.start, span.end]) for d in span.replicas}
        tightest = max(span.replicas, key=lambda d: need[d] / max(cost.node_memory_bytes[d], 1))
        stage = _planned_stage(
            layer_graph, k, node, addresses, span.start, span.end,
            compute_s=schedule.stage_seconds[k],
            transfer_in_s=schedule.transfer_seconds[k],
            memory_bytes=need[tightest],
            memory_available_bytes=int(cost.node_memory_bytes[tightest]),
        )
        sizes = weight_bytes(layer_graph, fmt)
        params = {name for layer in layer_graph.layers[span.start:span.end]
                  for name in layer.params}
        replicas = tuple(
            Replica(cost.node_names[d], addresses[cost.node_names[d]], share)
            for d, share in zip(span.replicas, span.dealt(cost), strict=True)
        )
        stages.append(replace(stage, weights=fmt, artifact_bytes=sum(sizes[n] for n in params),
                              replicas=replicas))
    encodings = tuple(LinkEncoding(opts.encodings[e]) for e in schedule.encodings) or None
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
        addresses=addresses,
        stages=tuple(stages),
        links=_links(cluster, [s.nodes for s in stages], encodings),
        latency_s=schedule.latency_s,
        latency_p50_s=schedule.latency_p50_s,
        bottleneck_s=schedule.bottleneck_s,
        exact=exact,
        lower_bound_s=lower_bound_s,
        baselines=baseline_results,
        security=cluster.security,
        media=tuple(PlannedMedium(m.name, m.bytes_per_s, m.nodes, busy) for m, busy
                    in zip(cluster.media, schedule.medium_seconds, strict=True)),
    )


def with_predictions(plan_: Plan, schedule: Schedule) -> Plan:
    """``plan_`` with ``schedule``'s predictions (``schedule`` prices the same stages, for
    example a replicated stage with a node left out, its requests dealt anew): latency mean
    and median, bottleneck, each stage's time and inbound transfer, each medium's busy time."""
    stages = tuple(replace(stage, compute_s=compute, transfer_in_s=transfer)
                   for stage, compute, transfer in zip(
                       plan_.stages, schedule.stage_seconds, schedule.transfer_seconds[:-1],
                       strict=True))
    return replace(
        plan_, stages=stages, latency_s=schedule.latency_s,
        latency_p50_s=schedule.latency_p50_s, bottleneck_s=schedule.bottleneck_s,
        media=tuple(replace(medium, busy_s=busy) for medium, busy
                    in zip(plan_.media, schedule.medium_seconds, strict=True)),
    )


def baseline_plan(plan_: Plan, baseline: BaselineResult, layer_graph: LayerGraph) -> Plan:
    """A deployable plan that runs ``baseline``'s stages on the same cluster and links.

    A baseline has no per-stage predictions: its stages carry NaN times and zero memory. It
    runs one node a stage, so its median latency is its latency.
    """
    stages = tuple(
        _planned_stage(
            layer_graph, k, node, plan_.addresses, start, end,
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
        latency_p50_s=baseline.latency_s,
        bottleneck_s=1.0 / baseline.throughput_per_s,
        baselines=(),
    )


def _planned_stage(
    layer_graph: LayerGraph, index: int, node: str, addresses: dict[str, str],
    start: int, end: int, *, compute_s: float, transfer_in_s: float,
    memory_bytes: int, memory_available_bytes: int,
) -> PlannedStage:
    """Stage ``index``: layers ``[start, end)`` of ``layer_graph`` on ``node``."""
    return PlannedStage(
        index=index, replicas=(Replica(node, addresses[node]),), start=start, end=end,
        first_layer=layer_graph.layers[start].name,
        last_layer=layer_graph.layers[end - 1].name,
        receives=layer_graph.boundary_tensors(start),
        sends=layer_graph.boundary_tensors(end),
        compute_s=compute_s, transfer_in_s=transfer_in_s,
        memory_bytes=memory_bytes, memory_available_bytes=memory_available_bytes,
    )


def _links(
    cluster: ClusterSpec, nodes: list[tuple[str, ...]],
    encodings: tuple[LinkEncoding, ...] | None = None,
) -> tuple[Link, ...]:
    """The hops source -> each stage's nodes in turn -> sink, in ``encodings`` (default
    raw): a link from every sender of a hop to every receiver."""
    hops = [(cluster.source,), *nodes, (cluster.sink,)]
    codes = encodings or (LinkEncoding.RAW,) * (len(hops) - 1)
    return tuple(
        Link(a, b, cluster.link(a, b).bytes_per_s, cluster.link(a, b).latency_s, e)
        for senders, receivers, e in zip(hops[:-1], hops[1:], codes, strict=True)
        for a in senders for b in receivers
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
        _links(cluster, [(node,) for node in nodes]),
        schedule.latency_s, schedule.throughput_per_s, schedule.fits, note,
    )

"""Rich tables for a plan's stages, its shared media and its baselines."""

from __future__ import annotations

from rich.table import Table

from coordinator.bench import BENCH_CONCURRENCY
from coordinator.console import ms
from partition.plan import LinkEncoding, Objective, Plan, PlannedStage
from partition.units import format_bandwidth, format_bytes


def stages_table(plan: Plan) -> Table:
    """Stage, node (a replicated stage's nodes and their shares), layers, compute, bytes
    in/out, transfer in, weights, memory used / available."""
    table = Table(title=f"plan ({plan.objective.value}): {len(plan.stages)} stage(s)")
    for column in ("stage", "node", "layers", "compute ms", "in", "transfer in ms", "out",
                   "weights", "memory used / available"):
        table.add_column(column, justify="left" if column in ("node", "layers") else "right")
    for stage in plan.stages:
        table.add_row(
            str(stage.index), _nodes(stage),
            f"[{stage.start}, {stage.end}) {stage.first_layer} .. {stage.last_layer}",
            ms(stage.compute_s), format_bytes(stage.bytes_in), ms(stage.transfer_in_s),
            format_bytes(stage.bytes_out), _weights(stage),
            f"{format_bytes(stage.memory_bytes)} / {format_bytes(stage.memory_available_bytes)}",
        )
    return table


def _nodes(stage: PlannedStage) -> str:
    """The stage's node, or its replicas with their shares: ``jetson 50% + laptop 50%``."""
    if not stage.replicated:
        return stage.node
    return " + ".join(f"{r.node} {r.share:.0%}" for r in stage.replicas)


def replication_line(plan: Plan) -> list[str]:
    """Why no stage could be replicated, when the planner was allowed to but could not."""
    return [f"replication: not considered, {plan.unreplicated}"] if plan.unreplicated else []


def _weights(stage: PlannedStage) -> str:
    """The stage's weight format and, when known, its weights' bytes."""
    if stage.artifact_bytes is None:
        return stage.weights.value
    return f"{stage.weights.value} {format_bytes(stage.artifact_bytes)}"


def totals_line(plan: Plan) -> str:
    """The plan's predictions: latency alone (with replicated stages, the mean and the median
    over the paths requests take, when they differ) and its median with `bench`'s requests in
    flight, and throughput; when not proven optimal, how far at most the objective's value is
    from the optimum (the solver's proven gap)."""
    bound = "" if plan.exact else f" ({_gap(plan)})"
    alone = (f"{ms(plan.latency_s)} ms alone" if plan.latency_p50_s == plan.latency_s else
             f"{ms(plan.latency_s)} ms alone on average, p50 {ms(plan.latency_p50_s)} ms")
    return (
        f"predicted: latency {alone}, "
        f"{ms(plan.latency_under_load(BENCH_CONCURRENCY))} ms with {BENCH_CONCURRENCY} in "
        f"flight (bench's default), throughput {plan.throughput_per_s:.1f} "
        f"req/s (bottleneck {ms(plan.bottleneck_s)} ms){bound}"
    )


def _gap(plan: Plan) -> str:
    value = plan.latency_s if plan.objective is Objective.LATENCY else plan.bottleneck_s
    name = "latency" if plan.objective is Objective.LATENCY else "bottleneck"
    if plan.lower_bound_s <= 0:
        return f"not proven optimal; no lower bound on the {name} was found"
    return (f"not proven optimal: {name} at most {value / plan.lower_bound_s - 1:.2%} above "
            f"the optimum, which is >= {ms(plan.lower_bound_s)} ms")


def media_table(plan: Plan) -> Table | None:
    """Each shared medium: its bandwidth, its nodes, how long a request keeps it busy (the
    airtime of every hop on it) and that as a share of the plan's bottleneck; ``None`` for
    a cluster without media."""
    if not plan.media:
        return None
    table = Table(title="shared media (busy time per request)")
    for column in ("medium", "bandwidth", "nodes", "hops on it", "busy ms", "of bottleneck"):
        table.add_column(column, justify="left" if column in ("medium", "nodes", "hops on it")
                         else "right")
    for medium in plan.media:
        hops = [f"{link.src} -> {link.dst}" + (" (x2)" if uses == 2 else "")
                for link in plan.links if (uses := medium.uses(link.src, link.dst))]
        table.add_row(medium.name, format_bandwidth(medium.bytes_per_s), ", ".join(medium.nodes),
                      ", ".join(hops) or "none", ms(medium.busy_s),
                      f"{medium.busy_s / plan.bottleneck_s:.0%}" if plan.bottleneck_s else "-")
    return table


def compression_lines(plan: Plan) -> list[str]:
    """Each link's encoding and the measured accuracy, for a plan that chose compression."""
    if plan.accuracy is None:
        return []
    links = ", ".join(f"{link.src} -> {link.dst} {link.encoding.value}" for link in plan.links
                      if link.src != link.dst or link.encoding is not LinkEncoding.RAW)
    a = plan.accuracy
    agreements = "".join(f", {name} {value:.1%}" for name, value in (
        ("top-1 agreement", a.top1_agreement), ("next-token agreement", a.next_token_agreement),
    ) if value is not None)
    return [
        f"links: {links or 'none between nodes'}",
        f"accuracy against float32 on {a.inputs} calibration input(s): max absolute error "
        f"{a.max_abs_error:.3g}, max relative error {a.max_rel_error:.3g} (budget "
        f"{a.max_error:g}; errors alone sum to {a.error_bound:.3g}){agreements}",
    ]


def baselines_table(plan: Plan) -> Table:
    """Each baseline's predicted latency and throughput and our plan's ratio to it."""
    table = Table(title="baselines on the same cost model")
    for column in ("strategy", "stages", "latency ms", "throughput req/s",
                   "ours / it (throughput)", "it / ours (latency)", "fits"):
        table.add_column(column, justify="left" if column in ("strategy", "stages") else "right")
    table.add_row(
        "edgesplit", " ".join(f"{'+'.join(s.nodes)}[{s.start},{s.end})" for s in plan.stages),
        ms(plan.latency_s), f"{plan.throughput_per_s:.1f}", "1.00x", "1.00x", "yes",
    )
    for base in plan.baselines:
        if not base.stages:
            table.add_row(base.name, base.note, "-", "-", "-", "-", "no")
            continue
        table.add_row(
            base.name,
            " ".join(f"{n}[{s},{e})" for n, s, e in base.stages),
            ms(base.latency_s),
            f"{base.throughput_per_s:.1f}",
            f"{plan.throughput_per_s / base.throughput_per_s:.2f}x",
            f"{base.latency_s / plan.latency_s:.2f}x",
            "yes" if base.fits else "no",
        )
    return table

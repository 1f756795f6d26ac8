"""Rich tables for a plan's stages and its baselines."""

from __future__ import annotations

from rich.table import Table

from coordinator.console import ms
from partition.plan import Plan, PlannedStage
from partition.units import format_bytes


def stages_table(plan: Plan) -> Table:
    """Stage, node, layers, compute, bytes in/out, transfer in, weights, memory used /
    available."""
    table = Table(title=f"plan ({plan.objective.value}): {len(plan.stages)} stage(s)")
    for column in ("stage", "node", "layers", "compute ms", "in", "transfer in ms", "out",
                   "weights", "memory used / available"):
        table.add_column(column, justify="left" if column in ("node", "layers") else "right")
    for stage in plan.stages:
        table.add_row(
            str(stage.index), stage.node,
            f"[{stage.start}, {stage.end}) {stage.first_layer} .. {stage.last_layer}",
            ms(stage.compute_s), format_bytes(stage.bytes_in), ms(stage.transfer_in_s),
            format_bytes(stage.bytes_out), _weights(stage),
            f"{format_bytes(stage.memory_bytes)} / {format_bytes(stage.memory_available_bytes)}",
        )
    return table


def _weights(stage: PlannedStage) -> str:
    """The stage's weight format and, when known, its weights' bytes."""
    if stage.artifact_bytes is None:
        return stage.weights.value
    return f"{stage.weights.value} {format_bytes(stage.artifact_bytes)}"


def totals_line(plan: Plan) -> str:
    bound = "" if plan.exact else f" (not exhaustive; optimum >= {ms(plan.lower_bound_s)} ms)"
    return (
        f"predicted: latency {ms(plan.latency_s)} ms, throughput {plan.throughput_per_s:.1f} "
        f"req/s (bottleneck {ms(plan.bottleneck_s)} ms){bound}"
    )


def baselines_table(plan: Plan) -> Table:
    """Each baseline's predicted latency and throughput and our plan's ratio to it."""
    table = Table(title="baselines on the same cost model")
    for column in ("strategy", "stages", "latency ms", "throughput req/s",
                   "ours / it (throughput)", "it / ours (latency)", "fits"):
        table.add_column(column, justify="left" if column in ("strategy", "stages") else "right")
    table.add_row(
        "edgesplit", " ".join(f"{s.node}[{s.start},{s.end})" for s in plan.stages),
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

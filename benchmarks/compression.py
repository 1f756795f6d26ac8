"""Compression: compressed links and quantized stages against the same models uncompressed.

For each model and cluster: plan for throughput without compression, with every link in
fp16 or int8, with the planner's choice (``auto``) at two error budgets, and with int8
weights; then run each plan on a fresh set of real ``edge-node`` processes (speeds and links
emulated) and measure it.

    .venv/bin/python benchmarks/compression.py [--requests 40] [--models gpt2 resnet]
        [--json out/compression.json] [--markdown]

Clusters: ``slow-links``, ``examples/cluster-homogeneous.yaml`` with every link at 10 Mbps;
``heterogeneous``, the demo's cluster; ``memory-tight``, the homogeneous cluster with each
node's memory halfway between the least a split over the four nodes needs per node with int8
weights and with float32 ones (so float32 fits no plan, and int8 does).

Columns: measured and predicted throughput, p50 latency, the stages' artifact bytes (their
weights, as plan.json records them), the largest worker's resident memory after the run,
and the plan's accuracy as measured when it was planned (max relative error and top-1 or
next-token agreement against float32, on the calibration inputs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import harness
import numpy as np
import psutil
import report

from coordinator import samples
from coordinator.bench import measure, random_inputs
from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.plan_command import OFFERED_WEIGHTS
from partition.cluster import (
    ClusterSpec,
    LinkSpec,
    every_node_quantized,
    load_cluster,
    with_default_quantize,
)
from partition.compression_choice import calibration_inputs, weight_offer
from partition.compression_planning import CompressionRequest, CompressMode
from partition.cost_builder import layer_seconds, node_profiles, stage_memory_matrix
from partition.errors import EdgesplitError
from partition.layers import LayerGraph
from partition.plan import Objective, Plan
from partition.planning import plan
from partition.profile_store import cached_profile
from partition.quantize import WeightFormat
from partition.split import split
from partition.units import format_bytes, parse_bandwidth

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODELS = {  # sample builder name and arguments
    "gpt2": ("gpt2", {"layers": 8, "width": 384, "seq": 128}),
    "resnet": ("resnet", {"image": 224, "batch": 4}),
}
SLOW_LINK = parse_bandwidth("10Mbps")
CALIBRATION_INPUTS = 4


@dataclass(frozen=True)
class Variant:
    """One way to plan: the links' compression, its error budget, the weights' format."""

    name: str
    compress: CompressMode = CompressMode.NONE
    max_error: float = float("inf")
    weights: WeightFormat = WeightFormat.NONE


VARIANTS = (
    Variant("none"),
    Variant("fp16 links", CompressMode.FP16),
    Variant("int8 links", CompressMode.INT8),
    Variant("auto 1e-2", CompressMode.AUTO, 1e-2),
    Variant("auto 5e-2", CompressMode.AUTO, 5e-2),
    Variant("int8 weights", weights=WeightFormat.INT8),
)


def slow_links(base: ClusterSpec) -> ClusterSpec:
    link = base.default_link
    assert link is not None
    return replace(base, default_link=LinkSpec(SLOW_LINK, link.latency_s), links={})


def memory_tight(base: ClusterSpec, layer_graph: LayerGraph) -> ClusterSpec:
    """``base`` with every node's memory halfway between the least a split over its nodes
    needs per node in int8 and in float32: float32 fits no plan, int8 does."""
    need = {fmt: least_per_node(stage_memory_matrix(layer_graph, fmt), len(base.nodes))
            for fmt in (WeightFormat.NONE, WeightFormat.INT8)}
    size = (need[WeightFormat.NONE] + need[WeightFormat.INT8]) // 2
    return replace(base, nodes=tuple(replace(n, memory_bytes=size) for n in base.nodes))


def least_per_node(memory: np.ndarray, parts: int) -> int:
    """The least memory each node needs to hold the model in at most ``parts`` contiguous
    stages (``memory[i, j]``: a stage of layers ``[i, j)``)."""
    count = memory.shape[0] - 1
    best = memory[0].astype(float).copy()  # best[j]: layers [0, j) in the stages so far
    best[0] = np.inf
    for _ in range(parts - 1):
        best = np.array([min([best[j]] + [max(best[i], memory[i, j]) for i in range(1, j)])
                         for j in range(count + 1)])
    return int(best[count])


def make_plan(sample: harness.Sample, cluster: ClusterSpec, variant: Variant) -> Plan:
    """``variant``'s plan, made as ``coordinator plan`` makes it (``auto`` also offers the
    weight formats the CLI offers)."""
    cluster = with_default_quantize(cluster, variant.weights)
    offered = OFFERED_WEIGHTS if variant.compress is CompressMode.AUTO else ()
    quantized = {
        fmt: cached_profile(sample.model, sample.layer_graph, threads=1, repeats=20,
                            weights=fmt)[0]
        for fmt in {*offered, variant.weights} - {WeightFormat.NONE}
    }
    profiles = node_profiles(cluster, sample.profile, {}, quantized)
    request = None  # every compressed plan's accuracy is measured, weights-only ones too
    if variant.compress is not CompressMode.NONE or variant.weights is not WeightFormat.NONE:
        offer = weight_offer(sample.layer_graph, {
            fmt: layer_seconds(cluster, node_profiles(every_node_quantized(cluster, fmt),
                                                      sample.profile, {}, quantized))
            for fmt in offered}) if offered else None
        inputs = calibration_inputs(sample.model, CALIBRATION_INPUTS)
        request = CompressionRequest(variant.compress, tuple(inputs), variant.max_error,
                                     weights=offer)
    return plan(sample.model, sample.layer_graph, cluster, profiles, Objective.THROUGHPUT,
                request)


def run_fresh(cluster: ClusterSpec, made: Plan, layer_graph: LayerGraph,
              requests: int) -> tuple[float, float, int]:
    """``made`` measured on fresh workers: throughput, p50 latency and the largest worker's
    resident bytes afterwards."""
    state = Path(tempfile.mkdtemp(prefix="edgesplit-bench-"))
    with LocalCluster(cluster, state) as local:
        asyncio.run(deploy(made, split(made, layer_graph), emulate_links=True))
        result = asyncio.run(measure(made, random_inputs(made.inputs), requests=requests,
                                     concurrency=8))
        rss = max(psutil.Process(node.pid).memory_info().rss for node in local.nodes)
    return result.throughput_per_s, result.latency_p50_s, rss


def measure_case(model: str, cluster_name: str, cluster: ClusterSpec, sample: harness.Sample,
                 requests: int) -> list[dict]:
    rows = []
    for variant in VARIANTS:
        row: dict = {"model": model, "cluster": cluster_name, "variant": variant.name}
        spec = harness.with_free_ports(cluster)
        try:
            made = make_plan(sample, spec, variant)
        except EdgesplitError as err:
            rows.append({**row, "error": str(err)})
            print(f"{model} {cluster_name} {variant.name}: {err}")
            continue
        throughput, latency, rss = run_fresh(spec, made, sample.layer_graph, requests)
        accuracy = made.accuracy
        row.update(
            stages=" ".join(f"{s.node}[{s.start},{s.end})" for s in made.stages),
            encodings=" ".join(link.encoding.value for link in made.links),
            predicted_throughput=made.throughput_per_s, measured_throughput=throughput,
            predicted_latency_ms=made.latency_p50_s * 1e3, measured_latency_p50_ms=latency * 1e3,
            artifact_bytes=sum(s.artifact_bytes or 0 for s in made.stages), worker_rss=rss,
            max_rel_error=accuracy.max_rel_error if accuracy else 0.0,
            agreement=(accuracy.top1_agreement if accuracy and accuracy.top1_agreement
                       is not None else accuracy.next_token_agreement if accuracy else 1.0),
        )
        rows.append(row)
        print(line(row))
    return rows


HEADER = (f"{'model':7} {'cluster':14} {'variant':13} {'req/s':>7} {'pred':>7} {'p50 ms':>8} "
          f"{'artifacts':>10} {'worker RSS':>10} {'max rel err':>11} {'agree':>6} "
          f"{'vs none':>7}  links")


def line(row: dict, rows: list[dict] | None = None) -> str:
    head = f"{row['model']:7} {row['cluster']:14} {row['variant']:13}"
    if "error" in row:
        return f"{head} {'no plan fits' if 'fit' in row['error'] else row['error']}"
    base = next((r for r in rows or [] if r["model"] == row["model"] and
                 r["cluster"] == row["cluster"] and r["variant"] == "none"
                 and "error" not in r), None)
    versus = (f"{row['measured_throughput'] / base['measured_throughput']:6.2f}x" if base
              else "      -")
    agreement = "-" if row["agreement"] is None else f"{row['agreement']:.0%}"
    return (f"{head} {row['measured_throughput']:7.1f} {row['predicted_throughput']:7.1f} "
            f"{row['measured_latency_p50_ms']:8.1f} {format_bytes(row['artifact_bytes']):>10} "
            f"{format_bytes(row['worker_rss']):>10} {row['max_rel_error']:11.1e} "
            f"{agreement:>6} {versus}  {row['encodings']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per plan")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgesplit-models-"))
    homogeneous = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    rows: list[dict] = []
    with report.usual_output(args.markdown):
        print(f"machine: {harness.machine()}")
        for name in args.models:
            builder, kwargs = MODELS[name]
            sample = harness.prepare(getattr(samples, builder)(**kwargs), folder, name)
            for cluster_name, cluster in (
                ("slow-links", slow_links(homogeneous)),
                ("heterogeneous", load_cluster(EXAMPLES / "cluster-heterogeneous.yaml")),
                ("memory-tight", memory_tight(homogeneous, sample.layer_graph)),
            ):
                rows += measure_case(name, cluster_name, cluster, sample, args.requests)
        table = [HEADER] + [line(row, rows) for row in rows]
        print("\n".join(table))
    if args.markdown:
        print(report.markdown(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

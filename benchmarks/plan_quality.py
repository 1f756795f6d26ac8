"""Plan quality: our plan against every baseline, measured on simulated edge clusters.

For each cluster and model: profile here, plan for throughput, then start the cluster as
real ``edge-node`` processes (speeds and links emulated) and measure our plan and each
baseline that fits, one after another, with the same requests.

    .venv/bin/python benchmarks/plan_quality.py [--requests 60] [--models resnet gpt2 vit]
        [--json out/plan_quality.json] [--markdown]

Clusters: ``examples/cluster-homogeneous.yaml``, ``examples/cluster-heterogeneous.yaml``, and
a memory-tight one derived per model from the homogeneous cluster: each node holds the largest
layer plus 30-55% of the rest of what the whole model needs (so it fits no single node).

``--markdown`` prints README's tables: the heterogeneous cluster with each plan's stages, the
other two clusters without, and the latency floor (the whole model in one process). Latency
is measured alone (p50 ms) and with 8 requests in flight (p50@8, each answer sending the next
request), each beside its prediction (``Plan.latency_under_load``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import harness
import peer_pipelining
import report

from coordinator import samples
from coordinator.bench import BENCH_CONCURRENCY
from partition.cluster import ClusterSpec, load_cluster
from partition.cost_builder import node_profiles, stage_memory_matrix
from partition.errors import NoFeasiblePlanError
from partition.layers import LayerGraph
from partition.plan import Objective
from partition.planning import baseline_plan, plan

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

MODELS = {  # sample builder name and arguments
    "resnet": ("resnet", {"image": 224, "batch": 4}),
    "gpt2": ("gpt2", {"layers": 8, "width": 384, "seq": 128}),
    "vit": ("vit", {"layers": 8, "width": 384, "image": 128}),
}
TIGHT_SHARES = (0.35, 0.55, 0.3, 0.45)
"""Memory of each node of the memory-tight cluster: its largest layer's need plus this share
of the rest of what the whole model needs (so no node holds the whole model)."""
MEASURED = (f"{'req/s meas':>10} {'pred':>7} {'err':>7} {'p50 ms':>8} {'pred':>8} {'err':>7} "
            f"{f'p50@{BENCH_CONCURRENCY}':>8} {'pred':>8} {'err':>7} {'ours/it':>8} "
            f"{'host CPU':>8}")
"""The header of the measured columns, which every table shares: throughput, latency alone,
latency with :data:`BENCH_CONCURRENCY` requests in flight, and how busy the host's CPU was."""


def memory_tight(base: ClusterSpec, layer_graph: LayerGraph) -> ClusterSpec:
    memory = stage_memory_matrix(layer_graph)
    count = layer_graph.num_layers
    whole = int(memory[0, count])
    largest = max(int(memory[i, i + 1]) for i in range(count))
    nodes = tuple(
        replace(node, memory_bytes=largest + int(share * (whole - largest)))
        for node, share in zip(base.nodes, TIGHT_SHARES, strict=True)
    )
    return replace(base, nodes=nodes)


def measure_case(model: str, cluster_name: str, cluster: ClusterSpec, sample: harness.Sample,
                 requests: int) -> list[dict]:
    cluster = harness.with_free_ports(cluster)
    try:
        ours = plan(sample.model, sample.layer_graph, cluster,
                    node_profiles(cluster, sample.profile, {}), Objective.THROUGHPUT)
    except NoFeasiblePlanError as err:
        return [{"model": model, "cluster": cluster_name, "strategy": "edgesplit",
                 "stages": str(err)}]
    plans = [("edgesplit", ours)]
    plans += [(b.name, baseline_plan(ours, b, sample.layer_graph))
              for b in ours.baselines if b.fits and b.stages]
    skipped = [b.name for b in ours.baselines if not b.fits or not b.stages]
    results = harness.run_plans(
        cluster, [p for _, p in plans], sample.layer_graph,
        emulate=True, requests=requests, concurrency=BENCH_CONCURRENCY,
    )
    rows = []
    for (name, p), result in zip(plans, results, strict=True):
        rows.append({
            "model": model, "cluster": cluster_name, "strategy": name,
            "stages": " ".join(f"{s.node}[{s.start},{s.end})" for s in p.stages),
            "predicted_throughput": p.throughput_per_s,
            "measured_throughput": result.throughput_per_s,
            "predicted_latency_ms": p.latency_s * 1e3,
            "measured_latency_p50_ms": result.latency_p50_s * 1e3,
            "predicted_loaded_latency_ms": p.latency_under_load(BENCH_CONCURRENCY) * 1e3,
            "measured_loaded_latency_p50_ms": result.loaded_latency_p50_s * 1e3,
            "host_cpu_busy": result.host_cpu,
        })
    rows += [{"model": model, "cluster": cluster_name, "strategy": name,
              "stages": "does not fit memory"} for name in skipped]
    return rows


def measured(row: dict, rows: list[dict]) -> str:
    """``row``'s measured columns (under :data:`MEASURED`); "ours/it" is our plan's measured
    throughput, from ``rows``, over this one's."""
    ours = next(r for r in rows if r["model"] == row["model"] and r["cluster"] == row["cluster"]
                and r["strategy"] == "edgesplit")
    t, pt = row["measured_throughput"], row["predicted_throughput"]
    lat, plat = row["measured_latency_p50_ms"], row["predicted_latency_ms"]
    load, pload = row["measured_loaded_latency_p50_ms"], row["predicted_loaded_latency_ms"]
    return (f"{t:10.1f} {pt:7.1f} {(t - pt) / pt:+7.0%} {lat:8.1f} {plat:8.1f} "
            f"{(lat - plat) / plat:+7.0%} {load:8.1f} {pload:8.1f} {(load - pload) / pload:+7.0%} "
            f"{ours['measured_throughput'] / t:7.2f}x {row['host_cpu_busy']:8.0%}")


def print_table(model: str, rows: list[dict]) -> None:
    """The usual output: one model's rows on every cluster, with stages and what did not fit."""
    print(f"\n## {model}")
    print(f"{'cluster':14} {'strategy':16} {MEASURED}  stages")
    for row in rows:
        if "measured_throughput" not in row:
            print(f"{row['cluster']:14} {row['strategy']:16} {'-':>10}  {row['stages']}")
            continue
        print(f"{row['cluster']:14} {row['strategy']:16} {measured(row, rows)}  {row['stages']}")


def markdown_tables(rows: list[dict], floors: list[dict]) -> list[list[str]]:
    """README's tables: the heterogeneous cluster with stages, the other clusters without
    (measured plans only), and each model's latency floor in one process."""
    done = [row for row in rows if "measured_throughput" in row]
    heterogeneous = [f"{'model':7} {'strategy':16} {MEASURED}  stages"]
    heterogeneous += [f"{r['model']:7} {r['strategy']:16} {measured(r, done)}  {r['stages']}"
                      for r in done if r["cluster"] == "heterogeneous"]
    others = [f"{'model':7} {'cluster':14} {'strategy':16} {MEASURED}"]
    others += [f"{r['model']:7} {r['cluster']:14} {r['strategy']:16} {measured(r, done)}"
               for r in done if r["cluster"] != "heterogeneous"]
    floor = [f"{'model':7} {'runner':24} {'ms a request':>12}"]
    floor += [f"{f['model']:7} {f['strategy']:24} {1e3 / f['throughput_per_s']:12.1f}"
              for f in floors if f["ok"]]
    return [heterogeneous, others, floor]


def measure_model(name: str, folder: Path, requests: int, threads: int) -> list[dict]:
    """Every plan of model ``name`` measured on the three clusters, then the whole model in one
    process (the last row); prints the model's table."""
    builder, kwargs = MODELS[name]
    sample = harness.prepare(getattr(samples, builder)(**kwargs), folder, name)
    homogeneous = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    rows = []
    for cluster_name, cluster in (
        ("homogeneous", homogeneous),
        ("heterogeneous", load_cluster(EXAMPLES / "cluster-heterogeneous.yaml")),
        ("memory-tight", memory_tight(homogeneous, sample.layer_graph)),
    ):
        rows += measure_case(name, cluster_name, cluster, sample, requests)
    print_table(name, rows)
    single = peer_pipelining.measure_single_process(builder, kwargs, threads=threads,
                                                    requests=requests)
    if single["ok"]:
        print(f"one process, {threads} threads (no emulation, the latency floor): "
              f"{1e3 / single['throughput_per_s']:.1f} ms a request")
    return [*rows, {"model": name, "strategy": f"one process, {threads} threads", **single}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per plan")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgesplit-models-"))
    threads = min(4, os.cpu_count() or 1)  # the clusters' four one-thread workers, capped
    every = []
    with report.usual_output(args.markdown):
        print(f"machine: {harness.machine()}")
        for name in args.models:
            every += measure_model(name, folder, args.requests, threads)
    if args.markdown:
        plans = [row for row in every if "cluster" in row]
        floors = [row for row in every if "cluster" not in row]
        print(report.markdown(*markdown_tables(plans, floors)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()

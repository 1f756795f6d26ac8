"""Plan quality: our plan against every baseline, measured on simulated edge clusters.

For each cluster and model: profile here, plan for throughput, then start the cluster as
real ``edge-node`` processes (speeds and links emulated) and measure our plan and each
baseline that fits, one after another, with the same requests.

    .venv/bin/python benchmarks/plan_quality.py [--requests 60] [--json out/plan_quality.json]

Clusters: ``examples/cluster-homogeneous.yaml``, ``examples/cluster-heterogeneous.yaml``, and
a memory-tight one derived per model from the homogeneous cluster: each node holds the largest
layer plus 30-55% of the rest of what the whole model needs (so it fits no single node).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import harness  # noqa: E402
import peer_pipelining  # noqa: E402

from coordinator import samples  # noqa: E402
from partition.cluster import ClusterSpec, load_cluster  # noqa: E402
from partition.cost_builder import node_profiles, stage_memory_matrix  # noqa: E402
from partition.errors import NoFeasiblePlanError  # noqa: E402
from partition.layers import LayerGraph  # noqa: E402
from partition.optimizer import Objective  # noqa: E402
from partition.plan import baseline_plan, plan  # noqa: E402

MODELS = {  # sample builder name and arguments
    "resnet": ("resnet", {"image": 224, "batch": 4}),
    "gpt2": ("gpt2", {"layers": 8, "width": 384, "seq": 128}),
    "vit": ("vit", {"layers": 8, "width": 384, "image": 128}),
}
TIGHT_SHARES = (0.35, 0.55, 0.3, 0.45)
"""Memory of each node of the memory-tight cluster: its largest layer's need plus this share
of the rest of what the whole model needs (so no node holds the whole model)."""


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


def measure_case(cluster_name: str, cluster: ClusterSpec, sample: harness.Sample,
                 requests: int) -> list[dict]:
    cluster = harness.with_free_ports(cluster)
    try:
        ours = plan(sample.model, sample.layer_graph, cluster,
                    node_profiles(cluster, sample.profile, {}), Objective.THROUGHPUT)
    except NoFeasiblePlanError as err:
        return [{"cluster": cluster_name, "strategy": "edgesplit", "stages": str(err)}]
    plans = [("edgesplit", ours)]
    plans += [(b.name, baseline_plan(ours, b, sample.layer_graph))
              for b in ours.baselines if b.fits and b.stages]
    skipped = [b.name for b in ours.baselines if not b.fits or not b.stages]
    results = harness.run_plans(
        cluster, [p for _, p in plans], sample.layer_graph,
        emulate=True, requests=requests, concurrency=8,
    )
    rows = []
    for (name, p), result in zip(plans, results, strict=True):
        rows.append({
            "cluster": cluster_name, "strategy": name,
            "stages": " ".join(f"{s.node}[{s.start},{s.end})" for s in p.stages),
            "predicted_throughput": p.throughput_per_s,
            "measured_throughput": result.throughput_per_s,
            "predicted_latency_ms": p.latency_s * 1e3,
            "measured_latency_p50_ms": result.latency_p50_s * 1e3,
        })
    rows += [{"cluster": cluster_name, "strategy": name, "stages": "does not fit memory"}
             for name in skipped]
    return rows


def print_table(model: str, rows: list[dict]) -> None:
    print(f"\n## {model}")
    print(f"{'cluster':14} {'strategy':16} {'req/s meas':>10} {'pred':>7} {'err':>7} "
          f"{'p50 ms':>8} {'pred':>8} {'err':>7} {'ours/it':>8}  stages")
    best = {}
    for row in rows:
        if "measured_throughput" in row and row["strategy"] == "edgesplit":
            best[row["cluster"]] = row["measured_throughput"]
    for row in rows:
        if "measured_throughput" not in row:
            print(f"{row['cluster']:14} {row['strategy']:16} {'-':>10}  {row['stages']}")
            continue
        t, pt = row["measured_throughput"], row["predicted_throughput"]
        lat, plat = row["measured_latency_p50_ms"], row["predicted_latency_ms"]
        print(f"{row['cluster']:14} {row['strategy']:16} {t:10.1f} {pt:7.1f} "
              f"{(t - pt) / pt:+7.0%} {lat:8.1f} {plat:8.1f} {(lat - plat) / plat:+7.0%} "
              f"{best[row['cluster']] / t:7.2f}x  {row['stages']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per plan")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, help="also write every row as JSON")
    args = parser.parse_args()
    homogeneous = load_cluster(ROOT / "examples" / "cluster-homogeneous.yaml")
    heterogeneous = load_cluster(ROOT / "examples" / "cluster-heterogeneous.yaml")
    folder = Path(tempfile.mkdtemp(prefix="edgesplit-models-"))
    print(f"machine: {harness.machine()}")
    every = []
    threads = min(4, os.cpu_count() or 1)  # the clusters' four one-thread workers, capped
    for name in args.models:
        builder, kwargs = MODELS[name]
        sample = harness.prepare(getattr(samples, builder)(**kwargs), folder, name)
        rows = []
        for cluster_name, cluster in (
            ("homogeneous", homogeneous),
            ("heterogeneous", heterogeneous),
            ("memory-tight", memory_tight(homogeneous, sample.layer_graph)),
        ):
            rows += measure_case(cluster_name, cluster, sample, args.requests)
        print_table(name, rows)
        single = peer_pipelining.measure_single_process(builder, kwargs, threads=threads,
                                                        requests=args.requests)
        if single["ok"]:
            print(f"one process, {threads} threads (no emulation, the latency floor): "
                  f"{1e3 / single['throughput_per_s']:.1f} ms a request")
        every += [{"model": name, **row} for row in rows]
        every.append({"model": name, "strategy": f"one process, {threads} threads", **single})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()

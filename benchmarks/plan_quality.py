"""Plan quality: our plan against every baseline, measured on simulated edge clusters.

For each cluster and model: profile here, plan for throughput, then start the cluster as
real ``edge-node`` processes (speeds and links emulated) and measure our plan and each
baseline that fits, one after another, with the same requests.

    .venv/bin/python benchmarks/plan_quality.py [--requests 60] [--models resnet gpt2 vit]
        [--json out/plan_quality.json] [--markdown] [--isolation kernel]

``--isolation kernel`` runs each worker under a CPU quota instead of sleeping (see README).
Each cluster is fitted to the host: every speed stretched by one factor until the neediest
plan needs at most 70% of the cores at its predicted rate, and planned with, so predictions
match. The CPU a request needs is counted from the profile and the frames, then measured: if
a case's measured run would need more than 80% of the cores at a plan's predicted rate, the
case is fitted again with what that plan's requests took and measured again, and the
model's later cases start from that factor. A node's emulated speed stretches its own
timing of its stage, taken as it loads: a plan whose nodes timed a stage more than 10% off
the profile (a burst of other work on the host meanwhile) is deployed again, once, and says
so (``harness.run_plans``); each JSON row carries its stages' times as profiled and as
timed, and the first timing if there were two. ``--predict-only`` plans and prints the
predictions of the first fit without starting any cluster.

Our plan may run a stage on several nodes (replicated stages); when it does, the plan made
with ``--no-replicate`` is measured beside it as "edgesplit 1/stage".

Clusters: ``examples/cluster-homogeneous.yaml``, ``examples/cluster-heterogeneous.yaml``, and
a memory-tight one derived per model from the homogeneous cluster: each node holds the largest
layer plus 30-55% of the rest of what the whole model needs (so it fits no single node).

``--markdown`` prints README's tables: the heterogeneous cluster with each plan's stages, the
other two clusters without, and the latency floor (the whole model in one process). Latency
is measured alone (p50 ms) and with 8 requests in flight (p50@8, each answer sending the next
request), each beside its prediction: the median over the paths a request may take, one
replica a stage (``Plan.latency_p50_s``, ``Plan.latency_under_load``); the JSON also carries
the mean (``predicted_mean_latency_ms``), which the planner minimizes.
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
from coordinator.host_cpu import BOUND_SHARE
from coordinator.isolation import Isolation
from partition.cluster import ClusterSpec, load_cluster
from partition.cost_builder import node_profiles, stage_memory_matrix
from partition.errors import NoFeasiblePlanError
from partition.layers import LayerGraph
from partition.plan import Objective, Plan
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


def stages_text(p: Plan) -> str:
    """A plan's stages, a replicated one's nodes joined by ``+``: ``jetson+laptop[0,12)``."""
    return " ".join(f"{'+'.join(s.nodes)}[{s.start},{s.end})" for s in p.stages)


def case_plans(model: str, cluster_name: str, cluster: ClusterSpec,
               sample: harness.Sample) -> tuple[list[tuple[str, Plan]], list[dict]]:
    """Our plan (and, if it replicates a stage, the one without replicas) and every baseline
    that fits, by strategy name; and a row for each plan that cannot run."""
    try:
        profiles = node_profiles(cluster, sample.profile, {})
        ours = plan(sample.model, sample.layer_graph, cluster, profiles, Objective.THROUGHPUT)
    except NoFeasiblePlanError as err:
        return [], [{"model": model, "cluster": cluster_name, "strategy": "edgesplit",
                     "stages": str(err)}]
    plans = [("edgesplit", ours)]
    if any(s.replicated for s in ours.stages):
        plans.append(("edgesplit 1/stage", plan(sample.model, sample.layer_graph, cluster,
                                                profiles, Objective.THROUGHPUT, replicate=False)))
    plans += [(b.name, baseline_plan(ours, b, sample.layer_graph))
              for b in ours.baselines if b.fits and b.stages]
    skipped = [{"model": model, "cluster": cluster_name, "strategy": b.name,
                "stages": "does not fit memory"}
               for b in ours.baselines if not b.fits or not b.stages]
    return plans, skipped


def fit_case(model: str, cluster_name: str, cluster: ClusterSpec, sample: harness.Sample,
             isolation: Isolation, cpu_factor: float = 1.0) -> ClusterSpec:
    """``cluster`` on free ports, fitted to this host for every plan of the case (counting
    ``cpu_factor`` times the CPU :func:`harness.counted_cpu` counts)."""
    return harness.fitted(
        harness.with_free_ports(cluster), isolation, sample,
        lambda c: [p for _, p in case_plans(model, cluster_name, c, sample)[0]], cpu_factor)


def predict_case(model: str, cluster_name: str, cluster: ClusterSpec,
                 sample: harness.Sample, isolation: Isolation) -> None:
    """Print each plan's predicted throughput and ours over it, on ``cluster`` fitted to
    this host as :func:`measure_case` would run it, without running anything."""
    cluster = fit_case(model, cluster_name, cluster, sample, isolation)
    plans, skipped = case_plans(model, cluster_name, cluster, sample)
    ours = plans[0][1].throughput_per_s if plans else 0.0
    for name, p in plans:
        print(f"{model:7} {cluster_name:14} {name:18} {p.throughput_per_s:9.1f} "
              f"{ours / p.throughput_per_s:7.2f}x  {stages_text(p)}")
    for row in skipped:
        print(f"{model:7} {cluster_name:14} {row['strategy']:18} {'-':>9} {'-':>8}  "
              f"{row['stages']}")


def measure_case(model: str, cluster_name: str, cluster: ClusterSpec, sample: harness.Sample,
                 requests: int, isolation: Isolation, cpu_factor: float) -> list[dict]:
    """Every plan of the case measured on ``cluster`` fitted to this host, counting
    ``cpu_factor`` times the CPU :func:`harness.counted_cpu` counts. If a plan's measured CPU
    per request would make the host CPU-bound at its predicted rate, the case is fitted again
    with that plan's measured factor and measured again (once). Each row records the factor
    it was fitted with, and each stage's real time as the profile counts it and as its nodes
    timed it (their emulated speeds stretch the latter: a gap shows the host's speed moved
    since the profile)."""
    for attempt in range(2):
        fit = fit_case(model, cluster_name, cluster, sample, isolation, cpu_factor)
        plans, skipped = case_plans(model, cluster_name, fit, sample)
        if not plans:
            return skipped
        ran = harness.run_plans(
            fit, [p for _, p in plans], sample.layer_graph,
            emulate=True, requests=requests, concurrency=BENCH_CONCURRENCY, isolation=isolation,
            profile=sample.profile,
        )
        need, p, r = max(((harness.measured_need(p, done.result), p, done.result)
                          for (_, p), done in zip(plans, ran, strict=True)),
                         key=lambda needed: needed[0].cores)
        if attempt or need.cores <= BOUND_SHARE * need.host_cores:
            break
        cpu_factor = harness.measured_cpu(r) / harness.counted_cpu(p, sample)
        print(f"{model} on {cluster_name}: as measured, {need.describe()}, above "
              f"{BOUND_SHARE:.0%}; its requests took {cpu_factor:.2f}x the CPU counted, so "
              "the case is fitted with that and measured again")
    rows = []
    for (name, p), done in zip(plans, ran, strict=True):
        result = done.result
        rows.append({
            "model": model, "cluster": cluster_name, "strategy": name,
            "stages": stages_text(p),
            "predicted_throughput": p.throughput_per_s,
            "measured_throughput": result.throughput_per_s,
            "predicted_latency_ms": p.latency_p50_s * 1e3,
            "predicted_mean_latency_ms": p.latency_s * 1e3,
            "measured_latency_p50_ms": result.latency_p50_s * 1e3,
            "predicted_loaded_latency_ms": p.latency_under_load(BENCH_CONCURRENCY) * 1e3,
            "measured_loaded_latency_p50_ms": result.loaded_latency_p50_s * 1e3,
            "host_cpu_busy": result.host_cpu,
            "host_cpu_ms_per_request": harness.measured_cpu(result) * 1e3,
            "counted_cpu_ms_per_request": harness.counted_cpu(p, sample) * 1e3,
            "cpu_factor": cpu_factor,
            "stage_ms_profiled": [s * 1e3 for s in harness.stage_seconds(p, sample.profile)],
            "stage_ms_calibrated": [s * 1e3 for s in done.calibrated_s],
            **({"stage_ms_first_calibrated": [s * 1e3 for s in done.first_calibrated_s]}
               if done.first_calibrated_s else {}),
        })
    return rows + skipped


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


def clusters(sample: harness.Sample) -> list[tuple[str, ClusterSpec]]:
    """The three clusters by name, the memory-tight one fitted to ``sample``."""
    homogeneous = load_cluster(EXAMPLES / "cluster-homogeneous.yaml")
    return [("homogeneous", homogeneous),
            ("heterogeneous", load_cluster(EXAMPLES / "cluster-heterogeneous.yaml")),
            ("memory-tight", memory_tight(homogeneous, sample.layer_graph))]


def predict_model(name: str, folder: Path, isolation: Isolation) -> None:
    """Print the predictions of every plan of model ``name`` on the three clusters."""
    builder, kwargs = MODELS[name]
    sample = harness.prepare(getattr(samples, builder)(**kwargs), folder, name)
    for cluster_name, cluster in clusters(sample):
        predict_case(name, cluster_name, cluster, sample, isolation)


def measure_model(name: str, folder: Path, requests: int, threads: int,
                  isolation: Isolation) -> list[dict]:
    """Every plan of model ``name`` measured on the three clusters, then the whole model in one
    process (the last row); prints the model's table."""
    builder, kwargs = MODELS[name]
    sample = harness.prepare(getattr(samples, builder)(**kwargs), folder, name)
    rows: list[dict] = []
    for cluster_name, cluster in clusters(sample):  # a factor learned on one case fits the next
        factor = max((row.get("cpu_factor", 1.0) for row in rows), default=1.0)
        rows += measure_case(name, cluster_name, cluster, sample, requests, isolation, factor)
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
    parser.add_argument("--isolation", type=Isolation, choices=list(Isolation),
                        default=Isolation.NONE, help="how workers emulate speed (default none)")
    parser.add_argument("--predict-only", action="store_true",
                        help="print the plans' predictions; start no cluster")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="edgesplit-models-"))
    if args.predict_only:
        print(f"{'model':7} {'cluster':14} {'strategy':18} {'pred req/s':>9} {'ours/it':>8}  "
              "stages")
        for name in args.models:
            predict_model(name, folder, args.isolation)
        return
    threads = min(4, os.cpu_count() or 1)  # the clusters' four one-thread workers, capped
    every = []
    with report.usual_output(args.markdown):
        print(f"machine: {harness.machine()}")
        for name in args.models:
            every += measure_model(name, folder, args.requests, threads, args.isolation)
    if args.markdown:
        plans = [row for row in every if "cluster" in row]
        floors = [row for row in every if "cluster" not in row]
        print(report.markdown(*markdown_tables(plans, floors)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(every, indent=1))


if __name__ == "__main__":
    main()

"""How long the planner takes as models and clusters grow, and how close it gets when not exact.

Usage: python benchmarks/planner_scale.py [--layers 25 50 100 200] [--nodes 2 4 ...]
       [--seed 0] [--time-limit 30] [--gap 0.001] [--no-replicate] [--json results.json]
       [--markdown]

Each cell is one seeded random instance: heterogeneous nodes (speeds 0.1-1.0, memory
between a quarter of the model and all of it), random links (10 Mbps - 1 Gbps,
0-5 ms) and layer sizes. "search" is "exact" for the exhaustive search, "solver" past its
limit (HiGHS, within --time-limit seconds and --gap); "optimal" says whether the answer is
proven optimal, "gap" how far at most it is above the optimum (the proven lower bound).
Throughput plans may replicate stages (the exact search only) unless ``--no-replicate``;
"groups" is the largest replica group the budget allowed (1: none), "repl" the replicas of the
plan's most replicated stage.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import report

from partition.costs import CostModel
from partition.milp import SolverLimits
from partition.optimizer import EXACT_WORK_LIMIT, optimize
from partition.plan import Objective
from partition.replication import replica_groups

LAYERS = (25, 50, 100, 200)
NODES = (2, 4, 6, 8, 10, 12, 16, 32)
HEADER = (f"{'layers':>6} {'nodes':>5} {'objective':>10} {'search':>6} {'optimal':>7} "
          f"{'time':>9} {'gap':>7} {'groups':>6} {'repl':>4}")


def random_instance(layers: int, nodes: int, seed: int) -> CostModel:
    """A heterogeneous cluster; each node holds 24-100% of the model."""
    rng = np.random.default_rng([seed, layers, nodes])
    speed = rng.uniform(0.1, 1.0, nodes)
    seconds = rng.uniform(1e-4, 5e-3, layers)[None] / speed[:, None]
    seconds *= rng.uniform(0.8, 1.25, seconds.shape)
    boundary = rng.uniform(1e4, 4e6, layers + 1)
    params = rng.uniform(1e5, 1e7, layers)
    prefix = np.concatenate([[0.0], np.cumsum(params)])
    memory = np.triu(prefix[None, :] - prefix[:, None], k=1)
    memory += np.triu(boundary[:, None] + boundary[None, :], k=1)
    node_memory = rng.uniform(0.6, 1.0, nodes) * prefix[-1] * max(0.4, 2.5 / nodes)
    bandwidth = rng.choice([1.25e6, 1.25e7, 1.25e8], (nodes, nodes))
    bandwidth = np.minimum(bandwidth, bandwidth.T)
    latency = rng.uniform(0.0, 5e-3, (nodes, nodes))
    np.fill_diagonal(bandwidth, np.inf)
    np.fill_diagonal(latency, 0.0)
    return CostModel(
        node_names=tuple(f"node-{d}" for d in range(nodes)),
        layer_seconds=seconds,
        boundary_bytes=boundary,
        stage_memory_bytes=memory,
        node_memory_bytes=node_memory.astype(np.int64),
        link_bytes_per_s=bandwidth,
        link_latency_s=latency,
        source=0,
        sink=0,
        layer_param_bytes=params,
    )


def measure(layers: int, nodes: int, seed: int, limits: SolverLimits,
            replicate: bool = True) -> list[dict[str, object]]:
    cost = random_instance(layers, nodes, seed)
    rows = []
    for objective in Objective:
        wanted = replicate and objective is Objective.THROUGHPUT
        groups = replica_groups(cost, EXACT_WORK_LIMIT) if wanted else []
        began = time.perf_counter()
        result = optimize(cost, objective, limits, replicate)
        elapsed = time.perf_counter() - began
        answer = objective.key(result.schedule)[0]
        rows.append({
            "layers": layers, "nodes": nodes, "objective": objective.value,
            "search": "solver" if result.solver else "exact", "seconds": elapsed,
            "exact": result.exact, "stages": len(result.schedule.spans),
            "answer_s": answer, "lower_bound_s": result.lower_bound_s,
            "gap": answer / result.lower_bound_s - 1 if result.lower_bound_s > 0 else None,
            "largest_group": 1 if result.solver else max(map(len, groups), default=1),
            "replicas": max(len(s.replicas) for s in result.schedule.spans),
        })
    return rows


def row_line(row: dict[str, object]) -> str:
    """One objective's row of the table under :data:`HEADER`."""
    gap = "-" if row["gap"] is None else f"{row['gap']:.2%}"
    return (f"{row['layers']:>6} {row['nodes']:>5} {row['objective']:>10} {row['search']:>6} "
            f"{'yes' if row['exact'] else 'no':>7} {row['seconds']:>8.2f}s {gap:>7} "
            f"{row['largest_group']:>6} {row['replicas']:>4}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    parser.add_argument("--nodes", type=int, nargs="+", default=NODES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=SolverLimits.time_limit_s,
                        help="seconds the solver may take per objective past the exact limit")
    parser.add_argument("--gap", type=float, default=SolverLimits.relative_gap,
                        help="the solver stops once its answer is proven within this of optimal")
    parser.add_argument("--no-replicate", dest="replicate", action="store_false",
                        help="never run a stage on several nodes")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    limits = SolverLimits(args.time_limit, args.gap)

    rows = []
    lines = [HEADER]
    with report.usual_output(args.markdown):
        print(HEADER)
        print("-" * len(HEADER))
        for layers in args.layers:
            for nodes in args.nodes:
                for row in measure(layers, nodes, args.seed, limits, args.replicate):
                    rows.append(row)
                    lines.append(row_line(row))
                    print(lines[-1], flush=True)
    if args.markdown:
        print(report.markdown(lines))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": platform.platform(), "processor": platform.processor(),
                       "seed": args.seed, "time_limit_s": args.time_limit, "gap": args.gap,
                       "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()

"""A balanced two-stage GPT-2 on two local workers: edgesplit, torch's pipelining, one process.

GPT-2 (8 layers, width 512, batch 8 x 128 tokens) is planned for throughput over two
unemulated local nodes (one thread each) at top-level-module granularity, so its split point
is a module name. The same split and process count run under ``torch.distributed.pipelining``
(gloo), and the whole model runs in one process with 1 and with 2 threads.

    .venv/bin/python benchmarks/pipeline_throughput.py [--requests 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import harness  # noqa: E402
import peer_pipelining  # noqa: E402
from ports import free_ports  # noqa: E402

from coordinator import samples  # noqa: E402
from partition.cluster import parse_cluster  # noqa: E402
from partition.cost_builder import node_profiles  # noqa: E402
from partition.optimizer import Objective  # noqa: E402
from partition.plan import plan  # noqa: E402

GPT2 = {"layers": 8, "width": 512, "batch": 8, "seq": 128}


def two_local_nodes() -> dict:
    ports = free_ports(2)
    return {
        "nodes": [{"name": f"worker-{k}", "address": f"127.0.0.1:{port}", "memory": "4GiB",
                   "threads": 1} for k, port in enumerate(ports)],
        "links": {"default": {"bandwidth": "10Gbps", "latency": "0.1ms"}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    print(f"machine: {harness.machine()}")
    sample = harness.prepare(samples.gpt2(**GPT2), Path(tempfile.mkdtemp()), "gpt2", "1")
    cluster = parse_cluster(two_local_nodes(), "two local workers")
    ours = plan(sample.model, sample.layer_graph, cluster,
                node_profiles(cluster, sample.profile, {}), Objective.THROUGHPUT)
    split_at = [stage.first_layer for stage in ours.stages[1:]]
    (measured,) = harness.run_plans(cluster, [ours], sample.layer_graph, emulate=False,
                                    requests=args.requests, concurrency=4)
    rows = [{"runner": "edgesplit, 2 workers", "split": split_at,
             "throughput_per_s": measured.throughput_per_s, "matches": "checked in tests"}]
    peer = peer_pipelining.measure_peer("gpt2", GPT2, split_at, requests=args.requests,
                                        microbatches=1)
    rows.append({"runner": "torch pipelining (gloo), 2 ranks", "split": split_at, **peer})
    for threads in (1, 2):
        single = peer_pipelining.measure_single_process("gpt2", GPT2, threads=threads,
                                                        requests=args.requests)
        rows.append({"runner": f"one process, {threads} thread(s)", "split": [], **single})
    reference = rows[-1].get("throughput_per_s")
    print(f"\n{'runner':34} {'split':10} {'req/s':>7} {'vs 1 process, 2 threads':>24}")
    for row in rows:
        rate = row.get("throughput_per_s")
        shown = f"{rate:7.2f}" if rate else f"failed: {row.get('error')}"
        ratio = f"{rate / reference:24.2f}" if rate and reference else ""
        print(f"{row['runner']:34} {','.join(row['split']) or '-':10} {shown} {ratio}")
    print(f"\nedgesplit plan: {' | '.join(f'{s.node}[{s.start},{s.end})' for s in ours.stages)}, "
          f"predicted {ours.throughput_per_s:.2f} req/s; {args.requests} requests each")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

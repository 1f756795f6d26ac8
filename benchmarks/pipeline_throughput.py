"""A balanced two-stage GPT-2 on two local workers: edgesplit, torch's pipelining, one process.

GPT-2 (8 layers, width 512, batch 8 x 128 tokens) is planned for throughput over two
unemulated local nodes (one thread each) at top-level-module granularity, so its split point
is a module name. The same split and process count run under ``torch.distributed.pipelining``
(gloo), and the whole model runs in one process with 1 and with 2 threads.

    .venv/bin/python benchmarks/pipeline_throughput.py [--requests 40] [--json FILE] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import harness
import peer_pipelining
import report

from coordinator import samples
from coordinator.ports import free_ports
from partition.cluster import parse_cluster
from partition.cost_builder import node_profiles
from partition.plan import Objective
from partition.planning import plan

GPT2 = {"layers": 8, "width": 512, "batch": 8, "seq": 128}


def two_local_nodes() -> dict:
    ports = free_ports(2)
    return {
        "nodes": [{"name": f"worker-{k}", "address": f"127.0.0.1:{port}", "memory": "4GiB",
                   "threads": 1} for k, port in enumerate(ports)],
        "links": {"default": {"bandwidth": "10Gbps", "latency": "0.1ms"}},
    }


def table(rows: list[dict]) -> list[str]:
    """The runners' throughput, each also over the last row's (one process, 2 threads)."""
    reference = rows[-1].get("throughput_per_s")
    lines = [f"{'runner':34} {'split':10} {'req/s':>7} {'vs 1 process, 2 threads':>24}"]
    for row in rows:
        rate = row.get("throughput_per_s")
        shown = f"{rate:7.2f}" if rate else f"failed: {row.get('error')}"
        ratio = f"{rate / reference:24.2f}" if rate and reference else ""
        lines.append(f"{row['runner']:34} {','.join(row['split']) or '-':10} {shown} {ratio}")
    return lines


def measure(requests: int) -> list[dict]:
    """Plan GPT-2 over two local workers, then run it there, under torch's pipelining with
    the same split, and in one process with 1 and 2 threads; print the table and the plan."""
    print(f"machine: {harness.machine()}")
    sample = harness.prepare(samples.gpt2(**GPT2), Path(tempfile.mkdtemp()), "gpt2", "1")
    cluster = parse_cluster(two_local_nodes(), "two local workers")
    ours = plan(sample.model, sample.layer_graph, cluster,
                node_profiles(cluster, sample.profile, {}), Objective.THROUGHPUT)
    split_at = [stage.first_layer for stage in ours.stages[1:]]
    (ran,) = harness.run_plans(cluster, [ours], sample.layer_graph, emulate=False,
                               requests=requests, concurrency=4)
    measured = ran.result
    rows = [{"runner": "edgesplit, 2 workers", "split": split_at,
             "throughput_per_s": measured.throughput_per_s, "matches": "checked in tests"}]
    peer = peer_pipelining.measure_peer("gpt2", GPT2, split_at, requests=requests,
                                        microbatches=1)
    rows.append({"runner": "torch pipelining (gloo), 2 ranks", "split": split_at, **peer})
    for threads in (1, 2):
        single = peer_pipelining.measure_single_process("gpt2", GPT2, threads=threads,
                                                        requests=requests)
        rows.append({"runner": f"one process, {threads} thread(s)", "split": [], **single})
    print("\n" + "\n".join(table(rows)))
    print(f"\nedgesplit plan: {' | '.join(f'{s.node}[{s.start},{s.end})' for s in ours.stages)}, "
          f"predicted {ours.throughput_per_s:.2f} req/s; {requests} requests each")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    report.add_markdown_option(parser)
    args = parser.parse_args()
    with report.usual_output(args.markdown):
        rows = measure(args.requests)
    if args.markdown:
        print(report.markdown(table(rows)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()

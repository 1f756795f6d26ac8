"""A shared Wi-Fi on real workers: the plan a per-link model picks is slower there than the
medium-aware plan.

``examples/cluster-shared-wifi.yaml`` (on free ports) puts a camera and two boards behind
one access point. The model widens a small input into a 1 MiB activation and narrows it
again, so splitting it over both boards halves the compute but sends the activation over
the Wi-Fi twice (board -> access point -> board). Planned without the medium, that split
wins; planned with it, the whole model is dealt among the nodes. Both plans run on the same
simulated cluster, whose arbiter process makes every transfer reserve its airtime (after
it has refused some garbage), and the medium-aware plan must answer faster (a ranking; the
predicted gap is several times).
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import replace
from pathlib import Path

import msgpack
import psutil
import torch
import yaml
from model_zoo import WideMiddle

from coordinator.bench import random_inputs
from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster, read_arbiters
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from partition.cluster import ClusterSpec, parse_cluster
from partition.cost_builder import build_cost_model, node_profiles
from partition.layers import build_layer_graph
from partition.loader import load_model
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan, plan_from_schedule
from partition.profiler import profile_layers
from partition.split import split

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster-shared-wifi.yaml"
REQUESTS = 8
LAYER_S = 2e-4
"""Each layer's time on this machine as planned (about what it takes here when the machine
is quiet): a fixed figure, so a busy machine's noisy profile cannot change the plans."""
PREDICTED_GAP = 1.5
"""The medium-aware plan's predicted throughput over the per-link plan's, at least."""



def example_on_free_ports() -> ClusterSpec:
    data = yaml.safe_load(EXAMPLE.read_text())
    for node, port in zip(data["nodes"], free_ports(len(data["nodes"])), strict=True):
        node["address"] = f"127.0.0.1:{port}"
    return parse_cluster(data, "shared-wifi test cluster")


def refusals(address: str) -> list[str]:
    """What the arbiter at ``address`` answers a frame that is not msgpack, a request for a
    day of airtime, and a frame too long to read."""
    host, _, port = address.rpartition(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        day = msgpack.packb({"earliest": 0.0, "seconds": 86400.0})
        for body in (b"\xc1", day):
            conn.sendall(struct.pack(">I", len(body)) + body)
            answers.append(msgpack.unpackb(conn.recv(4096)[4:])["error"])
        conn.sendall(struct.pack(">I", 2**31))
        answers.append(msgpack.unpackb(conn.recv(4096)[4:])["error"])
    return answers


async def throughput(made: Plan, artifacts) -> float:
    """Requests per second with four in flight, after two to warm up."""
    await deploy(made, artifacts, emulate_links=True)
    make = random_inputs(made.inputs)
    async with await Pipeline.connect(made, window=4, failover=False) as pipeline:
        await pipeline.map([make(i) for i in range(2)])
        started = time.perf_counter()
        await pipeline.map([make(i) for i in range(REQUESTS)])
        return REQUESTS / (time.perf_counter() - started)


async def test_the_medium_aware_plan_beats_the_per_link_plan(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt2"
    torch.export.save(torch.export.export(WideMiddle().eval(), (torch.randn(64, 16),)), path)
    model = load_model(path)
    layer_graph = build_layer_graph(model.program)
    local = profile_layers(layer_graph, model.sha256, model.example_inputs, repeats=1, warmup=1)
    local = replace(local, layers=tuple(replace(layer, median_s=LAYER_S)
                                        for layer in local.layers))
    cluster = example_on_free_ports()
    profiles = node_profiles(cluster, local, {})

    aware = plan(model, layer_graph, cluster, profiles, Objective.THROUGHPUT)
    # The per-link plan one node a stage: without the medium the planner would replicate the
    # whole model instead of splitting it. With it, the whole model is dealt among the nodes
    # (each request's input and output cross the Wi-Fi, its activation never does).
    per_link = plan(model, layer_graph, replace(cluster, media=()), profiles,
                    Objective.THROUGHPUT, replicate=False)
    assert len(per_link.stages) >= 2 and len(aware.stages) == 1 and aware.stages[0].replicated
    assert aware.exact and aware.media[0].name == "wifi"
    # The per-link choice, priced on the cluster as it is (with its medium) and deployed so.
    cost = build_cost_model(layer_graph, cluster, profiles)
    names = cost.node_names
    spans = [Span(names.index(s.node), s.start, s.end) for s in per_link.stages]
    per_link = plan_from_schedule(model, layer_graph, cluster, cost, evaluate(cost, spans),
                                  Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    assert per_link.media[0].busy_s == per_link.bottleneck_s  # the Wi-Fi is its bottleneck
    assert per_link.bottleneck_s > PREDICTED_GAP * aware.bottleneck_s

    state = tmp_path / "state"
    with LocalCluster(cluster, state):
        [arbiter] = read_arbiters(state)
        assert arbiter.name == "wifi"
        assert [problem.split()[0] for problem in refusals(arbiter.address)] == [
            "not", "'seconds'", "a"]
        slow = await throughput(per_link, split(per_link, layer_graph))
        fast = await throughput(aware, split(aware, layer_graph))
    assert not psutil.pid_exists(arbiter.pid) or psutil.Process(arbiter.pid).status() == (
        psutil.STATUS_ZOMBIE)
    assert fast > slow, (f"medium-aware {fast:.2f} req/s, per-link {slow:.2f} req/s "
                         f"(predicted {aware.throughput_per_s:.2f} and "
                         f"{per_link.throughput_per_s:.2f})")


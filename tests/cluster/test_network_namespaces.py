"""``--isolation kernel`` networks: each worker in its own network namespace on a home
address in 198.18.0.0/15, links shaped by ``tbf``; a node can be cut off and the pipeline
fails over; nothing the cluster made is left after ``down`` or an interrupted start.

Skipped unless namespaces and cgroups can be made here (root, iproute2, cgroup-v1 cpu).
Traffic only goes to addresses inside the namespaces the tests make.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_helpers import coordinator, nodes_yaml, ok
from cluster_helpers import kernel_networks_unavailable, leftovers
from model_zoo import WideMiddle

from coordinator import local_cluster, netns
from coordinator.bench import random_inputs
from coordinator.bench_check import Reference, run_checked
from coordinator.deploy import deploy
from coordinator.isolation import Isolation, IsolationError
from coordinator.local_cluster import (
    LocalCluster,
    LocalClusterError,
    read_arbiters,
    read_cpu_groups,
    read_namespaces,
    start_cluster,
    stop_recorded,
)
from coordinator.netns import RANGE, Namespaces
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from coordinator.probe import probe_cluster
from node.client import GrpcWorkerHandle
from node.errors import NodeUnreachableError
from node.probe import ProbeOptions
from partition.artifact import ProgramRunner
from partition.cluster import ClusterSpec, MediumSpec, load_cluster, parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.loader import load_model
from partition.optimizer import Span, evaluate
from partition.plan import Objective
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.replan_inputs import replan_inputs
from partition.split import split

TOLERANCE = 0.15
"""How close a probe must come to a shaped link's bandwidth."""
REQUESTS = 40
CUT_AFTER = 10
MEDIUM_REQUESTS = 5


pytestmark = pytest.mark.skipif(kernel_networks_unavailable() is not None,
                                reason=kernel_networks_unavailable() or "")


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Namespaces]]:
    """Namespaces a test made go in this list. When the test ends, the workers, groups and
    namespaces ``tmp_path/state`` records are removed (as ``down`` does), then whatever is
    left of the listed namespaces."""
    namespaces: list[Namespaces] = []
    try:
        yield namespaces
    finally:
        stop_recorded(tmp_path / "state")
        for each in namespaces:
            each.remove()


def cluster_of(names: list[str], links: list[dict[str, str]] | None = None) -> ClusterSpec:
    """Nodes whose CPU quotas add up to 1.4 cores (no stretch on two cores; a worker under
    a small quota takes long to start), on 1 Gbps links but for ``links``."""
    return parse_cluster({
        "nodes": [{"name": name, "address": f"127.0.0.1:{port}", "memory": "1GiB",
                   "speed": round(1.4 / len(names), 2)}
                  for name, port in zip(names, free_ports(len(names)), strict=True)],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"},
                  "overrides": links or []},
        "source": names[0],
        "sink": names[0],
    }, "netns test")


async def test_probe_recovers_each_direction_of_a_shaped_link(tmp_path: Path) -> None:
    cluster = cluster_of(["a", "b"], [
        {"from": "a", "to": "b", "bandwidth": "40Mbps", "latency": "2ms"},
        {"from": "b", "to": "a", "bandwidth": "16Mbps", "latency": "2ms"},
    ])
    with LocalCluster(cluster, tmp_path / "state", isolation=Isolation.KERNEL) as local:
        assert local.namespaces is not None
        for node in local.nodes:
            host = ipaddress.ip_address(node.address.rpartition(":")[0])
            assert host in RANGE and host in ipaddress.ip_network(local.namespaces.block)
        assert [n.address for n in local.cluster.nodes] == [n.address for n in local.nodes]
        links = await probe_cluster(local.cluster, ProbeOptions(1_000_000, 2), emulate=True)
    for (a, b), measured in links.between_nodes.items():
        want = cluster.link(a, b).bytes_per_s
        assert measured.bytes_per_s == pytest.approx(want, rel=TOLERANCE), (a, b, measured)
        # the worker still delays by the latency, both ways (the veth adds well under 1 ms;
        # the margin is for a busy host)
        assert 2 * 0.002 <= measured.rtt_s < 2 * 0.002 + 0.01, (a, b, measured)


def test_up_gives_home_addresses_and_down_removes_everything(
    tmp_path: Path, cli_env: dict[str, str], made: list[Namespaces]
) -> None:
    nodes = nodes_yaml(tmp_path / "nodes.yaml", [
        (name, f"127.0.0.1:{port}", "1GiB")
        for name, port in zip(("a", "b"), free_ports(2), strict=True)
    ])
    out = " ".join(ok(coordinator(cli_env, "up", "--isolation", "kernel", nodes)).split())
    state = tmp_path / "state"
    namespaces, groups = read_namespaces(state), read_cpu_groups(state)
    assert namespaces is not None and groups is not None
    made.append(namespaces)
    assert f"network namespace {namespaces.prefix}<node>" in out, out
    planning = state / "nodes.yaml"
    assert f"plan with --nodes {planning}" in out, out
    running = load_cluster(planning)
    assert [n.address.rpartition(":")[0] for n in running.nodes] == [
        namespaces.node(name).home for name in ("a", "b")]
    made_now = set(leftovers(namespaces.prefix, namespaces.block))
    assert {*(n.namespace for n in namespaces.nodes), *(n.root_link for n in namespaces.nodes),
            f"unreachable {namespaces.block}"} <= made_now, made_now
    assert "stopped 2 node(s)" in ok(coordinator(cli_env, "down"))
    assert leftovers(namespaces.prefix, namespaces.block) == []
    assert not groups.path.exists()


def test_an_interrupted_start_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[Namespaces]
) -> None:
    built = Namespaces.build

    def build(self: Namespaces, cluster: ClusterSpec) -> None:
        made.append(self)
        built(self, cluster)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Namespaces, "build", build)
    monkeypatch.setattr(local_cluster, "_wait_ready", interrupt)
    with pytest.raises(KeyboardInterrupt):
        start_cluster(cluster_of(["a", "b"]), tmp_path / "state", Isolation.KERNEL)
    (namespaces,) = made
    assert leftovers(namespaces.prefix, namespaces.block) == []
    assert read_namespaces(tmp_path / "state") is None


def test_a_build_that_fails_halfway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[Namespaces]
) -> None:
    ran, run = [], netns.run

    def fail_the_twelfth(command: list[str]) -> None:
        ran.append(command)
        if len(ran) == 12:  # after the claim, while the second namespace is being made
            raise IsolationError(f"`{' '.join(command)}` failed: a test says so")
        run(command)

    built = Namespaces.build

    def build(self: Namespaces, cluster: ClusterSpec) -> None:
        made.append(self)
        built(self, cluster)

    monkeypatch.setattr(netns, "run", fail_the_twelfth)
    monkeypatch.setattr(Namespaces, "build", build)
    with pytest.raises(IsolationError, match="a test says so"):
        start_cluster(cluster_of(["a", "b", "c"]), tmp_path / "state", Isolation.KERNEL)
    (namespaces,) = made
    assert len(ran) > 12  # the removal ran too
    assert leftovers(namespaces.prefix, namespaces.block) == []
    assert read_namespaces(tmp_path / "state") is None


def test_cut_needs_kernel_isolation(tmp_path: Path) -> None:
    local = LocalCluster(cluster_of(["a"]), tmp_path / "state")
    with pytest.raises(LocalClusterError, match="isolation=Isolation.KERNEL"):
        local.cut("a")


async def test_a_node_cut_off_is_planned_around_and_heals(
    sample_exported, tmp_path: Path
) -> None:
    """Three stages over three namespaced nodes; the middle node's links go down (its
    process keeps running): every request is still answered once and right, by a plan
    without it; after healing, it answers again."""
    sample = sample_exported("skip_dag")
    given = cluster_of(["n0", "n1", "n2"])
    with LocalCluster(given, tmp_path / "state", isolation=Isolation.KERNEL) as local:
        cluster = local.cluster
        layer_graph = build_layer_graph(sample.model.program)
        profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                                 repeats=1, warmup=0)
        cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
        count = layer_graph.num_layers
        spans = [Span(k, k * count // 3, (k + 1) * count // 3) for k in range(3)]
        plan = replace(
            plan_from_schedule(sample.model, layer_graph, cluster, cost, evaluate(cost, spans),
                               Objective.THROUGHPUT, exact=False, lower_bound_s=0.0),
            replan=replan_inputs(cluster, {n: profile for n in cluster.names}),
        )
        await deploy(plan, split(plan, layer_graph), emulate_links=True)
        reference = Reference(ProgramRunner(sample.model.program), random_inputs(plan.inputs),
                              [s.name for s in plan.inputs])

        async def cut_middle(answered: int) -> None:
            if answered == CUT_AFTER:
                await asyncio.to_thread(local.cut, "n1")

        async with await Pipeline.connect(plan, window=4, emulate_links=True) as pipeline:
            result = await run_checked(pipeline, reference, requests=REQUESTS, concurrency=4,
                                       progress=cut_middle)
        assert (result.answered, result.failed, result.duplicates, result.mismatches) == (
            REQUESTS, 0, 0, 0), result.errors
        assert result.replans, "the cut node was not planned around"
        assert all(not s.startswith("n1[") for s in result.replans[0]["new_stages"])
        address = cluster.node("n1").address
        assert not await answers(address, "n1")
        local.heal("n1")
        assert await answers(address, "n1", within_s=10.0)


async def answers(address: str, name: str, within_s: float = 0.0) -> bool:
    """True if node ``name`` at ``address`` answers Describe, trying for ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        handle = GrpcWorkerHandle(address, name)  # a new channel: no reconnect backoff
        try:
            return (await handle.describe()).name == name
        except NodeUnreachableError:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        finally:
            await handle.close()



async def test_a_shared_medium_is_enforced_from_a_namespace_only_its_nodes_reach(
    tmp_path: Path,
) -> None:
    """Nodes a and b share a 40 Mbit/s medium and a 1 Gbps link: a frame of 1 MiB from a to
    b takes 0.42 s of airtime (it uses the medium at both ends), which only the arbiter in
    the medium's own namespace can impose; this machine cannot reach that arbiter."""
    path = tmp_path / "wide.pt2"
    torch.export.save(torch.export.export(WideMiddle().eval(), (torch.randn(64, 16),)), path)
    model = load_model(path)
    layer_graph = build_layer_graph(model.program)
    given = replace(cluster_of(["a", "b"]), media=(MediumSpec("air", 5e6, ("a", "b")),))
    with LocalCluster(given, tmp_path / "state", isolation=Isolation.KERNEL) as local:
        cluster, namespaces = local.cluster, local.namespaces
        assert namespaces is not None
        [arbiter] = read_arbiters(tmp_path / "state")
        host, _, port = arbiter.address.rpartition(":")
        assert host == namespaces.medium("air").home
        assert ipaddress.ip_address(host) in ipaddress.ip_network(namespaces.block)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=2).close()
        profile = profile_layers(layer_graph, model.sha256, model.example_inputs,
                                 repeats=1, warmup=0)
        cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
        cut = next(k for k in range(1, layer_graph.num_layers)
                   if sum(t.nbytes for t in layer_graph.boundary_tensors(k)) >= 1 << 20)
        spans = [Span(0, 0, cut), Span(1, cut, layer_graph.num_layers)]
        plan = plan_from_schedule(model, layer_graph, cluster, cost, evaluate(cost, spans),
                                  Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
        airtime = plan.media[0].busy_s
        assert airtime == pytest.approx(2 * (1 << 20) / 5e6, rel=0.05)
        await deploy(plan, split(plan, layer_graph), emulate_links=True)
        make = random_inputs(plan.inputs)
        async with await Pipeline.connect(plan, window=4, emulate_links=True) as pipeline:
            await pipeline.infer(make(0))
            started = time.perf_counter()
            await pipeline.map([make(i) for i in range(MEDIUM_REQUESTS)])
            elapsed = time.perf_counter() - started
        assert elapsed >= 0.9 * MEDIUM_REQUESTS * airtime, (elapsed, airtime)
        prefix, block = namespaces.prefix, namespaces.block
    assert leftovers(prefix, block) == []

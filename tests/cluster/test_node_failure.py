"""With failover off, a node that dies mid-pipeline fails the requests in flight with a
clear error; none hang (with it on, see test_failover.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from cli_helpers import edge_node_running

from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.pipeline import Pipeline, PipelineBrokenError
from coordinator.ports import free_ports
from node.errors import NodeUnreachableError
from partition.cluster import parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.split import StageArtifact, split


@dataclass(frozen=True)
class Deployable:
    """The module's three workers, and ``skip_dag`` split in thirds over them."""

    local: LocalCluster
    plan: Plan
    artifacts: list[StageArtifact]


@pytest.fixture(scope="module")
def three_nodes(sample_exported, tmp_path_factory) -> Iterator[Deployable]:
    sample = sample_exported("skip_dag")
    cluster = parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{port}", "memory": "1GiB"}
                  for i, port in enumerate(free_ports(3))],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "test")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    cost = build_cost_model(layer_graph, cluster, {n.name: profile for n in cluster.nodes})
    count = layer_graph.num_layers
    spans = [Span(0, 0, count // 3), Span(1, count // 3, 2 * count // 3), Span(2, 2 * count // 3,
                                                                                count)]
    plan = plan_from_schedule(sample.model, layer_graph, cluster, cost, evaluate(cost, spans),
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    with LocalCluster(cluster, tmp_path_factory.mktemp("node-failure") / "state") as local:
        yield Deployable(local, plan, split(plan, layer_graph))


@pytest.fixture
def deployable(three_nodes: Deployable) -> Deployable:
    """The module's workers, a node an earlier test killed started again."""
    for node in three_nodes.local.nodes:
        if not edge_node_running(node.pid):
            three_nodes.local.restart(node.name)
    return three_nodes


@pytest.mark.parametrize("victim", [1, 2], ids=["middle node", "last node"])
async def test_requests_in_flight_fail_when_a_node_dies(
    victim: int, sample_exported, deployable: Deployable
) -> None:
    sample = sample_exported("skip_dag")
    plan, local = deployable.plan, deployable.local
    await deploy(plan, deployable.artifacts, emulate_links=False)
    async with await Pipeline.connect(plan, failover=False) as pipeline:
        (first,) = await pipeline.infer(sample.inputs)
        assert torch.allclose(first, sample.expected[0], atol=1e-5)
        os.kill(local.nodes[victim].pid, signal.SIGKILL)
        batch = [torch.randn_like(sample.inputs[0]) for _ in range(5)]
        with pytest.raises((PipelineBrokenError, NodeUnreachableError),
                           match="lost and failover is off"):
            await asyncio.wait_for(pipeline.map(batch), timeout=30)

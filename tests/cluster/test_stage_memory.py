"""Memory as measured: what a real worker adds when its stage loads and serves with every
queue full stays within the memory the plan predicted for that stage, and the worker
reports its own resident memory before any stage."""

from __future__ import annotations

import asyncio

import psutil
import pytest
from cluster_helpers import running_node

from coordinator.deploy import deploy
from coordinator.pipeline import bind_inputs
from node.client import GrpcWorkerHandle
from partition.cluster import memory_for_stages, parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.queues import FRAMES_HELD_IN, FRAMES_HELD_OUT, QUEUE_DEPTH, RESULTS_HELD
from partition.split import split

FILL_TIMEOUT_S = 120.0
"""A guard against hanging while the node works through the frames, not a timing check."""


@pytest.mark.parametrize("model", ["resnet", "gpt2", "mobilenet_v2"])
async def test_a_loaded_stage_at_full_queues_stays_within_its_predicted_memory(
    model: str, sample_exported, tmp_path,
) -> None:
    sample = sample_exported(model)
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    # Results wait unread for the whole test: no stall cut-off may drop them meanwhile.
    with running_node("box", tmp_path / "box.log", "--results-stall-s", "600") as node:
        handle = GrpcWorkerHandle(node.address, node.name)
        try:
            info = await handle.describe()
            process = psutil.Process(node.process.pid)
            before = process.memory_info().rss
            assert 0 < info.resident_overhead_bytes <= before * 1.1  # before any stage
            cluster = memory_for_stages(parse_cluster({
                "nodes": [{"name": "box", "address": node.address, "memory": "4GiB"}],
            }, "one node"), {"box": info.resident_overhead_bytes})
            cost = build_cost_model(layer_graph, cluster, {"box": profile})
            plan = plan_from_schedule(
                sample.model, layer_graph, cluster, cost,
                evaluate(cost, [Span(0, 0, layer_graph.num_layers)]), Objective.THROUGHPUT,
                exact=False, lower_bound_s=0.0)
            await deploy(plan, split(plan, layer_graph), emulate_links=False)
            await fill_the_queues(handle, bind_inputs(plan.inputs, sample.inputs))
            added = process.memory_info().rss - before
        finally:
            await handle.close()
    predicted = plan.stages[0].memory_bytes
    print(f"{model}: worker {before / 2**20:.0f} MiB before its stage, "
          f"+{added / 2**20:.1f} MiB at full queues, predicted {predicted / 2**20:.1f} MiB")
    assert 0 < added <= predicted


async def fill_the_queues(handle: GrpcWorkerHandle, inputs) -> None:
    """Send as many frames as the node's queues and results buffer hold (what the plan
    counts), nobody reading the results, and wait until its input queue is full."""
    sender = await handle.open_sender()
    try:
        for request_id in range(1, FRAMES_HELD_IN + FRAMES_HELD_OUT + RESULTS_HELD + 1):
            await sender.send(request_id, inputs)
        async with asyncio.timeout(FILL_TIMEOUT_S):
            while (await handle.describe()).queue_depth < QUEUE_DEPTH:
                await asyncio.sleep(0.2)
    finally:
        sender.abort()

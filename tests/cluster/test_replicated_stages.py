"""Replicated stages on real ``edge-node`` processes: a stage run by two nodes at once gives
the whole model's outputs, its nodes serve requests in proportion to their shares, and a
replica killed or hung mid-run is left out without a re-plan, every request answered
once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from cluster_helpers import Split, split_in_three
from replication import replicate
from test_pipeline import assert_outputs_equal, make_inputs

from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from coordinator.verify import verify
from node.client import GrpcWorkerHandle
from partition.cluster import ClusterSpec, parse_cluster
from partition.plan import Plan
from partition.profiler import profile_layers
from partition.replan_inputs import replan_inputs
from partition.replanning import Replanner

MODEL = "skip_dag"
REQUESTS = 40
WINDOW = 8
KILL_AFTER = 12
"""Answers before the replica is killed."""
RUN_S = 60.0
"""Bound on one run of requests, against hangs (a run takes a few seconds)."""
CLOSE_ROUNDS = 8
"""Pipelines opened and closed one after another, each in its own event loop."""


def four_node_cluster() -> ClusterSpec:
    return parse_cluster({
        "nodes": [{"name": f"node-{i}", "address": f"127.0.0.1:{port}", "memory": "2GiB",
                   "speed": 1.0} for i, port in enumerate(free_ports(4))],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
        "source": "node-0",
        "sink": "node-0",
    }, "replication test cluster")


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Four real ``edge-node`` processes; the planner's plan uses three, node-3 is spare."""
    with LocalCluster(four_node_cluster(), tmp_path_factory.mktemp("replicas")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def parts(local: LocalCluster, sample_exported) -> Split:
    return split_in_three(local.cluster, sample_exported(MODEL))


async def served(plan: Plan) -> dict[str, int]:
    """Requests each node of ``plan`` served since its stage was loaded."""
    counts = {}
    for stage in plan.stages:
        for replica in stage.replicas:
            handle = GrpcWorkerHandle(replica.address, replica.node)
            try:
                counts[replica.node] = (await handle.describe()).requests_served
            finally:
                await handle.close()
    return counts


def check_answers(parts: Split, batch: list[dict], answers: list[tuple[torch.Tensor, ...]]
                  ) -> None:
    assert len(answers) == len(batch)
    for seed, (inputs, got) in enumerate(zip(batch, answers, strict=True)):
        expected = parts.reference(*(inputs[spec.name] for spec in parts.plan.inputs))
        assert_outputs_equal(got, expected, f"{MODEL} request {seed}")


@pytest.mark.parametrize("stage, shares", [
    (0, [("node-0", 0.5), ("node-3", 0.5)]),  # the client deals
    (1, [("node-1", 0.75), ("node-3", 0.25)]),
    (2, [("node-2", 0.5), ("node-3", 0.5)]),  # results come from both
], ids=["first", "middle", "last"])
async def test_a_replicated_stage_matches_the_model_and_deals_by_share(
    parts: Split, stage: int, shares: list[tuple[str, float]]
) -> None:
    plan = replicate(parts.plan, stage, shares)
    await deploy(plan, parts.artifacts, emulate_links=False)
    batch = [make_inputs(plan.inputs, parts.sample.module, seed) for seed in range(REQUESTS)]
    async with await Pipeline.connect(plan, window=WINDOW, failover=False) as pipeline:
        async with asyncio.timeout(RUN_S):
            answers = await pipeline.map(batch)
        assert pipeline.late_answers == 0
    check_answers(parts, batch, answers)
    counts = await served(plan)
    for node, share in shares:
        assert abs(counts[node] - REQUESTS * share) <= 1, counts
    assert all(count == REQUESTS for node, count in counts.items()
               if node not in dict(shares)), counts
    # traced requests, dealt the same way, agree with this machine's stage by stage
    assert await verify(plan, parts.artifacts,
                        lambda seed: make_inputs(plan.inputs, parts.sample.module, seed),
                        range(4)) == []


@pytest.mark.parametrize(("signum", "priced"), [
    (signal.SIGKILL, False), (signal.SIGSTOP, False), (signal.SIGKILL, True)],
    ids=["kill", "hang", "kill-priced"])
async def test_a_lost_replica_is_left_out_and_every_request_is_answered_once(
    local: LocalCluster, parts: Split, signum: signal.Signals, priced: bool
) -> None:
    """kill -9, or SIGSTOP past the health deadline, one of the middle stage's two nodes
    mid-run. Without the planner's inputs the pipeline could not re-plan: leaving a replica
    out must not need to. With them (``priced``), the plan left is priced in its new shares:
    node-1 alone is busy twice as long a request."""
    plan = replicate(parts.plan, 1, [("node-1", 0.5), ("node-3", 0.5)])
    replanner = None
    if priced:
        profile = profile_layers(parts.layer_graph, parts.sample.model.sha256,
                                 parts.sample.model.example_inputs, repeats=1, warmup=0)
        plan = replace(plan, replan=replan_inputs(
            local.cluster, {n: profile for n in local.cluster.names}))
        replanner = Replanner(plan, parts.sample.model, parts.layer_graph)
    else:
        plan = replace(plan, replan=None)
    victim = next(n for n in local.nodes if n.name == "node-3")
    await deploy(plan, parts.artifacts, emulate_links=False)
    batch = [make_inputs(plan.inputs, parts.sample.module, seed) for seed in range(REQUESTS)]
    answered = 0
    try:
        async with await Pipeline.connect(plan, window=WINDOW, rebalance=False) as pipeline:

            async def one(inputs: dict) -> tuple[torch.Tensor, ...]:
                nonlocal answered
                outputs = await pipeline.infer(inputs)
                answered += 1
                if answered == KILL_AFTER:
                    os.kill(victim.pid, signum)
                return tuple(o.clone() for o in outputs)

            async with asyncio.timeout(RUN_S):
                answers = await asyncio.gather(*(one(inputs) for inputs in batch))
            check_answers(parts, batch, answers)
            assert [s.nodes for s in pipeline.plan.stages] == [
                ("node-0",), ("node-1",), ("node-2",)]
            [left_out] = pipeline.replans
            assert "node-3" in left_out.cause and left_out.moved_bytes == 0
            assert left_out.replayed >= 1
            if replanner is not None:
                shared = replanner.price(plan).stage_seconds[1]
                assert pipeline.plan.stages[1].compute_s == pytest.approx(2 * shared)
                assert any("predicted without the replica" in line
                           for line in pipeline.events.lines)
            before = (await served(pipeline.plan))["node-1"]
            async with asyncio.timeout(RUN_S):
                after_batch = await pipeline.map(batch[:WINDOW])
            check_answers(parts, batch[:WINDOW], after_batch)
            assert (await served(pipeline.plan))["node-1"] == before + WINDOW
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGCONT)
        local.restart("node-3")


def test_pipelines_closed_in_turn_leave_grpc_nothing_for_a_closed_loop(
    parts: Split, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelines on a plan whose last stage is replicated, each opened, used and closed in an
    event loop of its own (as ``coordinator demo`` and the benchmarks run them), leave no
    gRPC operation behind: gRPC would complete it in the next loop and fail on the closed
    one ("Event loop is closed"). A thread keeping the interpreter busy (as the re-planner's
    does) delays gRPC's completions, which makes a leftover operation likely."""
    plan = replicate(parts.plan, 2, [("node-2", 0.5), ("node-3", 0.5)])
    asyncio.run(deploy(plan, parts.artifacts, emulate_links=False))
    batch = [make_inputs(plan.inputs, parts.sample.module, seed) for seed in range(WINDOW)]

    async def run_once() -> None:
        async with await Pipeline.connect(plan, window=WINDOW) as pipeline:
            await pipeline.map(batch)

    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            sum(range(1_000_000))  # one C call: holds the interpreter for milliseconds

    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        for _ in range(CLOSE_ROUNDS):
            asyncio.run(run_once())
    finally:
        stop.set()
        worker.join()
    asyncio.run(served(plan))  # a last loop, in which a leftover completion would fail
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

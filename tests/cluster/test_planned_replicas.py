"""The planner's own replicated plan on real ``edge-node`` processes: made by ``plan`` (not
rewritten by hand), deployed and run, it gives the whole model's outputs and each node
serves its planned share of the requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_pipeline import assert_outputs_equal, make_inputs
from test_replicated_stages import four_node_cluster, served

from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.pipeline import Pipeline
from partition.artifact import ProgramRunner
from partition.cost_builder import node_profiles
from partition.layers import build_layer_graph
from partition.plan import Objective
from partition.planning import plan
from partition.profiler import profile_layers
from partition.split import split

REQUESTS = 40
RUN_S = 60.0
"""Bound on the run, against hangs (it takes a few seconds)."""


async def test_the_planners_replicated_plan_runs(sample_exported, tmp_path: Path) -> None:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=1)
    with LocalCluster(four_node_cluster(), tmp_path / "state") as local:
        # Four equal nodes and the same profile: a stage on several of them pays.
        made = plan(sample.model, layer_graph, local.cluster,
                    node_profiles(local.cluster, profile, {}), Objective.THROUGHPUT)
        assert any(stage.replicated for stage in made.stages), made.stages
        await deploy(made, split(made, layer_graph), emulate_links=False)
        batch = [make_inputs(made.inputs, sample.module, seed) for seed in range(REQUESTS)]
        async with await Pipeline.connect(made, window=8, failover=False) as pipeline:
            async with asyncio.timeout(RUN_S):
                answers = await pipeline.map(batch)
        reference = ProgramRunner(sample.model.program)
        for seed, (inputs, got) in enumerate(zip(batch, answers, strict=True)):
            expected = reference(*(inputs[spec.name] for spec in made.inputs))
            assert_outputs_equal(got, expected, f"request {seed}")
        counts = await served(made)
        for stage in made.stages:
            for replica in stage.replicas:
                assert abs(counts[replica.node] - REQUESTS * replica.share) <= 1, counts

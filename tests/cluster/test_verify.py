"""`coordinator bench --verify-fraction`: a node running other weights than the plan's is named.

Two real workers run skip_dag split in two. One of them is then given the same stage exported
from a model with other weights (through the ordinary LoadStage call), and the deployment
record is made to claim that artifact, as a node lying about its stage would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch

from coordinator.cli import main
from coordinator.deploy import deployment_record_path
from coordinator.samples import SAMPLES, build_sample
from node.client import GrpcWorkerHandle
from partition.cluster import ClusterSpec
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.loader import export_module
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.split import split

BENCH = ["-n", "4", "-c", "2", "--no-emulate-links", "--verify-fraction", "1"]


def two_stage_plan(cluster: ClusterSpec, sample) -> Plan:
    """skip_dag's layers halved onto node-0 and node-1."""
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=1)
    cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
    half = layer_graph.num_layers // 2
    spans = [Span(0, 0, half), Span(1, half, layer_graph.num_layers)]
    return plan_from_schedule(sample.model, layer_graph, cluster, cost, evaluate(cost, spans),
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)


async def load_other_weights(plan: Plan, stage: int, directory: Path) -> str:
    """Load ``stage`` of skip_dag with other random weights onto its node; its hash."""
    torch.manual_seed(1234)
    module, inputs = build_sample(SAMPLES["skip_dag"])
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1.5)
    program = export_module(module, inputs, origin="tampered")
    artifact = split(plan, build_layer_graph(program))[stage]
    handle = GrpcWorkerHandle(plan.stages[stage].address, plan.stages[stage].node)
    try:
        await handle.load_stage(artifact.spec, artifact.data)
    finally:
        await handle.close()
    return artifact.spec.artifact_sha256


def test_bench_verify_names_the_tampered_stage_and_only_then(
    three_workers: ClusterSpec, sample_exported, tmp_path: Path, capsys
) -> None:
    plan = two_stage_plan(three_workers, sample_exported("skip_dag"))
    assert [s.node for s in plan.stages] == ["node-0", "node-1"]
    path = tmp_path / "plan.json"
    plan.save(path)

    assert main(["bench", str(path), *BENCH]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "every stage agrees" in out and "tampered" not in out

    record_path = deployment_record_path(path)
    record = json.loads(record_path.read_text())
    record["artifact_sha256"][1] = asyncio.run(load_other_weights(plan, 1, tmp_path))
    record_path.write_text(json.dumps(record))

    assert main(["bench", str(path), *BENCH]) == 1
    out = capsys.readouterr().out
    assert "every stage agrees" not in out
    assert (f"stage 1 on node 'node-1' ({plan.stages[1].address}) computed other outputs"
            in " ".join(out.split()))
    assert "stage 0" not in out

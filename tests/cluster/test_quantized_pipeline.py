"""Quantized stages on real workers: GPT-2 in three stages on nodes that store their weights
as float32, int8 and int4 (each node's own ``quantize``), answering close to float32."""

from __future__ import annotations

import torch

from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from partition.artifact import ProgramRunner
from partition.cluster import parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.quantize import WeightFormat
from partition.split import split

FORMATS = (WeightFormat.NONE, WeightFormat.INT8, WeightFormat.INT4)
TOLERANCE = 0.3  # relative L2 error; int4 alone reaches about 16% on GPT-2 (see test_quantize)


async def test_workers_run_quantized_stages(sample_exported, tmp_path) -> None:
    cluster = parse_cluster({
        "nodes": [{"name": f"node-{i}", "address": f"127.0.0.1:{port}", "memory": "2GiB",
                   "quantize": fmt.value}
                  for i, (fmt, port) in enumerate(zip(FORMATS, free_ports(3), strict=True))],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "quantized test cluster")
    sample = sample_exported("gpt2")
    model = sample.model
    layer_graph = build_layer_graph(model.program)
    profile = profile_layers(layer_graph, model.sha256, model.example_inputs, repeats=1,
                             warmup=0)
    cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
    count = layer_graph.num_layers
    cuts = [0, count // 3, 2 * count // 3, count]
    spans = [Span(k, a, b) for k, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]
    plan = plan_from_schedule(model, layer_graph, cluster, cost, evaluate(cost, spans),
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    assert [stage.weights for stage in plan.stages] == list(FORMATS)
    artifacts = split(plan, layer_graph)
    reference = ProgramRunner(model.program)
    inputs = [torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(seed))
              for seed in range(4)]
    with LocalCluster(cluster, tmp_path):
        await deploy(plan, artifacts, emulate_links=False)
        async with await Pipeline.connect(plan) as pipeline:
            answers = await pipeline.map([(ids,) for ids in inputs])
    for ids, got in zip(inputs, answers, strict=True):
        want = reference(ids)
        for a, b in zip(got, want, strict=True):
            error = ((a - b).norm() / b.norm()).item()
            assert 0 < error < TOLERANCE, f"relative error {error:.3g}"

"""README's "From Python" example, read from README.md and run against two real workers.

The code block is extracted at test time, so an edit to README that breaks the example
breaks this test. It runs as a reader would run it: ``plan.json`` in the working directory,
written for a plan deployed on the nodes, and ``main(batches)`` under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch
from cli_helpers import split_in_two_room
from torch.utils import _pytree as pytree

from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster
from coordinator.ports import free_ports
from partition.cluster import parse_cluster
from partition.cost_builder import node_profiles
from partition.layers import build_layer_graph
from partition.plan import Objective
from partition.planning import plan
from partition.profiler import profile_layers
from partition.split import split

README = Path(__file__).resolve().parents[2] / "README.md"
BATCHES = 5
ATOL = 1e-5


def readme_python_example() -> str:
    """The first ```python block after README's ``### From Python`` heading."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"^### From Python\n.*?^```python\n(.*?)^```", text, re.M | re.S)
    assert found, f"{README} has no ```python block under '### From Python'"
    return found.group(1)


def test_readme_python_example_runs_on_a_deployed_plan(
    sample_exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = sample_exported("skip_dag")
    model = sample.model
    layer_graph = build_layer_graph(model.program)
    profile = profile_layers(layer_graph, model.sha256, model.example_inputs,
                             repeats=1, warmup=1)
    room = split_in_two_room(layer_graph)  # less than the whole model: the plan uses both nodes
    cluster = parse_cluster({
        "nodes": [{"name": f"node-{i}", "address": f"127.0.0.1:{port}", "memory": room}
                  for i, port in enumerate(free_ports(2))],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "two-node test cluster")
    planned = plan(model, layer_graph, cluster, node_profiles(cluster, profile, {}),
                   Objective.THROUGHPUT)
    assert sorted(s.node for s in planned.stages) == ["node-0", "node-1"], planned.stages
    planned.save(tmp_path / "plan.json")
    monkeypatch.chdir(tmp_path)

    generator = torch.Generator().manual_seed(1)  # the sample's own inputs use seed 0
    batches = [sample.inputs, *(
        (torch.randn(model.example_inputs[0].shape, generator=generator),)
        for _ in range(BATCHES - 1)
    )]
    namespace: dict[str, object] = {}
    with LocalCluster(cluster, tmp_path / "state"):
        asyncio.run(deploy(planned, split(planned, layer_graph), emulate_links=False))
        exec(compile(readme_python_example(), f"{README}:From Python", "exec"), namespace)
        first, rest = asyncio.run(namespace["main"](batches))

    answers = [first, *rest]
    assert len(answers) == BATCHES
    for k, (inputs, got) in enumerate(zip(batches, answers, strict=True)):
        with torch.no_grad():
            expected = tuple(pytree.tree_leaves(sample.module(*inputs)))
        assert len(got) == len(expected), f"batch {k}: {len(got)} outputs"
        for a, b in zip(got, expected, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=ATOL), (
                f"batch {k} differs from the single-process model by "
                f"{(a - b).abs().max().item():.2e}"
            )
    assert not torch.equal(answers[0][0], answers[1][0])  # each batch got its own answer

"""Splitting a plan into stage artifacts whose chain reproduces the whole model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import model_zoo
import pytest
import torch

from coordinator.samples import SAMPLES
from partition.artifact import load_program, run_stage, sha256
from partition.cluster import ClusterSpec, parse_cluster
from partition.cost_builder import build_cost_model
from partition.errors import ModelLoadError
from partition.layers import MARKERS, LayerGraph, build_layer_graph
from partition.loader import LoadedModel, load_model
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import LayerProfile, Profile
from partition.split import StageArtifact, split

REPO = Path(__file__).resolve().parents[2]
LAYER_SECONDS = 1e-3


def three_nodes() -> ClusterSpec:
    return parse_cluster(
        {
            "nodes": [
                {"name": f"node-{i}", "address": f"127.0.0.1:{50160 + i}", "memory": "4GiB"}
                for i in range(3)
            ],
            "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
            "source": "node-0",
            "sink": "node-0",
        },
        "test cluster",
    )


def flat_profile(model: LoadedModel, layer_graph: LayerGraph) -> Profile:
    """A made-up profile (every layer takes 1 ms), so no test waits for the profiler."""
    layers = tuple(
        LayerProfile(layer.name, len(layer.ops), layer.param_bytes, layer.output_bytes,
                     layer.peak_activation_bytes, LAYER_SECONDS, 0.0)
        for layer in layer_graph.layers
    )
    return Profile(
        model.sha256, layer_graph.granularity, layer_graph.fingerprint(), "cpu:test", 1,
        torch.__version__, 1, layers, LAYER_SECONDS * len(layers), 0.0,
    )


def three_stage_plan(model: LoadedModel, layer_graph: LayerGraph) -> Plan:
    """Layers split at L/3 and 2L/3 over three nodes."""
    count = layer_graph.num_layers
    return cut_plan(model, layer_graph, [0, count // 3, 2 * count // 3, count])


def cut_plan(model: LoadedModel, layer_graph: LayerGraph, cuts: list[int]) -> Plan:
    """Layers split at ``cuts`` (boundaries, first 0 and last L), one stage per node."""
    cluster = three_nodes()
    profile = flat_profile(model, layer_graph)
    cost = build_cost_model(layer_graph, cluster, {name: profile for name in cluster.names})
    spans = [Span(node, start, end) for node, (start, end) in enumerate(zip(cuts, cuts[1:],
                                                                            strict=False))]
    schedule = evaluate(cost, spans)
    return plan_from_schedule(model, layer_graph, cluster, cost, schedule,
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)


def run_chain(artifacts: list[StageArtifact], layer_graph: LayerGraph,
              inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Send the inputs through every stage as the workers would, checking each frame."""
    frame = dict(zip(layer_graph.user_inputs, inputs, strict=True))
    for artifact in artifacts:
        spec = artifact.spec
        assert list(frame) == [t.name for t in spec.receives]
        for t in spec.receives:
            t.check(frame[t.name])
        frame = run_stage(load_program(artifact.data), spec, frame)
        assert list(frame) == [t.name for t in spec.sends]
        for t in spec.sends:
            t.check(frame[t.name])
    return frame


@pytest.fixture(scope="module", params=list(SAMPLES))
def model_split(request: pytest.FixtureRequest, sample_exported) -> tuple:
    sample = sample_exported(request.param)
    layer_graph = build_layer_graph(sample.model.program)
    plan = three_stage_plan(sample.model, layer_graph)
    return sample, layer_graph, plan, split(plan, layer_graph)


def test_three_stages_chained_reproduce_the_model(model_split) -> None:
    sample, layer_graph, plan, artifacts = model_split
    assert len(artifacts) == 3
    assert [(a.spec.start, a.spec.end) for a in artifacts] == [
        (s.start, s.end) for s in plan.stages
    ]
    assert artifacts[0].spec.start == 0 and artifacts[-1].spec.end == layer_graph.num_layers
    assert all(a.spec.start < a.spec.end for a in artifacts)
    assert [a.spec.node for a in artifacts] == ["node-0", "node-1", "node-2"]
    for artifact, stage in zip(artifacts, plan.stages, strict=True):
        assert artifact.spec.artifact_sha256 == sha256(artifact.data)
        assert artifact.spec.receives == stage.receives
        assert artifact.spec.sends == stage.sends
        assert set(artifact.spec.inputs) <= {t.name for t in artifact.spec.receives}
    frame = run_chain(artifacts, layer_graph, sample.inputs)
    assert list(frame) == list(layer_graph.user_outputs)
    got = [frame[name] for name in layer_graph.user_outputs]
    for g, want in zip(got, sample.expected, strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


def test_artifacts_hold_no_pickled_code(model_split) -> None:
    for artifact in model_split[3]:
        with zipfile.ZipFile(io.BytesIO(artifact.data)) as archive:
            names = archive.namelist()
            assert any(n.endswith("models/model.json") for n in names)
            assert not [n for n in names if n.endswith(".pkl") or "data.pkl" in n]
            for name in names:
                body = archive.read(name)
                if name.endswith("_config.json"):  # weights and constants: raw tensors
                    config = json.loads(body)["config"]
                    assert not [k for k, v in config.items() if v.get("use_pickle")]
                elif body.startswith(b"PK"):  # the example inputs: tensors only
                    torch.load(io.BytesIO(body), weights_only=True)


def test_skip_tensor_rides_through_the_middle_stage(sample_exported) -> None:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    plan = three_stage_plan(sample.model, layer_graph)
    first, middle, last = split(plan, layer_graph)
    (stem,) = [layer for layer in layer_graph.layers if layer.name == "stem"]
    assert stem.index < middle.spec.start
    (skip,) = [t.name for t in first.spec.outputs
               if layer_graph.last_use[t.name] >= last.spec.start]
    assert skip in {t.name for t in middle.spec.receives}
    assert skip in {t.name for t in middle.spec.sends}
    assert skip not in {t.name for t in middle.spec.outputs}
    assert skip not in middle.spec.inputs
    assert skip in last.spec.inputs


def test_stage_artifact_with_markers_loads_in_a_fresh_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = model_zoo.PipeSplit().eval()
    path = tmp_path / "pipe.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(module, (torch.randn(2, 16),)), path)
    model = load_model(path)
    layer_graph = build_layer_graph(model.program, MARKERS)
    artifacts = split(three_stage_plan(model, layer_graph), layer_graph)
    assert len(artifacts) == 3
    frame = run_chain(artifacts, layer_graph, model.example_inputs)
    with torch.no_grad():
        want = module(*model.example_inputs)
    torch.testing.assert_close(frame[layer_graph.user_outputs[0]], want, atol=1e-5, rtol=0)
    stage = tmp_path / "stage0.pt2"
    stage.write_bytes(artifacts[0].data)
    assert b"torch.ops.pippy._pipe_split" in artifacts[0].data
    script = f"""
        from pathlib import Path
        import torch
        from partition.artifact import load_program
        runner = load_program(Path({str(stage)!r}).read_bytes())
        (out,) = runner(torch.ones(2, 16))
        print(tuple(out.shape))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(2, 16)"


def test_inception_branches_reordered_split_and_reproduce_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = model_zoo.Inception().eval()
    path = tmp_path / "inception.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(module, (torch.randn(1, 8, 16, 16),)), path)
    model = load_model(path)
    layer_graph = build_layer_graph(model.program, 2)
    position = {n.name: k for k, n in enumerate(model.program.graph.nodes)}
    program_order = sorted(range(layer_graph.num_layers),
                           key=lambda k: position[layer_graph.layers[k].ops[0]])
    assert layer_graph.layers[program_order[0]].name == "wide.0"
    assert program_order != list(range(layer_graph.num_layers))
    flow = layer_graph.value_flow()
    chosen, naive = flow.boundary_bytes(), flow.boundary_bytes(program_order)
    assert (chosen == layer_graph.boundary_bytes()).all()
    assert chosen.sum() < naive.sum() and chosen[1:-1].max() < naive[1:-1].max()
    with torch.no_grad():
        want = module(*model.example_inputs)
    cheapest = 1 + int(chosen[1:-1].argmin())
    count = layer_graph.num_layers
    for cuts in ([0, cheapest, count], [0, count // 3, 2 * count // 3, count]):
        artifacts = split(cut_plan(model, layer_graph, cuts), layer_graph)
        frame = run_chain(artifacts, layer_graph, model.example_inputs)
        torch.testing.assert_close(frame[layer_graph.user_outputs[0]], want, atol=1e-5, rtol=0)


def test_load_program_refuses_what_is_not_an_artifact() -> None:
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_program(b"PK\x03\x04 not really a zip")

"""Weight quantization per stage: quantized stages stay close to float32, their artifacts
shrink, hold only int8/uint8 weights and ATen ops, and load like any archive: no pickle."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import crafted_archives
import pytest
import torch
from crafted_archives import KINDS

from partition.archive_entries import read_entries
from partition.artifact import ProgramRunner, load_program
from partition.cluster import parse_cluster
from partition.cost_builder import build_cost_model
from partition.errors import ModelLoadError
from partition.layers import LayerGraph, build_layer_graph
from partition.modules import build_range_module
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.quantize import (
    WeightFormat,
    WeightUse,
    dequantized_bytes,
    layer_param_bytes,
    lookup_int4,
    quantize_module,
    quantized_range_module,
    quantized_weights,
    weight_bytes,
)
from partition.split import split

# Largest ||quantized - float32|| / ||float32|| of any stage output, on random weights: int4
# rounds each weight with about 8% relative noise (int8: 0.7%), and ResNet's dozen convolutions
# in a row add it up to about 21% (int8: 1.5%).
TOLERANCE = {WeightFormat.INT8: 0.03, WeightFormat.INT4: 0.3}
QUANTIZED = (WeightFormat.INT8, WeightFormat.INT4)


@pytest.fixture(scope="module")
def one_stage(sample_exported, sample_mlp) -> Callable[[str, WeightFormat], tuple[Plan, bytes]]:
    """``one_stage(name, fmt)``: the whole model as one stage on a node with ``quantize:
    fmt``, its plan and its artifact."""
    made: dict[tuple[str, WeightFormat], tuple[Plan, bytes]] = {}

    def get(name: str, fmt: WeightFormat) -> tuple[Plan, bytes]:
        if (name, fmt) not in made:
            model = (sample_mlp if name == "mlp" else sample_exported(name)).model
            layer_graph = build_layer_graph(model.program)
            cluster = parse_cluster({"nodes": [
                {"name": "n", "address": "127.0.0.1:1", "memory": "4GiB", "quantize": fmt.value}
            ]}, "test cluster")
            profile = profile_layers(layer_graph, model.sha256, model.example_inputs,
                                     repeats=1, warmup=0)
            cost = build_cost_model(layer_graph, cluster, {"n": profile})
            plan = plan_from_schedule(
                model, layer_graph, cluster, cost,
                evaluate(cost, [Span(0, 0, layer_graph.num_layers)]), Objective.THROUGHPUT,
                exact=False, lower_bound_s=0.0,
            )
            [artifact] = split(plan, layer_graph)
            made[name, fmt] = plan, artifact.data
        return made[name, fmt]

    return get


def relative_error(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.value)
@pytest.mark.parametrize("name", ["mlp", "gpt2", "resnet"])
def test_a_quantized_stage_stays_close_to_float32(
    name: str, fmt: WeightFormat, one_stage, sample_exported, sample_mlp
) -> None:
    model = (sample_mlp if name == "mlp" else sample_exported(name)).model
    plan, data = one_stage(name, fmt)
    assert plan.stages[0].weights is fmt
    reference = ProgramRunner(model.program)(*model.example_inputs)
    with torch.no_grad():
        got = load_program(data)(*model.example_inputs)
    error = relative_error(got, reference)
    assert 0 < error < TOLERANCE[fmt], f"{name} {fmt.value}: relative error {error:.3g}"


def test_int8_weights_take_under_30_percent_of_float32(one_stage) -> None:
    plan_f32, float32 = one_stage("mlp", WeightFormat.NONE)
    plan_int8, int8 = one_stage("mlp", WeightFormat.INT8)
    plan_int4, int4 = one_stage("mlp", WeightFormat.INT4)
    assert len(int8) <= 0.30 * len(float32)
    assert len(int4) < len(int8)
    # The plan's figure is the artifact's weights; the archive adds its graph (about 1 KB a
    # node, 10 more nodes per int4 weight) and its example inputs (16 KiB here).
    for plan, data in ((plan_f32, float32), (plan_int8, int8), (plan_int4, int4)):
        assert 0 < len(data) - plan.stages[0].artifact_bytes < 128 * 1024


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.value)
def test_the_artifact_holds_quantized_weights_and_aten_ops_only(fmt, one_stage) -> None:
    _, data = one_stage("resnet", fmt)
    entries = read_entries(data, "test")
    dtypes = {tensor.dtype for tensor in entries.state_dict.values()}
    assert (torch.int8 if fmt is WeightFormat.INT8 else torch.uint8) in dtypes
    assert not any(t.dim() == 4 and t.is_floating_point() for t in entries.state_dict.values())
    program = load_program(data)._graph
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(target.startswith("aten.") for target in targets), targets


def test_a_quantized_artifact_loads_without_pickle(
    one_stage, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, data = one_stage("gpt2", WeightFormat.INT4)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    load_program(data)


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_quantized_artifact_is_refused_without_running_code(
    kind: str, one_stage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    crafted_archives.write_marker_module(tmp_path, marker)
    monkeypatch.syspath_prepend(str(tmp_path))
    _, data = one_stage("mlp", WeightFormat.INT8)
    with pytest.raises(ModelLoadError) as caught:
        load_program(KINDS[kind].make(data, marker))
    assert KINDS[kind].names in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", QUANTIZED, ids=lambda f: f.value)
@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_planned_weight_bytes_are_the_buffers_the_pass_stores(
    name: str, fmt: WeightFormat, sample_exported
) -> None:
    layer_graph: LayerGraph = build_layer_graph(sample_exported(name).model.program)
    module = build_range_module(layer_graph, 0, layer_graph.num_layers).module
    quantized = quantize_module(module, fmt)
    stored = sum(t.nbytes for t in quantized.state_dict().values())
    used = {name for layer in layer_graph.layers for name in layer.params}
    sizes, float_sizes = weight_bytes(layer_graph, fmt), weight_bytes(layer_graph,
                                                                      WeightFormat.NONE)
    assert stored == sum(sizes[name] for name in used)
    assert stored < sum(float_sizes[name] for name in used)
    assert quantized_weights(layer_graph.program)  # something was quantized
    assert quantize_module(module, WeightFormat.NONE) is module
    per_layer, float32 = (layer_param_bytes(layer_graph, f) for f in (fmt, WeightFormat.NONE))
    assert float32.tolist() == [layer.param_bytes for layer in layer_graph.layers]
    assert (per_layer <= float32).all() and per_layer.sum() < float32.sum()


def test_embedding_tables_are_looked_up_quantized_not_rebuilt(sample_exported) -> None:
    layer_graph = build_layer_graph(sample_exported("gpt2").model.program)
    uses = quantized_weights(layer_graph.program)
    assert uses["wte.weight"] is WeightUse.TABLE and uses["wpe.weight"] is WeightUse.TABLE
    assert uses["h.0.mlp.c_fc.weight"] is WeightUse.IN_FIRST  # GPT-2's Conv1D: addmm
    embeddings = build_range_module(layer_graph, 0, 2)  # wte, wpe
    quantized = quantize_module(embeddings.module, WeightFormat.INT4)
    targets = [n.target for n in quantized.graph.nodes if n.op == "call_function"]
    assert targets.count(lookup_int4) == 2 and torch.ops.aten.embedding.default not in targets
    assert dequantized_bytes(layer_graph, WeightFormat.INT4)[0] == 0  # no table rebuilt


def test_weights_used_otherwise_stay_float() -> None:
    class Shared(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 64)
            self.other = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.linear.weight.sum() + self.other(x)

    module = Shared().eval()
    program = torch.export.export(module, (torch.randn(2, 64),))
    assert set(quantized_weights(program)) == {"other.weight"}


def test_the_error_measuring_copy_runs_on_named_tensors(sample_exported) -> None:
    model = sample_exported("skip_dag").model
    layer_graph = build_layer_graph(model.program)
    float32 = build_range_module(layer_graph, 1, 3)
    int8 = quantized_range_module(layer_graph, 1, 3, WeightFormat.INT8)
    assert (int8.inputs, int8.outputs) == (float32.inputs, float32.outputs)
    env = {name: torch.randn(layer_graph.values[name].shape) for name in float32.inputs}
    with torch.no_grad():
        want, got = float32(env), int8(env)
    assert 0 < relative_error(tuple(got.values()), tuple(want.values())) < 0.02

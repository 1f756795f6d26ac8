"""Measuring compression errors on calibration inputs, and choosing compression with the split.

The planner measures with the runtime's codec (:mod:`partition.compression`) and weight
formats (:mod:`partition.quantize`); the error meter's own tests alter tensors with in-test
maps (float16 by a cast, int8 by rounding to 256 levels).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from coordinator.calibration import read_calibration
from partition import compression_choice, compression_planning
from partition.compression import LinkEncoding, encoded_bytes
from partition.compression_choice import (
    ErrorMeter,
    WeightOffer,
    calibration_inputs,
    link_choices,
)
from partition.compression_planning import CompressionRequest, CompressMode, choose
from partition.costs import CostModel
from partition.errors import AccuracyBudgetError, EdgesplitError, PlanningError
from partition.layers import build_layer_graph
from partition.plan import Accuracy, Objective
from partition.quantize import WeightFormat


def half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float() if t.dtype == torch.float32 else t


def levels(t: torch.Tensor) -> torch.Tensor:
    """int8 stand-in: 256 levels between the tensor's min and max."""
    if t.dtype != torch.float32:
        return t
    low, high = float(t.min()), float(t.max())
    scale = (high - low) / 255 or 1.0
    return torch.round((t - low) / scale) * scale + low


@pytest.fixture
def skip_dag(sample_exported):
    sample = sample_exported("skip_dag")
    inputs = calibration_inputs(sample.model, 3)
    return sample, build_layer_graph(sample.model.program), inputs


def test_errors_alone_match_the_eager_model(skip_dag) -> None:
    sample, layer_graph, inputs = skip_dag
    meter = ErrorMeter(layer_graph, inputs)
    assert meter.link_error(2, lambda t: t) == 0.0
    with torch.no_grad():
        reference = [sample.module(*x) for x in inputs]
        perturbed = [sample.module(levels(x[0])) for x in inputs]
    scale = max(float(r.abs().max()) for r in reference)
    expected = max(float((p - r).abs().max()) for p, r in zip(perturbed, reference, strict=True))
    assert meter.link_error(0, levels) == pytest.approx(expected / scale, rel=1e-4, abs=1e-7)
    for b in range(layer_graph.num_layers + 1):
        assert 0 < meter.link_error(b, half) < meter.link_error(b, levels) < 0.1


def test_weight_errors_alone(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    meter = ErrorMeter(layer_graph, inputs)
    assert meter.layer_error(1, WeightFormat.NONE) == 0.0
    assert meter.layer_error(1, WeightFormat.INT4) > meter.layer_error(1, WeightFormat.INT8) > 0
    together = meter.accuracy({}, {1: WeightFormat.INT4, 2: WeightFormat.INT4}, 0.0, 1.0)
    assert together.max_rel_error > 0 and together.top1_agreement is not None


def test_link_choices_price_the_runtime_codec(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    meter = ErrorMeter(layer_graph, inputs)
    offered = (LinkEncoding.BF16, LinkEncoding.INT8_CHANNEL)
    links = link_choices(meter, layer_graph, offered, raw=False)
    assert links.names == ("bf16", "int8-channel")
    for b in range(layer_graph.num_layers + 1):
        for k, encoding in enumerate(offered):
            specs = layer_graph.boundary_tensors(b)
            assert links.nbytes[b, k] == sum(encoded_bytes(s, encoding) for s in specs)
            assert links.encode_s[b, k] > 0 and links.decode_s[b, k] > 0
            assert 0 < links.error[b, k] < 0.1


def test_accuracy_of_everything_together(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    meter = ErrorMeter(layer_graph, inputs)
    exact = meter.accuracy({}, {}, 0.0, 0.1)
    assert exact == Accuracy(3, 0.0, 0.0, 0.0, 0.1, top1_agreement=1.0)
    both = meter.accuracy({1: levels, 3: levels}, {}, 0.0, 0.1)
    alone = max(meter.link_error(1, levels), meter.link_error(3, levels))
    assert both.max_rel_error >= alone * 0.5 and both.max_abs_error > 0
    assert 0.0 <= both.top1_agreement <= 1.0 and both.next_token_agreement is None


def test_next_token_agreement_for_a_language_model(sample_exported) -> None:
    sample = sample_exported("gpt2")
    layer_graph = build_layer_graph(sample.model.program)
    meter = ErrorMeter(layer_graph, calibration_inputs(sample.model, 1))
    accuracy = meter.accuracy({layer_graph.num_layers // 2: levels}, {}, 0.0, 1.0)
    assert accuracy.top1_agreement is None and 0 < accuracy.next_token_agreement <= 1


def test_calibration_file(skip_dag, tmp_path) -> None:
    sample, _, inputs = skip_dag
    good, bad = tmp_path / "calib.pt", tmp_path / "bad.pt"
    torch.save([x[0] for x in inputs], good)
    assert all(torch.equal(a[0], b[0])
               for a, b in zip(read_calibration(good, sample.model), inputs, strict=True))
    torch.save([torch.zeros(2, 2)], bad)
    with pytest.raises(EdgesplitError, match=r"^--calibration .* input \[0\] does not fit"):
        read_calibration(bad, sample.model)


def two_nodes(layer_graph, bandwidth: float) -> CostModel:
    """Inputs arrive on a, results are needed on b; a is far slower, so b computes."""
    layers = layer_graph.num_layers
    return CostModel(
        node_names=("a", "b"),
        layer_seconds=np.array([[1.0] * layers, [1e-3] * layers]),
        boundary_bytes=layer_graph.boundary_bytes(),
        stage_memory_bytes=np.zeros((layers + 1, layers + 1)),
        node_memory_bytes=np.array([1, 1]),
        link_bytes_per_s=np.array([[np.inf, bandwidth], [bandwidth, np.inf]]),
        link_latency_s=np.zeros((2, 2)),
        source=0, sink=1,
    )


@pytest.mark.parametrize("objective", list(Objective))
def test_auto_compresses_a_slow_link_and_not_a_fast_one(skip_dag, objective) -> None:
    _, layer_graph, inputs = skip_dag
    request = CompressionRequest(CompressMode.AUTO, tuple(inputs), max_error=0.05)
    slow = choose(two_nodes(layer_graph, 1e4), layer_graph, objective, request)
    assert slow.encodings[0] != LinkEncoding.RAW and slow.result.schedule.spans[0].node == 1
    assert 0 < slow.accuracy.max_rel_error <= 0.05
    fast = choose(two_nodes(layer_graph, 1e12), layer_graph, objective, request)
    assert set(fast.encodings) == {LinkEncoding.RAW}
    assert fast.accuracy.max_rel_error == 0.0


def test_a_tight_budget_leaves_the_links_raw(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    request = CompressionRequest(CompressMode.AUTO, tuple(inputs), max_error=1e-9)
    chosen = choose(two_nodes(layer_graph, 1e4), layer_graph, Objective.LATENCY, request)
    assert set(chosen.encodings) == {LinkEncoding.RAW}


def test_a_fixed_encoding_over_the_budget_is_refused(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    request = CompressionRequest(CompressMode.INT8, tuple(inputs), max_error=1e-6)
    with pytest.raises(AccuracyBudgetError, match=(
        r"^with --compress int8 the plan's outputs differ from float32 by \S+ relative \(max "
        r"absolute \S+, top-1 agreement \S+%\) on 3 calibration inputs, more than --max-error "
        r"1e-06; raise --max-error or use --compress auto$"
    )):
        choose(two_nodes(layer_graph, 1e12), layer_graph, Objective.LATENCY, request)


def test_a_plan_over_the_budget_is_searched_again_without_its_worst_encoding(
    skip_dag, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first check reports the errors compounding; the worst encoding is withheld."""
    _, layer_graph, inputs = skip_dag
    checks, searches = [], []
    real_accuracy, real_optimize = ErrorMeter.accuracy, compression_planning.optimize

    def compounding(self, links, layers, bound, budget):
        checks.append(bound)
        found = real_accuracy(self, links, layers, bound, budget)
        return found if len(checks) > 1 else Accuracy(3, 1.0, math.inf, bound, budget)

    def recorded(cost, objective):
        searches.append((cost, real_optimize(cost, objective).schedule))
        return real_optimize(cost, objective)

    monkeypatch.setattr(compression_choice.ErrorMeter, "accuracy", compounding)
    monkeypatch.setattr(compression_planning, "optimize", recorded)
    request = CompressionRequest(CompressMode.AUTO, tuple(inputs), max_error=0.05)
    chosen = choose(two_nodes(layer_graph, 1e4), layer_graph, Objective.LATENCY, request)
    assert len(checks) == len(searches) == 2 and chosen.accuracy.max_rel_error <= 0.05
    (cost, first), (again, second) = searches
    links = cost.compression.links
    cuts = [0, *(s.end for s in first.spans)]
    used = [(links.error[b, e - 1], b, e) for b, e in zip(cuts, first.encodings, strict=True) if e]
    _, b, e = max(used)
    assert math.isinf(again.compression.links.nbytes[b, e - 1])
    assert (b, e) not in zip([0, *(s.end for s in second.spans)], second.encodings, strict=True)


@pytest.mark.parametrize("memory, quantize", [(1e9, False), (0.6, True)])
def test_weight_formats_are_chosen_when_memory_needs_them(skip_dag, memory, quantize) -> None:
    """Node b holds a full-precision stage only with ample memory (stage memory is 1 a layer,
    0.5 quantized); the quantized layers are a little slower."""
    _, layer_graph, inputs = skip_dag
    cost = two_nodes(layer_graph, 1e12)
    layers = layer_graph.num_layers
    span = np.arange(layers + 1)[None, :] - np.arange(layers + 1)[:, None]
    per_stage = np.maximum(span, 0).astype(float) / layers
    cost = CostModel(**{**cost.__dict__, "stage_memory_bytes": per_stage,
                        "node_memory_bytes": np.array([0.0, memory])})
    offer = WeightOffer((WeightFormat.INT8,), np.asarray(cost.layer_seconds)[None] * 1.1,
                        per_stage[None] / 2)
    request = CompressionRequest(CompressMode.NONE, tuple(inputs), 0.05, weights=offer)
    chosen = choose(cost, layer_graph, Objective.LATENCY, request)
    assert [s.node for s in chosen.result.schedule.spans] == [1]
    assert chosen.formats == ((WeightFormat.INT8,) if quantize else (WeightFormat.NONE,))
    assert (chosen.accuracy.max_rel_error > 0) == quantize
    assert chosen.accuracy.max_rel_error <= 0.05
    assert chosen.accuracy.error_bound == pytest.approx(
        chosen.cost.compression.weights.layer_error.sum() if quantize else 0.0)


def test_weight_formats_need_a_searched_budget(skip_dag) -> None:
    _, layer_graph, inputs = skip_dag
    cost = two_nodes(layer_graph, 1e12)
    offer = WeightOffer((WeightFormat.INT8,), np.asarray(cost.layer_seconds)[None],
                        np.asarray(cost.stage_memory_bytes)[None])
    request = CompressionRequest(CompressMode.FP16, tuple(inputs), 0.05, weights=offer)
    with pytest.raises(PlanningError, match="only with --compress auto or none"):
        choose(cost, layer_graph, Objective.LATENCY, request)


def test_a_nodes_own_weight_format_is_checked_end_to_end(skip_dag) -> None:
    """Option 0 keeps the node's ``quantize``: no error in the search, measured in the check."""
    _, layer_graph, inputs = skip_dag
    cost = two_nodes(layer_graph, 1e12)
    own = (WeightFormat.INT4, WeightFormat.INT4)
    request = CompressionRequest(CompressMode.AUTO, tuple(inputs), 0.5)
    chosen = choose(cost, layer_graph, Objective.LATENCY, request, own)
    assert chosen.formats == (WeightFormat.INT4,) and chosen.accuracy.error_bound == 0.0
    assert chosen.accuracy.max_rel_error > 0
    tight = CompressionRequest(CompressMode.AUTO, tuple(inputs), 1e-9)
    with pytest.raises(AccuracyBudgetError, match=r"raise --max-error or set a finer `quantize`"):
        choose(cost, layer_graph, Objective.LATENCY, tight, own)

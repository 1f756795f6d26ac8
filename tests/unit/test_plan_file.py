"""The plan file apart from the planner, and finding a plan's model again for its stages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from partition.cluster import ClusterSpec, LinkSpec, MediumSpec, NodeSpec
from partition.errors import ModelLoadError, ModelMismatchError, PlanFormatError
from partition.layers import build_layer_graph
from partition.plan import Accuracy, Objective, Plan, PlannedMedium
from partition.replan_inputs import read_replan_inputs, replan_inputs
from partition.split import plan_layer_graph

REPO = Path(__file__).resolve().parents[2]


def test_the_runtime_reads_plans_without_importing_the_optimizer() -> None:
    code = ("import sys, coordinator.pipeline, coordinator.deploy, coordinator.deploy_command; "
            "print(sorted(m for m in sys.modules if m in "
            "('partition.optimizer', 'partition.planning', 'partition.baselines')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == "[]"


def _plan_of(sample) -> Plan:
    """A plan (without stages) for ``sample``'s file and layers."""
    layer_graph = build_layer_graph(sample.model.program)
    return Plan(sample.model.sha256, str(sample.path), layer_graph.granularity,
                tuple(layer.name for layer in layer_graph.layers), (), (), Objective.THROUGHPUT,
                "src", "src", {}, (), (), 1.0, 1.0, True, 1.0)


def test_plan_layer_graph_finds_the_plans_layers(sample_exported) -> None:
    plan = _plan_of(sample_exported("skip_dag"))
    assert tuple(layer.name for layer in plan_layer_graph(plan).layers) == plan.layer_names


def test_a_missing_model_file_is_a_model_error_not_a_plan_error(
    sample_exported, tmp_path: Path
) -> None:
    plan = replace(_plan_of(sample_exported("skip_dag")), model_path=str(tmp_path / "gone.pt2"))
    with pytest.raises(ModelLoadError, match="does not exist here") as caught:
        plan_layer_graph(plan)
    assert not isinstance(caught.value, PlanFormatError)


def test_another_model_file_or_other_layers_are_refused(sample_exported) -> None:
    skip_dag = sample_exported("skip_dag")
    plan = _plan_of(skip_dag)
    with pytest.raises(ModelMismatchError, match="SHA-256 differs"):
        plan_layer_graph(plan, str(sample_exported("resnet").path))
    with pytest.raises(ModelMismatchError, match="layers differ"):
        plan_layer_graph(replace(plan, layer_names=plan.layer_names[:-1]))


def test_accuracy_is_optional_and_round_trips(sample_exported, tmp_path: Path) -> None:
    plan = _plan_of(sample_exported("skip_dag"))
    data = {**plan.to_dict(), "nodes": [{"name": "src", "address": "a:1"}],
            "stages": [_stage(len(plan.layer_names))],
            "links": [{"from": "src", "to": "src", "bytes_per_s": 1.0, "latency_s": 0.0,
                       "encoding": "raw"}] * 2}
    assert "accuracy" not in data and Plan.from_dict(data).accuracy is None
    accuracy = Accuracy(4, 0.5, 0.01, 0.012, 0.02, top1_agreement=0.75)
    data["accuracy"] = accuracy.to_dict()
    assert Plan.from_dict(data).accuracy == accuracy
    data["accuracy"] = {**accuracy.to_dict(), "max_rel_error": -1}
    with pytest.raises(PlanFormatError, match=r"accuracy\.max_rel_error \(-1\) must be a "
                                              "non-negative number"):
        Plan.from_dict(data)


def test_media_are_optional_and_round_trip(sample_exported) -> None:
    plan = _plan_of(sample_exported("skip_dag"))
    data = {**plan.to_dict(), "nodes": [{"name": "src", "address": "a:1"}],
            "stages": [_stage(len(plan.layer_names))],
            "links": [{"from": "src", "to": "src", "bytes_per_s": 1.0, "latency_s": 0.0,
                       "encoding": "raw"}] * 2}
    assert "media" not in data and Plan.from_dict(data).media == ()
    wifi = PlannedMedium("wifi", 2.5e6, ("src",), 0.125)
    data["media"] = [wifi.to_dict()]
    assert Plan.from_dict(data).media == (wifi,)
    assert Plan.from_dict(data).to_dict()["media"] == data["media"]
    data["media"] = [{**wifi.to_dict(), "nodes": ["src", "phone"]}]
    with pytest.raises(PlanFormatError, match=r"media\[0\]\.nodes\[1\] \('phone'\) is not one "
                                              "of nodes"):
        Plan.from_dict(data)
    data["media"] = [{**wifi.to_dict(), "bytes_per_s": 0}]
    with pytest.raises(PlanFormatError, match=r"media\[0\]\.bytes_per_s \(0\.0\) must be "
                                              "positive"):
        Plan.from_dict(data)


def test_the_median_latency_round_trips_and_older_plans_read_the_mean(sample_exported) -> None:
    plan = replace(_plan_of(sample_exported("skip_dag")), latency_s=0.25, latency_p50_s=0.125)
    data = {**plan.to_dict(), "nodes": [{"name": "src", "address": "a:1"}],
            "stages": [_stage(len(plan.layer_names))],
            "links": [{"from": "src", "to": "src", "bytes_per_s": 1.0, "latency_s": 0.0,
                       "encoding": "raw"}] * 2}
    assert data["predicted"]["latency_p50_s"] == 0.125
    assert Plan.from_dict(data).latency_p50_s == 0.125
    older = {**data, "predicted": {k: v for k, v in data["predicted"].items()
                                   if k != "latency_p50_s"}}
    assert Plan.from_dict(older).latency_p50_s == 0.25
    assert Plan.from_dict(older).to_dict()["predicted"]["latency_p50_s"] == 0.25
    data["predicted"] = {**data["predicted"], "latency_p50_s": "fast"}
    with pytest.raises(PlanFormatError, match=r"predicted\.latency_p50_s \('fast'\) must be a "
                                              "non-negative number"):
        Plan.from_dict(data)


def test_replan_inputs_keep_the_media() -> None:
    cluster = ClusterSpec(
        (NodeSpec("a", "h:1", 10), NodeSpec("b", "h:2", 10)), LinkSpec(1e6, 0.0), {}, "a", "b",
        media=(MediumSpec("wifi", 2e6, ("a", "b")),))
    assert read_replan_inputs(replan_inputs(cluster, {})).cluster == cluster
    older = replan_inputs(cluster, {})
    del older["cluster"]["media"]  # written before media: none
    assert read_replan_inputs(older).cluster.media == ()


def _stage(layers: int) -> dict:
    return {"index": 0, "node": "src", "address": "a:1", "start": 0, "end": layers,
            "first_layer": "a", "last_layer": "b", "receives": [], "sends": [],
            "compute_s": 0.0, "transfer_in_s": 0.0, "memory_bytes": 0,
            "memory_available_bytes": 0}

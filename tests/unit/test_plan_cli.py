"""`coordinator plan` on the sample architectures and the example clusters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from coordinator.bench import BENCH_CONCURRENCY, BenchResult
from coordinator.bench_check import CheckedRun
from coordinator.bench_command import checked_table, prediction_table
from coordinator.cli import main
from coordinator.console import ms
from coordinator.plan_tables import totals_line
from coordinator.plot import pipeline_timeline
from partition.cluster import WORKER_OVERHEAD_BYTES
from partition.cost_builder import stage_memory_matrix
from partition.layers import build_layer_graph
from partition.plan import Plan
from partition.profiler import Profile
from partition.quantize import WeightFormat

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CLUSTERS = sorted(EXAMPLES.glob("cluster-*.yaml"))
ARCHITECTURES = ["resnet", "mobilenet_v2", "gpt2", "bert", "vit"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_plan_works_on_every_example_cluster(
    architecture: str, sample_exported, tmp_path: Path, capsys
) -> None:
    sample = sample_exported(architecture)
    assert len(CLUSTERS) == 4
    for cluster in CLUSTERS:
        out = tmp_path / f"{cluster.stem}.json"
        code = main(["plan", str(sample.path), "--nodes", str(cluster), "-o", str(out),
                     "--repeats", "2"])
        assert code == 0, capsys.readouterr().err
        plan = Plan.load(out)
        assert plan.model_sha256 == sample.model.sha256
        assert plan.stages[0].start == 0 and plan.stages[-1].end == len(plan.layer_names)
        for before, after in zip(plan.stages, plan.stages[1:], strict=False):
            assert before.end == after.start and before.sends == after.receives
        assert "DADS min cut" in {baseline.name for baseline in plan.baselines}
        for baseline in plan.baselines:  # exact: never worse than a rule that fits
            if baseline.fits:
                assert plan.throughput_per_s >= baseline.throughput_per_s * (1 - 1e-9)
        assert [m.name for m in plan.media] == (["wifi"] if "wifi" in cluster.stem else [])
    printed = capsys.readouterr().out
    assert "baselines on the same cost model" in printed and "predicted: latency" in printed
    assert "DADS min cut" in printed and "shared media (busy time per request)" in printed


def test_plan_writes_a_versioned_json_and_a_picture(
    sample_exported, tmp_path: Path, capsys
) -> None:
    sample = sample_exported("skip_dag")
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    assert main(["plan", str(sample.path), "--nodes", str(EXAMPLES / "cluster-heterogeneous.yaml"),
                 "-o", str(out), "--plot", str(png), "--objective", "latency",
                 "--repeats", "2"]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "edgesplit.plan/2" and data["objective"] == "latency"
    assert {n["name"] for n in data["nodes"]} == {"camera", "gateway", "jetson", "laptop"}
    assert len(data["links"]) == len(data["stages"]) + 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = Plan.load(out)
    loaded = max(plan.latency_s, BENCH_CONCURRENCY * plan.bottleneck_s)
    assert f"{ms(loaded)} ms with {BENCH_CONCURRENCY} in flight" in capsys.readouterr().out
    measured = BenchResult(latency_p50_s=1.0, latency_p95_s=1.0, throughput_per_s=1.0,
                           requests=10, concurrency=3, loaded_latency_p50_s=1.0)
    rows = table_rows(prediction_table(plan, measured))
    assert rows["latency p50 ms, 3 in flight"][1] == ms(plan.latency_under_load(3))
    assert plan.latency_p50_s == plan.latency_s  # one node a stage: one path
    assert rows["latency p50 ms, 1 in flight"][1] == ms(plan.latency_s)
    assert "p50" not in totals_line(plan)
    # Replicated, a measured p50 is compared with the median over the paths.
    dealt = dataclasses.replace(plan, latency_p50_s=plan.latency_s / 2)
    rows = table_rows(prediction_table(dealt, measured))
    assert rows["latency p50 ms, 1 in flight"][1] == ms(plan.latency_s / 2)
    assert rows["latency p95 ms, 1 in flight"][1] == ms(plan.latency_s)
    assert dealt.latency_under_load(1) == plan.latency_s / 2
    assert (f"latency {ms(plan.latency_s)} ms alone on average, p50 {ms(plan.latency_s / 2)} ms"
            in totals_line(dealt))
    checked = CheckedRun(requests=2, answered=2, elapsed_s=1.0, latencies_s=[0.1, 0.3],
                         finished_at=[0.6, 1.0])
    table = checked_table(checked, False, plan.latency_under_load(2))
    assert {c.header: next(iter(c.cells)) for c in table.columns}["predicted p50 ms"] == ms(
        plan.latency_under_load(2))


def table_rows(table) -> dict[str, list[str]]:
    """A rich table's cells by the first column's text."""
    columns = [list(column.cells) for column in table.columns]
    return {row[0]: row[1:] for row in zip(*columns, strict=True)}


def test_timeline_never_runs_two_requests_on_one_resource_at_once(
    sample_exported, tmp_path: Path
) -> None:
    sample = sample_exported("bert")
    out = tmp_path / "plan.json"
    assert main(["plan", str(sample.path), "--nodes", str(EXAMPLES / "cluster-homogeneous.yaml"),
                 "-o", str(out), "--repeats", "2"]) == 0
    bars = pipeline_timeline(Plan.load(out), requests=5)
    by_resource: dict[str, list[tuple[float, float]]] = {}
    for resource, _, start, end in bars:
        by_resource.setdefault(resource, []).append((start, end))
    for spans in by_resource.values():
        spans.sort()
        assert all(a_end <= b_start + 1e-12 for (_, a_end), (b_start, _) in
                   zip(spans, spans[1:], strict=False))


def test_a_profile_file_of_another_model_is_refused(
    sample_exported, tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other.json"
    assert main(["profile", str(sample_exported("resnet").path), "--repeats", "2",
                 "--json", str(other)]) == 0
    Profile.load(other)
    code = main(["plan", str(sample_exported("skip_dag").path), "--nodes",
                 str(EXAMPLES / "cluster-heterogeneous.yaml"), "-o", str(tmp_path / "p.json"),
                 "--profile", f"camera={other}", "--repeats", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_profile_file_is_one_error_line(
    sample_exported, tmp_path: Path, capsys
) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    code = main(["plan", str(sample_exported("skip_dag").path), "--nodes",
                 str(EXAMPLES / "cluster-heterogeneous.yaml"), "-o", str(tmp_path / "p.json"),
                 "--profile", f"camera={broken}", "--repeats", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot read profile {broken}" in err and "coordinator profile" in err
    assert not (tmp_path / "p.json").exists()


def test_a_profile_file_for_an_unknown_node_is_refused(
    sample_exported, tmp_path: Path, capsys
) -> None:
    code = main(["plan", str(sample_exported("skip_dag").path), "--nodes",
                 str(EXAMPLES / "cluster-heterogeneous.yaml"), "--profile", "nope=x.json"])
    assert code == 2 and "NODE=FILE with NODE one of" in capsys.readouterr().err


def test_deploy_names_a_moved_model_file_and_the_option_to_use(
    sample_exported, tmp_path: Path, capsys
) -> None:
    moved = tmp_path / "model.pt2"
    moved.write_bytes(sample_exported("skip_dag").path.read_bytes())
    out = tmp_path / "plan.json"
    assert main(["plan", str(moved), "--nodes", str(EXAMPLES / "cluster-homogeneous.yaml"),
                 "-o", str(out), "--repeats", "2"]) == 0
    moved.rename(tmp_path / "elsewhere.pt2")
    capsys.readouterr()
    assert main(["deploy", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not exist here; pass it with --model" in err and len(err.splitlines()) == 1


def test_quantized_weights_fit_a_model_on_a_node_too_small_for_float32(
    sample_mlp, tmp_path: Path, capsys
) -> None:
    mlp = sample_mlp
    layer_graph = build_layer_graph(mlp.model.program)
    need = {fmt: int(stage_memory_matrix(layer_graph, fmt)[0, -1]) for fmt in WeightFormat}
    assert need[WeightFormat.INT4] < need[WeightFormat.INT8] < need[WeightFormat.NONE]
    # The node's memory for its stage, after the worker's own (not asked: the default).
    memory = (need[WeightFormat.INT8] + need[WeightFormat.NONE]) // 2

    def plan_with(node_quantize: str | None, *options: str) -> Plan | None:
        node = {"name": "box", "address": "127.0.0.1:50999",
                "memory": memory + WORKER_OVERHEAD_BYTES}
        nodes = tmp_path / "nodes.yaml"
        nodes.write_text(yaml.safe_dump({"nodes": [
            {**node, "quantize": node_quantize} if node_quantize else node
        ]}))
        out = tmp_path / "plan.json"
        code = main(["plan", str(mlp.path), "--nodes", str(nodes), "-o", str(out),
                     "--repeats", "2", *options])
        err = capsys.readouterr().err
        if code:
            assert code == 2 and "no plan fits" in err and len(err.strip().splitlines()) == 1
            refusals.append(err)
            return None
        return Plan.load(out)

    refusals: list[str] = []

    assert plan_with(None) is None
    assert plan_with("none", "--quantize-weights", "int8") is None  # the node's own wins
    for quantized in (plan_with(None, "--quantize-weights", "int8"), plan_with("int8")):
        [stage] = quantized.stages
        assert stage.weights is WeightFormat.INT8
        assert stage.memory_bytes == need[WeightFormat.INT8] <= memory
        assert quantized.replan["profiles"]["box"]["weights"] == "int8"  # priced quantized
        assert 0 < quantized.accuracy.max_rel_error <= quantized.accuracy.max_error  # measured
        assert stage.artifact_bytes < 0.3 * sum(
            layer.param_bytes for layer in layer_graph.layers
        )
    chosen = plan_with(None, "--compress", "auto", "--max-error", "0.5")  # the planner's pick
    [stage] = chosen.stages
    assert stage.weights in (WeightFormat.INT8, WeightFormat.INT4)
    assert stage.memory_bytes == need[stage.weights] <= memory
    assert 0 < chosen.accuracy.max_rel_error <= 0.5
    assert plan_with(None, "--compress", "auto", "--max-error", "1e-9") is None
    assert "within the error budget" in refusals[-1] and "raise --max-error" in refusals[-1]
    with pytest.raises(SystemExit):
        main(["plan", str(mlp.path), "--nodes", str(tmp_path / "nodes.yaml"),
              "--quantize-weights", "int3"])
    assert "--quantize-weights: invalid choice: 'int3'" in capsys.readouterr().err


def test_plan_chooses_compression_and_records_its_accuracy(
    sample_exported, tmp_path: Path, capsys
) -> None:
    sample = sample_exported("skip_dag")
    calibration = tmp_path / "calibration.pt"
    torch.save([torch.randn(4, 64) for _ in range(2)], calibration)
    out = tmp_path / "plan.json"
    assert main(["plan", str(sample.path), "--nodes", str(EXAMPLES / "cluster-heterogeneous.yaml"),
                 "-o", str(out), "--repeats", "2", "--compress", "auto", "--max-error", "0.02",
                 "--calibration", str(calibration)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy against float32 on 2 calibration input(s)" in printed
    plan = Plan.load(out)
    assert plan.accuracy.inputs == 2 and plan.accuracy.max_error == 0.02
    assert plan.accuracy.max_rel_error <= 0.02 and plan.accuracy.top1_agreement is not None
    assert json.loads(out.read_text())["accuracy"]["max_abs_error"] >= 0


def test_a_fixed_encoding_over_the_budget_is_one_error_line(
    sample_exported, tmp_path: Path, capsys
) -> None:
    out, nodes = tmp_path / "plan.json", tmp_path / "nodes.yaml"
    nodes.write_text(  # the camera is too slow to keep the model: tensors must cross a link
        "nodes:\n"
        "  - {name: camera, address: 127.0.0.1:1, memory: 1GiB, speed: 0.001}\n"
        "  - {name: box, address: 127.0.0.1:2, memory: 1GiB, speed: 1}\n"
        "links:\n  default: {bandwidth: 10Mbps, latency: 1ms}\n"
        "source: camera\nsink: camera\n"
    )
    code = main(["plan", str(sample_exported("skip_dag").path), "--nodes", str(nodes),
                 "-o", str(out), "--repeats", "2", "--compress", "int8", "--max-error", "1e-9"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "more than --max-error 1e-09; raise --max-error or use --compress auto" in err


def test_a_negative_error_budget_is_refused(sample_exported, capsys) -> None:
    code = main(["plan", str(sample_exported("skip_dag").path), "--nodes",
                 str(EXAMPLES / "cluster-heterogeneous.yaml"), "--max-error", "-1"])
    assert code == 2 and "--max-error must be a number >= 0" in capsys.readouterr().err


def test_a_plan_not_proven_optimal_prints_its_proven_gap(sample_exported, tmp_path: Path) -> None:
    sample = sample_exported("skip_dag")
    out = tmp_path / "plan.json"
    assert main(["plan", str(sample.path), "--nodes", str(EXAMPLES / "cluster-heterogeneous.yaml"),
                 "-o", str(out), "--repeats", "2"]) == 0
    plan = Plan.load(out)
    assert plan.exact and "optimal" not in totals_line(plan)
    bounded = dataclasses.replace(plan, exact=False, lower_bound_s=plan.bottleneck_s / 1.25)
    assert totals_line(bounded).endswith(
        f"(not proven optimal: bottleneck at most 25.00% above the optimum, which is >= "
        f"{plan.bottleneck_s / 1.25 * 1e3:.3f} ms)")
    unbounded = dataclasses.replace(plan, exact=False, lower_bound_s=0.0)
    assert totals_line(unbounded).endswith("no lower bound on the bottleneck was found)")

"""The profiler, its on-disk cache, and ``coordinator profile``."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from coordinator.cli import main
from coordinator.samples import SkipDag
from partition import profile_store, profiler
from partition.errors import ProfileFormatError, ProfileMismatchError
from partition.layers import build_layer_graph
from partition.profile_store import cache_dir, cached_profile
from partition.profiler import PROFILE_VERSION, PROFILER_VERSION, Profile, profile_layers
from partition.quantize import WeightFormat

REPEATS = 3
WARMUP = 1


@pytest.fixture(scope="module")
def model_skip_profile(sample_exported) -> tuple:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(
        layer_graph, sample.model.sha256, sample.model.example_inputs,
        repeats=REPEATS, warmup=WARMUP,
    )
    return sample, layer_graph, profile


def test_profile_has_one_timed_entry_per_layer(model_skip_profile) -> None:
    sample, layer_graph, profile = model_skip_profile
    assert [lp.name for lp in profile.layers] == [layer.name for layer in layer_graph.layers]
    assert all(lp.median_s > 0 and lp.spread_s >= 0 for lp in profile.layers)
    assert profile.model_median_s > 0
    assert profile.layer_sum_s == pytest.approx(sum(lp.median_s for lp in profile.layers))
    for lp, layer in zip(profile.layers, layer_graph.layers, strict=True):
        assert (lp.ops, lp.param_bytes, lp.output_bytes, lp.peak_activation_bytes) == (
            len(layer.ops), layer.param_bytes, layer.output_bytes, layer.peak_activation_bytes
        )
    assert sum(lp.param_bytes for lp in profile.layers) == sum(
        p.numel() * p.element_size() for p in sample.module.parameters()
    )
    assert profile.threads == 1 and profile.repeats == REPEATS
    assert profile.model_sha256 == sample.model.sha256
    assert profile.torch_version == torch.__version__
    assert profile.fingerprint == layer_graph.fingerprint()


def test_profiling_restores_the_thread_count(sample_exported) -> None:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    before = torch.get_num_threads()
    profile_layers(layer_graph, "x", sample.model.example_inputs, threads=2, repeats=1,
                   warmup=0)
    assert torch.get_num_threads() == before


def test_cached_profile_is_reused_and_keyed_by_threads(
    sample_exported, sample_cache_dir: Path
) -> None:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    assert cache_dir() == sample_cache_dir  # never the user's home cache
    first, cached = cached_profile(sample.model, layer_graph, repeats=REPEATS, warmup=WARMUP,
                                   refresh=True)
    assert not cached
    start = time.perf_counter()
    again, cached = cached_profile(sample.model, layer_graph, repeats=REPEATS, warmup=WARMUP)
    assert cached and time.perf_counter() - start < 1.0
    assert again == first
    mine = f"{sample.model.sha256[:12]}-*.json"  # other tests cache other models' profiles
    files = sorted((sample_cache_dir / "profiles").glob(mine))
    assert files

    two, cached = cached_profile(sample.model, layer_graph, threads=2, repeats=REPEATS,
                                 warmup=WARMUP)
    assert not cached and two.threads == 2
    assert len(list((sample_cache_dir / "profiles").glob(mine))) == len(files) + 1
    assert cached_profile(sample.model, layer_graph, threads=2, repeats=REPEATS,
                          warmup=WARMUP)[0] == two
    more, cached = cached_profile(sample.model, layer_graph, threads=2, repeats=REPEATS + 1,
                                  warmup=WARMUP)
    assert not cached and more.repeats == REPEATS + 1  # a profile with fewer repeats won't do
    coarse = build_layer_graph(sample.model.program, 1)
    assert not cached_profile(sample.model, coarse, repeats=1, warmup=0)[1]


@pytest.fixture
def quick_cached_profile(sample_exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``cached_profile`` of the skip DAG (one repeat) with an empty cache in ``tmp_path``."""
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path))
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    return lambda: cached_profile(sample.model, layer_graph, repeats=1, warmup=0)


def test_a_quantized_profile_times_the_quantized_layers_and_is_cached_apart(
    sample_exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path))
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    timed: list[WeightFormat] = []
    real = profiler.quantized_range_module

    def spy(graph, start, end, fmt):
        timed.append(fmt)
        return real(graph, start, end, fmt)

    monkeypatch.setattr(profiler, "quantized_range_module", spy)
    plain, _ = cached_profile(sample.model, layer_graph, repeats=1, warmup=0)
    int4, cached = cached_profile(sample.model, layer_graph, repeats=1, warmup=0,
                                  weights=WeightFormat.INT4)
    assert not cached and (plain.weights, int4.weights) == ("none", "int4")
    assert set(timed) == {WeightFormat.NONE, WeightFormat.INT4}
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2
    assert Profile.from_dict(int4.to_dict()) == int4


def test_cached_profile_ignores_an_unreadable_cache_file(
    quick_cached_profile, tmp_path: Path
) -> None:
    profile, _ = quick_cached_profile()
    (path,) = (tmp_path / "profiles").glob("*.json")
    path.write_text("{ not json")
    again, cached = quick_cached_profile()
    assert not cached and len(again.layers) == len(profile.layers)
    assert Profile.load(path) == again


def test_cached_profile_of_another_profiler_version_is_not_reused(
    quick_cached_profile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(profile_store, "PROFILER_VERSION", PROFILER_VERSION - 1)
    assert not quick_cached_profile()[1]
    assert quick_cached_profile()[1]
    monkeypatch.setattr(profile_store, "PROFILER_VERSION", PROFILER_VERSION)
    assert not quick_cached_profile()[1]
    assert len(list((tmp_path / "profiles").glob("*.json"))) == 2


def test_profile_json_round_trip(model_skip_profile, tmp_path: Path) -> None:
    profile = model_skip_profile[2]
    path = tmp_path / "profile.json"
    profile.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == PROFILE_VERSION
    assert len(data["layers"]) == len(profile.layers)
    assert Profile.load(path) == profile
    assert Profile.from_dict(profile.to_dict()) == profile


@pytest.mark.parametrize(
    "text",
    [
        "{ not json",
        json.dumps({"version": 99}),
        json.dumps([1, 2]),
        json.dumps({"version": PROFILE_VERSION}),
        json.dumps({"version": PROFILE_VERSION, "layers": [{"name": "stem"}]}),
        json.dumps({"version": PROFILE_VERSION, "layers": [], "weights": "int3"}),
    ],
    ids=["not-json", "other-version", "a-list", "no-fields", "bad-layer", "bad-weights"],
)
def test_profile_load_refuses_other_files(text: str, tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text(text)
    with pytest.raises(ProfileFormatError) as caught:
        Profile.load(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_profile_load_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileFormatError, match="cannot read profile"):
        Profile.load(tmp_path / "missing.json")


def test_check_matches(model_skip_profile) -> None:
    sample, layer_graph, profile = model_skip_profile
    profile.check_matches(sample.model.sha256, layer_graph, "p.json")  # no error
    with pytest.raises(ProfileMismatchError, match="another model"):
        profile.check_matches("0" * 64, layer_graph, "p.json")
    coarse = build_layer_graph(sample.model.program, 1)
    assert coarse.fingerprint() != layer_graph.fingerprint()
    with pytest.raises(ProfileMismatchError, match="another granularity"):
        profile.check_matches(sample.model.sha256, coarse, "p.json")
    old = dataclasses.replace(profile, torch_version="1.13.0")
    with pytest.raises(ProfileMismatchError, match="torch 1.13.0"):
        old.check_matches(sample.model.sha256, layer_graph, "p.json")
    with pytest.raises(ProfileMismatchError) as caught:
        old.check_matches("0" * 64, coarse, "p.json")
    message = str(caught.value)
    assert "p.json" in message and "\n" not in message
    assert all(w in message for w in ("another model", "another granularity", "torch 1.13.0"))


def test_scaled_divides_times_by_speed(model_skip_profile) -> None:
    profile = model_skip_profile[2]
    slow = profile.scaled(0.25)
    assert len(slow.layers) == len(profile.layers)
    for fast_layer, slow_layer in zip(profile.layers, slow.layers, strict=True):
        assert slow_layer.median_s == pytest.approx(4 * fast_layer.median_s)
        assert slow_layer.spread_s == pytest.approx(4 * fast_layer.spread_s)
        assert (slow_layer.name, slow_layer.param_bytes) == (fast_layer.name,
                                                            fast_layer.param_bytes)
    assert slow.model_median_s == pytest.approx(4 * profile.model_median_s)
    assert slow.layer_sum_s == pytest.approx(4 * profile.layer_sum_s)
    assert slow.device != profile.device
    assert profile.scaled(2.0).layer_sum_s == pytest.approx(profile.layer_sum_s / 2)


def test_cli_profile_writes_json(
    sample_exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    sample = sample_exported("skip_dag")
    out_path = tmp_path / "profile.json"
    code = main(["profile", str(sample.path), "--repeats", "2", "--warmup", "1",
                 "--json", str(out_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    profile = Profile.load(out_path)
    assert profile.repeats == 2 and profile.model_sha256 == sample.model.sha256
    assert len(profile.layers) == build_layer_graph(sample.model.program).num_layers
    assert "stem" in out and f"wrote {out_path}" in out


def test_cli_profile_of_a_pickled_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGESPLIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "whole.pt"
    torch.save(SkipDag(), path)
    out_path = tmp_path / "profile.json"
    code = main(["profile", str(path), "--allow-pickle", "--input-shape", "4x64",
                 "--repeats", "2", "--warmup", "0", "--granularity", "1",
                 "--json", str(out_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    profile = Profile.load(out_path)
    assert [lp.name for lp in profile.layers] == ["stem", "block1", "block2", "block3", "head"]
    assert profile.granularity == "1"


def test_cli_profile_split_at_markers_without_markers_is_one_error_line(
    sample_exported, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = sample_exported("skip_dag")
    assert main(["profile", str(sample.path), "--split-at", "markers"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coordinator: error: --split-at markers")

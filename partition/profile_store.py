"""Profiles cached on disk, keyed by model, granularity, device, threads, torch and profiler."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from partition.errors import ProfileFormatError
from partition.layers import LayerGraph, build_layer_graph
from partition.loader import LoadedModel, load_model_bytes
from partition.profiler import (
    PROFILER_VERSION,
    Profile,
    ProgressCallback,
    device_name,
    profile_layers,
)
from partition.quantize import WeightFormat

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$EDGESPLIT_CACHE`` or ``~/.cache/edgesplit``."""
    return Path(os.environ.get("EDGESPLIT_CACHE", Path.home() / ".cache" / "edgesplit"))


def _cache_path(
    model: LoadedModel, layer_graph: LayerGraph, threads: int, repeats: int, warmup: int,
    weights: WeightFormat,
) -> Path:
    key = "|".join([
        model.sha256, layer_graph.fingerprint(), device_name(), str(threads), torch.__version__,
        f"{repeats}x{warmup}", f"profiler{PROFILER_VERSION}",
        *([] if weights is WeightFormat.NONE else [f"weights={weights.value}"]),
    ])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_dir() / "profiles" / f"{model.sha256[:12]}-{digest}.json"


def cached_profile(
    model: LoadedModel,
    layer_graph: LayerGraph,
    *,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    progress: ProgressCallback | None = None,
    refresh: bool = False,
    weights: WeightFormat = WeightFormat.NONE,
) -> tuple[Profile, bool]:
    """The model's profile on this machine with its weights in ``weights``, and whether it
    came from the cache."""
    path = _cache_path(model, layer_graph, threads, repeats, warmup, weights)
    if path.is_file() and not refresh:
        try:
            return Profile.load(path), True
        except ProfileFormatError:
            log.warning("ignoring unreadable cached profile %s", path)
    profile = profile_layers(
        layer_graph, model.sha256, model.example_inputs,
        threads=threads, repeats=repeats, warmup=warmup, progress=progress, weights=weights,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    profile.save(tmp)
    tmp.replace(path)
    return profile, False


def profile_model_bytes(
    data: bytes, *, granularity: str, threads: int, repeats: int, warmup: int
) -> dict:
    """Profile a ``torch.export`` archive given as bytes (a worker's Profile RPC)."""
    model = load_model_bytes(data, "the model sent for profiling")
    layer_graph = build_layer_graph(model.program, granularity)
    profile, _ = cached_profile(
        model, layer_graph, threads=threads, repeats=repeats, warmup=warmup
    )
    return profile.to_dict()

"""Time each layer on this machine: warm-up, repeats, median and spread at a fixed thread count.

The profiler is a library function: the CLI calls it here, and a worker calls it over RPC
to measure its own hardware.
"""

from __future__ import annotations

import json
import reprlib
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from partition.allocator import keep_large_buffers
from partition.artifact import ProgramRunner
from partition.errors import ProfileFormatError, ProfileMismatchError
from partition.layers import LayerGraph
from partition.machine import cpu_model
from partition.quantize import WeightFormat, quantized_range_module

PROFILE_VERSION = 1  # of the profile file's format
# Of the measurement itself: bump it when the profiler's timings change (2: large buffers kept
# allocated, as a worker does), so profiles cached by an older profiler are measured again.
PROFILER_VERSION = 2
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class LayerProfile:
    """One layer's measured time (median and interquartile spread) and sizes."""

    name: str
    ops: int
    param_bytes: int
    output_bytes: int
    peak_activation_bytes: int
    median_s: float
    spread_s: float


@dataclass(frozen=True)
class Profile:
    """Per-layer timings of one model, at one granularity, on one device and thread count,
    with its weights stored as ``weights`` (a :class:`~partition.quantize.WeightFormat`
    value; the whole model's time is always float32's)."""

    model_sha256: str
    granularity: str
    fingerprint: str
    device: str
    threads: int
    torch_version: str
    repeats: int
    layers: tuple[LayerProfile, ...]
    model_median_s: float
    model_spread_s: float
    weights: str = WeightFormat.NONE.value

    @property
    def layer_sum_s(self) -> float:
        return sum(layer.median_s for layer in self.layers)

    def scaled(self, speed: float) -> Profile:
        """The profile of a device ``speed`` times as fast as this one (emulation)."""
        layers = tuple(
            replace(lp, median_s=lp.median_s / speed, spread_s=lp.spread_s / speed)
            for lp in self.layers
        )
        return replace(
            self,
            layers=layers,
            model_median_s=self.model_median_s / speed,
            model_spread_s=self.model_spread_s / speed,
            device=f"{self.device} x{speed:g}",
        )

    def check_matches(self, model_sha256: str, layer_graph: LayerGraph, origin: str) -> None:
        """Refuse a profile of another model, granularity or torch version."""
        problems = []
        if self.model_sha256 != model_sha256:
            problems.append("another model")
        if self.fingerprint != layer_graph.fingerprint():
            problems.append(f"another granularity ({self.granularity})")
        if self.torch_version != torch.__version__:
            problems.append(f"torch {self.torch_version}, not {torch.__version__}")
        if problems:
            raise ProfileMismatchError(
                f"profile {origin} was measured for {' and '.join(problems)}; "
                "run `coordinator profile` on that node again with this model and granularity"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["version"] = PROFILE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict, origin: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ProfileFormatError(
                f"{origin} is not an edgesplit profile of version {PROFILE_VERSION}; "
                "make it with `coordinator profile MODEL --json FILE`"
            )
        formats = [fmt.value for fmt in WeightFormat]
        if data.get("weights", WeightFormat.NONE.value) not in formats:
            raise ProfileFormatError(
                f"{origin}: weights {reprlib.repr(data['weights'])} is not one of "
                f"{', '.join(formats)}; make it again with `coordinator profile MODEL --json FILE`"
            )
        try:
            fields = {k: v for k, v in data.items() if k != "version"}
            fields["layers"] = tuple(LayerProfile(**layer) for layer in data["layers"])
            return cls(**fields)
        except (KeyError, TypeError) as err:
            raise ProfileFormatError(
                f"{origin} is a malformed edgesplit profile ({err!r}); "
                "make it again with `coordinator profile MODEL --json FILE`"
            ) from err

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ProfileFormatError(
                f"cannot read profile {path} ({err}); make one with "
                "`coordinator profile MODEL --json FILE`"
            ) from err
        return cls.from_dict(data, origin=str(path))


def device_name() -> str:
    """This machine's processor, e.g. ``cpu:AMD EPYC 7B13``."""
    return f"cpu:{cpu_model()}"


def profile_layers(
    layer_graph: LayerGraph,
    model_sha256: str,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    progress: ProgressCallback | None = None,
    weights: WeightFormat = WeightFormat.NONE,
) -> Profile:
    """Time every layer and the whole model, running the layers in order as a pipeline would;
    the layers with their weights in ``weights`` (a quantized stage's time).

    ``progress(done, total)`` is called after each repeat.
    """
    keep_large_buffers()  # allocate as a worker does, or big activations pay page faults
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        samples, model_samples = _time_rounds(
            layer_graph, example_inputs, repeats=repeats, warmup=warmup, progress=progress,
            weights=weights,
        )
    finally:
        torch.set_num_threads(previous_threads)
    layers = tuple(
        LayerProfile(
            name=layer.name,
            ops=len(layer.ops),
            param_bytes=layer.param_bytes,
            output_bytes=layer.output_bytes,
            peak_activation_bytes=layer.peak_activation_bytes,
            median_s=statistics.median(times),
            spread_s=_iqr(times),
        )
        for layer, times in zip(layer_graph.layers, samples, strict=True)
    )
    return Profile(
        model_sha256=model_sha256,
        granularity=layer_graph.granularity,
        fingerprint=layer_graph.fingerprint(),
        device=device_name(),
        threads=threads,
        torch_version=torch.__version__,
        repeats=repeats,
        layers=layers,
        model_median_s=statistics.median(model_samples),
        model_spread_s=_iqr(model_samples),
        weights=weights.value,
    )


def _time_rounds(
    layer_graph: LayerGraph,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    repeats: int,
    warmup: int,
    progress: ProgressCallback | None,
    weights: WeightFormat,
) -> tuple[list[list[float]], list[float]]:
    """Seconds of each timed round: per layer (run one after another, weights in
    ``weights``), and of the whole model."""
    modules = [quantized_range_module(layer_graph, i, i + 1, weights)
               for i in range(layer_graph.num_layers)]
    whole = ProgramRunner(layer_graph.program)
    samples: list[list[float]] = [[] for _ in modules]
    model_samples: list[float] = []
    total = warmup + repeats
    with torch.no_grad():
        for round_ in range(total):
            env = dict(zip(layer_graph.user_inputs, example_inputs, strict=True))
            for index, module in enumerate(modules):
                start = time.perf_counter()
                env.update(module(env))
                if round_ >= warmup:
                    samples[index].append(time.perf_counter() - start)
            start = time.perf_counter()
            whole(*example_inputs)
            if round_ >= warmup:
                model_samples.append(time.perf_counter() - start)
            if progress:
                progress(round_ + 1, total)
    return samples, model_samples


def _iqr(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    quartiles = statistics.quantiles(times, n=4)
    return quartiles[2] - quartiles[0]

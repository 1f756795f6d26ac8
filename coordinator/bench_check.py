"""``bench --check``: many requests through a pipeline, each answer checked against the
single-process model (within the plan's error budget if it compresses), counting what
failover must keep at zero.

Also the driver of the chaos tests and the soak benchmark, which break nodes while it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from coordinator.bench import InputFactory, answer_rate, closed_loop
from coordinator.pipeline import Pipeline
from partition.artifact import ProgramRunner
from partition.errors import EdgesplitError

ATOL = 1e-5
"""Largest difference from the single-process model's output that counts as equal."""

DISTINCT_INPUTS = 32
"""Different inputs sent in turn (each one's reference output is computed once)."""

ProgressHook = Callable[[int], Awaitable[None] | None]
"""Called with the number of requests answered so far, after each answer."""


@dataclass
class CheckedRun:
    """What happened to every request of a checked run."""

    requests: int
    answered: int = 0
    failed: int = 0
    duplicates: int = 0
    mismatches: int = 0
    late_answers: int = 0
    elapsed_s: float = 0.0
    last_sent_at: float = 0.0
    """When the last request was sent, on the clock of :attr:`finished_at`."""
    latencies_s: list[float] = field(default_factory=list, repr=False)
    finished_at: list[float] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list)
    replans: list[dict] = field(default_factory=list)
    host_cpu: float = 0.0
    """Share of the host's CPU time busy during the run."""

    @property
    def throughput_per_s(self) -> float:
        """Answers a second in steady state (see :func:`answer_rate`)."""
        return answer_rate(self.finished_at, self.last_sent_at, self.elapsed_s)

    def percentile(self, q: float, latencies: list[float] | None = None) -> float:
        values = sorted(self.latencies_s if latencies is None else latencies)
        if not values:
            return 0.0
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "answered": self.answered, "failed": self.failed,
            "duplicates": self.duplicates, "mismatches": self.mismatches,
            "late_answers_dropped": self.late_answers, "replans": self.replans,
            "throughput_per_s": self.throughput_per_s, "host_cpu_busy": self.host_cpu,
            "latency_p50_s": self.percentile(0.5), "latency_p99_s": self.percentile(0.99),
            "elapsed_s": self.elapsed_s, "errors": self.errors,
        }


class Reference:
    """Input ``i % DISTINCT_INPUTS`` and the single-process model's outputs for it, made once
    each (no outputs, and no checking, without a ``runner``)."""

    def __init__(
        self, runner: ProgramRunner | None, make_inputs: InputFactory, input_names
    ) -> None:
        self._runner = runner
        self._make = make_inputs
        self._names = tuple(input_names)
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        return self._make(index % DISTINCT_INPUTS)

    def prepare(self) -> None:
        """Compute every reference output now (blocking), not while requests run."""
        if self._runner is None:
            return
        for key in range(DISTINCT_INPUTS):
            inputs = self._make(key)
            with torch.no_grad():
                self._outputs[key] = tuple(self._runner(*(inputs[n] for n in self._names)))

    def outputs(self, index: int) -> tuple[torch.Tensor, ...] | None:
        if self._runner is None:
            return None
        if not self._outputs:
            self.prepare()
        return self._outputs[index % DISTINCT_INPUTS]


def matches(
    outputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], budget: float = 0.0
) -> bool:
    """True if ``outputs`` equal ``expected`` within :data:`ATOL`, or, for a compressed
    plan, within its error ``budget``: the largest difference over the largest reference
    value, the figure a plan's accuracy records."""
    if not budget:
        return all(torch.allclose(a, b, atol=ATOL)
                   for a, b in zip(outputs, expected, strict=True))
    pairs = [(a.double(), b.double()) for a, b in zip(outputs, expected, strict=True)
             if b.numel()]
    if any(a.shape != b.shape for a, b in pairs):
        return False
    worst = max((float((a - b).abs().max()) for a, b in pairs), default=0.0)
    scale = max((float(b.abs().max()) for _, b in pairs), default=0.0)
    return worst <= max(ATOL, budget * scale)  # NaN anywhere fails


async def run_checked(
    pipeline: Pipeline, reference: Reference, *, requests: int, concurrency: int,
    progress: ProgressHook | None = None, rate_per_s: float | None = None,
) -> CheckedRun:
    """Send ``requests`` requests with ``concurrency`` in flight (at most ``rate_per_s`` a
    second if given); check every answer.

    The reference outputs are computed first, and the pipeline's failover prepared."""
    await asyncio.to_thread(reference.prepare)
    await pipeline.prepared()
    run = CheckedRun(requests)
    accuracy = pipeline.plan.accuracy
    budget = accuracy.max_error if accuracy is not None else 0.0
    answers = [0] * requests
    started = time.perf_counter()

    async def send(index: int) -> None:
        sent = time.perf_counter()
        try:
            outputs = await pipeline.infer(reference.inputs(index))
        except EdgesplitError as err:
            run.failed += 1
            if len(run.errors) < 5 and str(err) not in run.errors:
                run.errors.append(str(err))
            return
        done = time.perf_counter()
        answers[index] += 1
        run.answered += 1
        run.latencies_s.append(done - sent)
        run.finished_at.append(done - started)
        expected = reference.outputs(index)
        if expected is not None and not matches(outputs, expected, budget):
            run.mismatches += 1
        if progress is not None:
            waited = progress(run.answered)
            if waited is not None:
                await waited

    load = await closed_loop(requests, concurrency, send, rate_per_s)
    run.elapsed_s = load.elapsed_s
    run.last_sent_at = load.last_sent - started
    run.host_cpu = load.host_cpu
    run.duplicates = sum(count - 1 for count in answers if count > 1)
    run.late_answers = pipeline.late_answers
    run.replans = [r.to_dict() for r in pipeline.replans]
    return run

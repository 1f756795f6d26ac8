"""Measure a deployed plan: one request's latency, and throughput and latency with
requests in flight."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from coordinator.host_cpu import HostCpu
from coordinator.pipeline import Pipeline
from partition.plan import Plan
from partition.spec import TensorSpec, dtype_from_name

InputFactory = Callable[[int], dict[str, torch.Tensor]]

BENCH_CONCURRENCY = 8
"""Requests ``coordinator bench`` keeps in flight unless told otherwise."""


@dataclass(frozen=True)
class BenchResult:
    """Latency percentiles of sequential requests, and throughput (see :func:`answer_rate`)
    and median latency with ``concurrency`` requests in flight."""

    latency_p50_s: float
    latency_p95_s: float
    throughput_per_s: float
    requests: int
    concurrency: int
    loaded_latency_p50_s: float
    host_cpu: float = 0.0
    """Share of the host's CPU time busy while the requests in flight ran."""
    elapsed_s: float = 0.0
    """How long the requests in flight took, first sent to last answered."""
    offered_per_s: float | None = None
    """The most requests a second the run offered, if it was paced (see :func:`closed_loop`)."""

    def predicted(self, plan: Plan) -> tuple[float, float]:
        """``plan``'s predicted throughput and p50 latency for this run's load."""
        return (plan.throughput_under(self.offered_per_s),
                plan.latency_under_load(self.concurrency, self.offered_per_s))


def random_inputs(specs: tuple[TensorSpec, ...]) -> InputFactory:
    """Request ``i``'s inputs: seeded normal floats, and 0/1 integers (valid ids and masks)."""

    def make(index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for spec in specs:
            dtype = dtype_from_name(spec.dtype)
            if dtype.is_floating_point:
                tensors[spec.name] = torch.randn(spec.shape, generator=generator).to(dtype)
            else:
                tensors[spec.name] = torch.randint(0, 2, spec.shape, generator=generator).to(dtype)
        return tensors

    return make


async def measure(
    plan: Plan, make_inputs: InputFactory, *, requests: int, concurrency: int,
    latency_requests: int = 20, warmup: int = 3, rebalance: bool = True,
    rate_per_s: float | None = None,
) -> BenchResult:
    """Wait until failover is prepared (its background work would slow the run down), warm
    up, time ``latency_requests`` one at a time, then ``requests`` with ``concurrency`` in
    flight (a closed loop: each answer sends the next request, no drain between them), at
    most ``rate_per_s`` a second if given."""
    async with await Pipeline.connect(
        plan, window=max(concurrency, 1), rebalance=rebalance
    ) as pipeline:
        await pipeline.prepared()
        for index in range(warmup):
            await pipeline.infer(make_inputs(index))
        latencies = []
        for index in range(latency_requests):
            inputs = make_inputs(index)
            start = time.perf_counter()
            await pipeline.infer(inputs)
            latencies.append(time.perf_counter() - start)
        batch = [make_inputs(index) for index in range(requests)]
        loaded: list[float] = []
        finished: list[float] = []

        async def send(index: int) -> None:
            sent = time.perf_counter()
            await pipeline.infer(batch[index])
            finished.append(time.perf_counter())
            loaded.append(finished[-1] - sent)

        load = await closed_loop(requests, concurrency, send, rate_per_s)
    quantiles = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return BenchResult(
        latency_p50_s=statistics.median(latencies),
        latency_p95_s=quantiles[18],
        throughput_per_s=answer_rate(finished, load.last_sent, load.elapsed_s),
        requests=requests,
        concurrency=concurrency,
        loaded_latency_p50_s=statistics.median(loaded) if loaded else 0.0,
        host_cpu=load.host_cpu,
        elapsed_s=load.elapsed_s,
        offered_per_s=rate_per_s,
    )


def answer_rate(finished: Sequence[float], last_sent: float, elapsed_s: float) -> float:
    """Answers a second in steady state, from the times requests were answered
    (``finished``) and the last one was sent (``last_sent``, the same clock).

    Steady state is from the first answer to the last request sent: before it the pipeline
    fills (one request's latency), after it it drains (a slow replica's last answers), and
    counting either would put a short run low. Below two answers in it, from the first answer
    to the last; below two at all, their count over ``elapsed_s``."""
    answered = sorted(finished)
    for times in ([t for t in answered if t <= last_sent], answered):
        if len(times) > 1 and times[-1] > times[0]:
            return (len(times) - 1) / (times[-1] - times[0])
    return len(finished) / elapsed_s if elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class LoadRun:
    """How long a closed loop took, when (``time.perf_counter``) it sent its last request,
    and the host's CPU utilization meanwhile."""

    elapsed_s: float
    host_cpu: float
    last_sent: float


async def closed_loop(
    requests: int, concurrency: int, send: Callable[[int], Awaitable[None]],
    rate_per_s: float | None = None,
) -> LoadRun:
    """Await ``send(index)`` for each of ``requests`` indices with ``concurrency`` in
    flight: each one that finishes starts the next, with no drain between them; with
    ``rate_per_s``, request ``index`` starts no earlier than ``index / rate_per_s`` seconds
    in (the wait is not part of its latency)."""
    indices = iter(range(requests))

    async def worker() -> None:
        nonlocal last_sent
        for index in indices:
            if rate_per_s:
                await asyncio.sleep(started + index / rate_per_s - time.perf_counter())
            last_sent = time.perf_counter()
            await send(index)

    started = last_sent = time.perf_counter()
    with HostCpu() as host:
        await asyncio.gather(*(worker() for _ in range(max(concurrency, 1))))
    return LoadRun(time.perf_counter() - started, host.busy, last_sent)

"""The latency a request sees with others in flight, against a simulation of the pipeline."""

from __future__ import annotations

import heapq
import statistics

import numpy as np
import pytest

from partition.queueing import latency_under_load


def simulated_latency(stations: list[tuple[str, float]], in_flight: int,
                      cycles: int = 100) -> float:
    """Median latency of the last half of ``cycles`` rounds of ``in_flight`` requests through
    ``stations`` in order, each ``("server", seconds)`` (one request at a time, first come
    first served) or ``("delay", seconds)`` (any number at once); an answer sends the next
    request at once."""
    free = [0.0] * len(stations)
    started = [0.0] * in_flight
    events = [(0.0, r, r, 0) for r in range(in_flight)]  # time, order, request, station
    latencies: list[float] = []
    order = in_flight
    while len(latencies) < cycles * in_flight:
        now, _, request, k = heapq.heappop(events)
        if k == len(stations):
            latencies.append(now - started[request])
            started[request], k = now, 0
        kind, seconds = stations[k]
        begin = max(now, free[k]) if kind == "server" else now
        if kind == "server":
            free[k] = begin + seconds
        order += 1
        heapq.heappush(events, (begin + seconds, order, request, k + 1))
    return statistics.median(latencies[len(latencies) // 2:])


def idle_and_bottleneck(stations: list[tuple[str, float]]) -> tuple[float, float]:
    return (sum(s for _, s in stations),
            max((s for kind, s in stations if kind == "server"), default=0.0))


@pytest.mark.parametrize("in_flight, expected", [(1, 0.010), (2, 0.010), (3, 0.012), (8, 0.032)])
def test_known_cases(in_flight: int, expected: float) -> None:
    """10 ms idle, 4 ms bottleneck: up to 2 requests fit in its gaps, then 4 ms each."""
    assert latency_under_load(0.010, 0.004, in_flight) == pytest.approx(expected)


def test_one_stage_queues_everything() -> None:
    assert latency_under_load(0.005, 0.005, 4) == pytest.approx(0.020)


def test_needs_a_request() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        latency_under_load(0.01, 0.01, 0)


@pytest.mark.parametrize("seed", range(4))
def test_matches_a_simulated_pipeline(seed: int) -> None:
    """Stages and links (servers) and link latencies (delays) in random pipelines."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        hops = int(rng.integers(1, 5))
        stations = []
        for _ in range(hops):
            stations += [("server", float(rng.uniform(0.1, 3))),
                         ("delay", float(rng.choice([0.0, rng.uniform(0, 8)]))),
                         ("server", float(rng.uniform(0.1, 5)))]
        idle, bottleneck = idle_and_bottleneck(stations)
        for in_flight in (1, 2, 3, 5, 8, 16):
            assert latency_under_load(idle, bottleneck, in_flight) == pytest.approx(
                simulated_latency(stations, in_flight), rel=1e-9), (stations, in_flight)


def test_paced_below_the_bottleneck_every_request_takes_the_idle_time() -> None:
    assert latency_under_load(0.010, 0.004, 8, offered_per_s=200) == pytest.approx(0.010)
    assert latency_under_load(0.010, 0.004, 8, offered_per_s=300) == pytest.approx(0.032)

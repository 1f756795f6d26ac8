"""Throughput as ``bench`` measures it: answers a second while the closed loop keeps its
requests in flight, not counting the pipeline filling before the first answer or draining
after the last request is sent."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator.bench import answer_rate, closed_loop

PERIOD = 0.05
"""The bottleneck's time a request: 20 answers a second in steady state."""


def test_filling_and_draining_are_not_counted() -> None:
    # Four stages of 50 ms, 8 in flight, 30 requests: the first answer after 200 ms, then one
    # every 50 ms; request 29 is sent when answer 21 arrives; the slow replica that took
    # request 28 answers a second after the rest.
    finished = [4 * PERIOD + index * PERIOD for index in range(29)]
    finished.append(finished[-1] + 1.0)
    last_sent = finished[21]
    elapsed = finished[-1]
    assert answer_rate(finished, last_sent, elapsed) == pytest.approx(1 / PERIOD)
    assert 30 / elapsed < 0.7 / PERIOD  # counting the whole run puts it 32% low
    assert 29 / (finished[-1] - finished[0]) < 0.75 / PERIOD  # so does counting the drain


def test_order_does_not_matter() -> None:
    finished = [100.3, 100.1, 100.2, 100.0]
    assert answer_rate(finished, 100.3, 0.5) == pytest.approx(10.0)


def test_with_too_few_answers_in_steady_state_the_rest_are_counted() -> None:
    assert answer_rate([1.0, 1.5, 2.0], last_sent=0.0, elapsed_s=2.0) == pytest.approx(2.0)
    assert answer_rate([], 0.0, 2.0) == 0.0
    assert answer_rate([0.5], 0.0, 0.5) == pytest.approx(2.0)
    assert answer_rate([1.0, 1.0], 0.0, 2.0) == pytest.approx(1.0)
    assert answer_rate([], 0.0, 0.0) == 0.0


def test_the_loop_reports_when_it_sent_its_last_request() -> None:
    sent: list[float] = []

    async def send(index: int) -> None:
        sent.append(time.perf_counter())
        await asyncio.sleep(0.01)

    load = asyncio.run(closed_loop(12, 4, send))
    assert len(sent) == 12
    assert 0 <= max(sent) - load.last_sent < 0.005  # nothing is awaited in between

"""Throughput as ``bench`` measures it: answers a second once the pipeline is full, not
counting the wait for the first answer."""

from __future__ import annotations

import pytest

from coordinator.bench import answer_rate


def test_a_filling_pipeline_is_measured_at_its_bottleneck_rate() -> None:
    stages, period, requests = 4, 0.05, 30  # four stages of 50 ms, eight requests in flight
    finished = [stages * period + index * period for index in range(requests)]
    elapsed = finished[-1]
    assert answer_rate(finished, elapsed) == pytest.approx(1 / period)
    assert requests / elapsed < 0.92 / period  # counting the fill puts this run 9% low


def test_order_and_clock_do_not_matter() -> None:
    finished = [100.3, 100.1, 100.2, 100.0]
    assert answer_rate(finished, 0.5) == pytest.approx(10.0)


def test_with_under_two_distinct_answers_the_run_is_counted_whole() -> None:
    assert answer_rate([], 2.0) == 0.0
    assert answer_rate([0.5], 0.5) == pytest.approx(2.0)
    assert answer_rate([1.0, 1.0], 2.0) == pytest.approx(1.0)
    assert answer_rate([], 0.0) == 0.0

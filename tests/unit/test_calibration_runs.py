"""A freshly loaded stage is timed over enough runs that a short burst of other work on the
machine does not move its median (an emulated device's time is that median over its speed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from node import pipeline
from node.config import Device
from node.pipeline import CALIBRATION_MAX_RUNS, CALIBRATION_RUNS, CALIBRATION_S, StageRunner


def calibrate(monkeypatch: pytest.MonkeyPatch, run_s: float,
              slow: set[int] = frozenset()) -> tuple[float, int]:
    """The calibrated time and the number of runs of a stage taking ``run_s`` a run (on a
    clock that moves only when it runs), ``run_s * 10`` on the runs in ``slow``."""
    now = [0.0]
    runs = [0]

    def run_stage(*_args: object) -> dict:
        now[0] += run_s * (10 if runs[0] in slow else 1)
        runs[0] += 1
        return {}

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: now[0])
    program = SimpleNamespace(to=lambda _device: program)
    spec = SimpleNamespace(receives=())
    runner = StageRunner(node_name="n", device=Device.CPU, speed_factor=0.1)
    stage = runner.place(program, spec, 0)  # type: ignore[arg-type]
    return stage.calibrated_s, runs[0] - 1  # the first run warms up, untimed


def test_a_long_stage_is_timed_over_the_fewest_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calibrated, runs = calibrate(monkeypatch, run_s=0.2)
    assert (calibrated, runs) == (pytest.approx(0.2), CALIBRATION_RUNS)


def test_a_short_stage_is_timed_over_half_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    calibrated, runs = calibrate(monkeypatch, run_s=0.02)
    assert runs == pytest.approx(CALIBRATION_S / 0.02, abs=1)
    assert calibrated == pytest.approx(0.02)


def test_a_very_short_stage_stops_at_the_most_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert calibrate(monkeypatch, run_s=1e-4)[1] == CALIBRATION_MAX_RUNS


def test_a_burst_over_a_fifth_of_a_second_leaves_the_median(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten runs of 18 ms, five of them ten times slower (other work), have a median 5.5x the
    stage's time; the 28 runs half a second asks for have the stage's own."""
    calibrated, _ = calibrate(monkeypatch, run_s=0.018, slow={1, 2, 3, 4, 5})
    assert calibrated == pytest.approx(0.018)

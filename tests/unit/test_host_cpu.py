"""The host's CPU share busy during a measurement, and the line that reports it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from coordinator import host_cpu
from coordinator.host_cpu import BOUND_SHARE, HostCpu, host_cpu_line


class _Times(SimpleNamespace):
    """What ``psutil.cpu_times()`` returns: named seconds that also iterate."""

    def __iter__(self):
        return iter(vars(self).values())


def test_busy_is_the_share_of_all_time_not_idle_or_waiting(monkeypatch) -> None:
    readings = iter([_Times(user=10.0, system=5.0, idle=80.0, iowait=5.0),
                     _Times(user=13.0, system=6.0, idle=84.0, iowait=7.0)])
    monkeypatch.setattr(host_cpu.psutil, "cpu_times", lambda: next(readings))
    with HostCpu() as host:
        pass
    assert host.busy == pytest.approx(4.0 / 10.0)  # 10 s passed over all cores, 4 busy


def test_no_time_passed_reads_as_idle(monkeypatch) -> None:
    monkeypatch.setattr(host_cpu.psutil, "cpu_times", lambda: _Times(user=1.0, idle=1.0))
    with HostCpu() as host:
        pass
    assert host.busy == 0.0


def test_the_line_warns_only_when_host_bound() -> None:
    assert "CPU-bound" not in host_cpu_line(BOUND_SHARE - 0.01)
    assert "host CPU 95% busy" in host_cpu_line(0.95)
    assert "CPU-bound" in host_cpu_line(0.95)

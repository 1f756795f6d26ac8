"""How busy this machine's CPUs were during a measurement: a figure measured with more
work than the host's cores can run is the host's, not the plan's."""

from __future__ import annotations

import os

import psutil

BOUND_SHARE = 0.8
"""Above this share of the host's CPU time busy, a measurement is called host-bound."""


class HostCpu:
    """Context manager: :attr:`busy` is the share of all cores' time spent busy (not idle
    or waiting for I/O) between entry and exit, system-wide."""

    busy = 0.0

    def __enter__(self) -> HostCpu:
        self._start = psutil.cpu_times()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = psutil.cpu_times()
        total = sum(end) - sum(self._start)
        idle = (end.idle - self._start.idle) + (
            getattr(end, "iowait", 0.0) - getattr(self._start, "iowait", 0.0))
        self.busy = max(0.0, 1.0 - idle / total) if total > 0 else 0.0


def host_cpu_line(busy: float) -> str:
    """One line for a report: the share busy, and a warning when the figures are host-bound."""
    cores = os.cpu_count() or 1
    line = f"host CPU {busy:.0%} busy during the measurement ({cores} cores)"
    if busy > BOUND_SHARE:
        line += ("; the host was CPU-bound, so the figures measure it as much as the plan "
                 "(fewer nodes per machine, or slower emulated speeds, measure the plan)")
    return line

"""Kernel isolation of the simulated cluster's CPU: one cgroup-v1 ``cpu`` group per worker.

With ``--isolation kernel`` a node's ``speed`` is not emulated by sleeping but by a CFS
quota: a worker of speed ``s`` with ``t`` threads may use ``s * t`` cores' worth of CPU time
(``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), so it computes for real at the emulated
speed and cannot take CPU time the other workers need. If the quotas together would claim
more than :data:`HOST_SHARE` of the host's cores, every node's speed is stretched by the same
factor (below 1) so that the client and the rest of the host keep the remainder; predictions
scale by the same factor (:attr:`CpuGroups.stretch`, recorded in the cluster's state file).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from partition.cluster import ClusterSpec
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)

CPU_ROOT = Path("/sys/fs/cgroup/cpu")
"""Where the cgroup-v1 ``cpu`` controller is mounted."""
GROUP_PREFIX = "edgesplit-"
"""Every group this module makes is ``CPU_ROOT/edgesplit-<unique>/<node>``."""
MIN_QUOTA_US = 1_000
"""The smallest ``cpu.cfs_quota_us`` the kernel accepts. A node's period is the shortest
that gives it this quota: the quota is a budget per period, so compute shorter than it
runs unslowed (measured here, quota 25%: a 6 ms burst after idling ran 1.15x slower with
the kernel's default 100 ms period and 3.6x with 10 ms; a 1.2 ms burst was not slowed
even with 4 ms)."""
MIN_PERIOD_US = 1_000
"""The shortest ``cpu.cfs_period_us`` the kernel accepts."""
MAX_PERIOD_US = 1_000_000
"""The longest ``cpu.cfs_period_us`` the kernel accepts."""
HOST_SHARE = 0.7
"""Largest share of the host's cores the workers' quotas may sum to."""
REMOVE_TIMEOUT_S = 10.0
"""How long removing a group waits for the processes in it to leave."""


class Isolation(enum.StrEnum):
    """How the simulated cluster makes a node as slow as its ``speed``."""

    NONE = "none"
    """The worker computes, then sleeps to its emulated time."""
    KERNEL = "kernel"
    """The worker computes under a CPU quota (a cgroup); it does not sleep."""


class IsolationError(EdgesplitError):
    """Kernel isolation is unavailable here, or a cgroup could not be made or removed."""


def host_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def cpu_stretch(cores_wanted: float, host_cores: int, host_share: float = HOST_SHARE) -> float:
    """The factor (at most 1) every node's speed is multiplied by so that the quotas, which
    want ``cores_wanted`` cores in all, sum to at most ``host_share`` of ``host_cores``.

    >>> cpu_stretch(0.5 + 0.25, 2)
    1.0
    >>> round(cpu_stretch(1 + 1 + 0.5 + 0.5, 2), 3)
    0.467
    """
    if not cores_wanted > 0:
        raise ValueError(f"the nodes want {cores_wanted} cores; speeds must be positive")
    allowed = host_share * host_cores
    # A cluster already stretched to fit wants exactly ``allowed``, up to rounding.
    return 1.0 if cores_wanted <= allowed * (1 + 1e-9) else allowed / cores_wanted


def cores_wanted(cluster: ClusterSpec) -> float:
    """The cores ``cluster``'s workers want at full load: ``speed * threads`` summed."""
    return sum((n.speed or 1.0) * (n.threads or 1) for n in cluster.nodes)


def with_stretched_speeds(cluster: ClusterSpec, stretch: float) -> ClusterSpec:
    """``cluster`` with every node's speed multiplied by ``stretch``: plan with it to predict
    what a cluster started with that stretch measures. A cluster stretched to fit this host
    fits it as it is (its own stretch is 1)."""
    nodes = tuple(replace(n, speed=(n.speed or 1.0) * stretch) for n in cluster.nodes)
    return replace(cluster, nodes=nodes)


def check_available(root: Path = CPU_ROOT) -> None:
    """Raise :class:`IsolationError` saying why, if kernel isolation cannot run here."""
    fix = "; use --isolation none"
    if not sys.platform.startswith("linux"):
        raise IsolationError(f"--isolation kernel needs Linux cgroups, not {sys.platform}{fix}")
    if os.geteuid() != 0:
        raise IsolationError(f"--isolation kernel needs root to make cgroups{fix}")
    if not (root / "cpu.cfs_quota_us").is_file():
        raise IsolationError(
            f"--isolation kernel needs the cgroup-v1 cpu controller mounted at {root}{fix}"
        )


@dataclass(frozen=True)
class CpuGroups:
    """The cgroups of one simulated cluster: ``path`` holds one group per node."""

    path: Path
    stretch: float
    cores_wanted: float
    host_cores: int

    @classmethod
    def create(cls, cores_wanted: float, host_cores: int, root: Path = CPU_ROOT) -> CpuGroups:
        """Make a new, uniquely named parent group for nodes wanting ``cores_wanted`` cores
        in all (``speed * threads`` summed), with the stretch that fits them on the host."""
        check_available(root)
        stretch = cpu_stretch(cores_wanted, host_cores)
        path = root / f"{GROUP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return cls(path, stretch, cores_wanted, host_cores)

    def stretch_line(self) -> str | None:
        """One line for the user if speeds were stretched: which factor, and why."""
        if self.stretch >= 1:
            return None
        return (
            f"speeds stretched by {self.stretch:.3g}: the nodes want {self.cores_wanted:.3g} "
            f"cores and the workers may have {HOST_SHARE:.0%} of this host's "
            f"{self.host_cores}, so each node runs at {self.stretch:.3g} x its speed "
            f"(predictions scale by the same factor)"
        )

    def limits_us(self, speed: float, threads: int) -> tuple[int, int]:
        """The CFS quota and period of a node of ``speed`` running ``threads`` threads: its
        share of the cores (stretched) of the shortest period that gives it a quota of at
        least :data:`MIN_QUOTA_US`."""
        cores = speed * threads * self.stretch
        period = max(MIN_PERIOD_US, math.ceil(MIN_QUOTA_US / cores))
        if period > MAX_PERIOD_US:
            raise IsolationError(
                f"a node of speed {speed:g} gets {cores:.2g} of a core after the stretch "
                f"{self.stretch:.3g}, less than the kernel's smallest quota allows "
                f"({MIN_QUOTA_US} us per {MAX_PERIOD_US} us); give it a higher speed"
            )
        return round(cores * period), period

    def place(self, node: str, pid: int, speed: float, threads: int) -> None:
        """Put process ``pid`` (all its threads) in node ``node``'s group, made if needed,
        with the quota of ``speed`` and ``threads``."""
        quota, period = self.limits_us(speed, threads)
        group = self.path / node
        group.mkdir(exist_ok=True)
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        log.info("node %s (pid %d) in %s with quota %d/%d us", node, pid, group, quota, period)

    def remove(self, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
        """Remove every node's group and the parent; waits up to ``timeout_s`` for the
        processes in them to be gone (stop them first)."""
        remove_groups(self.path, timeout_s)

    def to_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "stretch": self.stretch,
                "cores_wanted": self.cores_wanted, "host_cores": self.host_cores}

    @classmethod
    def from_dict(cls, data: dict[str, Any], root: Path = CPU_ROOT) -> CpuGroups:
        """The groups a state file recorded; refuses a path that is not one of ours."""
        path = Path(data["path"])
        if path.parent != root or not path.name.startswith(GROUP_PREFIX):
            raise ValueError(f"{path} is not an edgesplit group under {root}")
        return cls(path, float(data["stretch"]), float(data["cores_wanted"]),
                   int(data["host_cores"]))


def remove_groups(path: Path, timeout_s: float = REMOVE_TIMEOUT_S) -> None:
    """Remove the group ``path`` and the groups in it, if it exists; waits up to
    ``timeout_s`` for the processes in them to be gone. Stop the workers first: what is
    left in a group then is theirs (a tool a worker ran as it started, say), and is killed."""
    if not path.is_dir():
        return
    deadline = time.monotonic() + timeout_s
    for group in [*(p for p in path.iterdir() if p.is_dir()), path]:
        _remove_group(group, deadline)


def _remove_group(group: Path, deadline: float) -> None:
    """``rmdir`` ``group``, killing the processes left in it and retrying while they go."""
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as err:
            left: list[str] = []
            with contextlib.suppress(OSError):
                left = (group / "cgroup.procs").read_text().split()
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise IsolationError(
                    f"cgroup {group} could not be removed ({err.strerror}; processes "
                    f"{', '.join(left) or 'none'} are still in it); stop them and rmdir it"
                ) from err
            for pid in left:  # only a cgroup is busy: these are in it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)

"""``--isolation kernel``: each worker runs in its own cgroup-v1 ``cpu`` group under a CFS
quota of its speed, and every group is removed when the cluster stops or fails to start.

Skipped unless run as root with the cgroup-v1 cpu controller mounted at /sys/fs/cgroup/cpu.
Every group a test makes (named after this process's pid) and every process in one is
removed when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cli_helpers import coordinator, edge_nodes_listening_on, nodes_yaml, ok
from cluster_helpers import p50_stage_seconds

from coordinator.isolation import (
    CPU_ROOT,
    GROUP_PREFIX,
    CpuGroups,
    Isolation,
    IsolationError,
    check_available,
    cpu_stretch,
    host_cores,
    remove_groups,
)
from coordinator.local_cluster import (
    LocalCluster,
    LocalClusterError,
    read_cpu_groups,
    read_state,
    start_cluster,
    stop_recorded,
)
from coordinator.netns import Namespaces
from coordinator.ports import free_ports
from node.client import GrpcWorkerHandle
from partition.cluster import ClusterSpec, load_cluster, parse_cluster
from partition.errors import EdgesplitError


def _unavailable() -> str | None:
    try:
        check_available()
    except IsolationError as err:
        return str(err)
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=_unavailable() or "")


def our_groups() -> list[Path]:
    """The groups this test process made (their names carry the pid of their maker)."""
    return sorted(CPU_ROOT.glob(f"{GROUP_PREFIX}{os.getpid()}-*"))


@pytest.fixture(autouse=True)
def made_groups(tmp_path: Path) -> Iterator[list[Path]]:
    """Groups a test made in another process (``coordinator up``) go in this list. When the
    test ends, the cluster ``tmp_path/state`` records is stopped (as by ``down``), whatever
    still runs in the listed groups and in this process's groups is killed and the groups
    are removed."""
    made: list[Path] = []
    try:
        yield made
    finally:
        # a damaged record, or a group still busy: the groups are still removed below
        with contextlib.suppress(EdgesplitError):
            stop_recorded(tmp_path / "state")
        for path in [*made, *our_groups()]:
            pids = [int(pid) for procs in path.glob("*/cgroup.procs")
                    for pid in procs.read_text().split()]
            processes = []
            for pid in pids:
                try:
                    processes.append(psutil.Process(pid))
                    processes[-1].kill()
                except psutil.NoSuchProcess:
                    continue
            psutil.wait_procs(processes, timeout=10)
            remove_groups(path)


def two_nodes(speeds: dict[str, float], ports: list[int], threads: int = 1) -> ClusterSpec:
    return parse_cluster({
        "nodes": [
            {"name": name, "address": f"127.0.0.1:{port}", "memory": "1GiB", "speed": speed,
             "threads": threads}
            for (name, speed), port in zip(speeds.items(), ports, strict=True)
        ],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "test")


def quota_of(groups: CpuGroups, node: str) -> tuple[int, int]:
    group = groups.path / node
    return (int((group / "cpu.cfs_quota_us").read_text()),
            int((group / "cpu.cfs_period_us").read_text()))


async def test_each_worker_computes_at_its_speed_under_its_quota(tmp_path: Path) -> None:
    speeds = {"half": 0.5, "quarter": 0.25}
    cluster = two_nodes(speeds, free_ports(2))
    with LocalCluster(cluster, tmp_path / "state", isolation=Isolation.KERNEL) as local:
        groups = local.cpu_groups
        assert groups is not None and groups.path.parent == CPU_ROOT
        assert groups.stretch == cpu_stretch(0.75, host_cores())
        for node in local.nodes:
            procs = (groups.path / node.name / "cgroup.procs").read_text().split()
            assert str(node.pid) in procs, (node, procs)
            quota, period = quota_of(groups, node.name)
            assert quota >= 1_000 and period >= 1_000
            assert quota / period == pytest.approx(speeds[node.name] * groups.stretch, rel=1e-3)
            assert (quota, period) == groups.limits_us(speeds[node.name], threads=1)
        p50 = {}
        for node in local.nodes:  # one at a time: the machine has two cores
            handle = GrpcWorkerHandle(node.address, node.name)
            try:
                assert (await handle.describe()).speed_factor == 1.0  # the quota slows it
            finally:
                await handle.close()
            p50[node.name] = await p50_stage_seconds(node.address, node.name, rows=256)
        restarted = local.restart("quarter")  # a restarted worker goes back in its group
        procs = (groups.path / "quarter" / "cgroup.procs").read_text().split()
        assert procs == [str(restarted.pid)], procs
        assert quota_of(groups, "quarter") == groups.limits_us(0.25, threads=1)
        path = groups.path
    ratio = p50["quarter"] / p50["half"]
    # Generous: other work on the host takes CPU time from both nodes alike.
    assert 1.4 < ratio < 3.5, f"speed 0.25 vs 0.5: p50 stage times {p50}, ratio {ratio:.2f}"
    assert not path.exists()
    assert our_groups() == []


def test_up_stretches_speeds_to_fit_the_host_and_down_removes_the_groups(
    tmp_path: Path, cli_env: dict[str, str], made_groups: list[Path]
) -> None:
    # Two nodes of speed 1 with 2 threads each want 4 cores: more than 70% of a small host.
    ports = free_ports(2)
    nodes = nodes_yaml(tmp_path / "nodes.yaml", [
        (name, f"127.0.0.1:{port}", "1GiB") for name, port in zip(("a", "b"), ports, strict=True)
    ])
    nodes.write_text(nodes.read_text().replace("memory: 1GiB}", "memory: 1GiB, threads: 2}"))
    out = " ".join(ok(coordinator(cli_env, "up", "--isolation", "kernel", nodes)).split())
    state = tmp_path / "state"
    groups = read_cpu_groups(state)
    assert groups is not None
    made_groups.append(groups.path)
    assert groups.cores_wanted == 4.0
    stretch = cpu_stretch(4.0, host_cores())
    assert groups.stretch == stretch
    assert (f"speeds stretched by {stretch:.3g}" in out) == (stretch < 1), out
    planning = state / "nodes.yaml"  # the cluster as it runs: plan with it
    assert (f"plan with --nodes {planning}" in out) == (stretch < 1), out
    if stretch < 1:
        assert [n.speed for n in load_cluster(planning).nodes] == pytest.approx([stretch] * 2)
    for node in read_state(state):
        quota, period = quota_of(groups, node.name)
        assert quota / period == pytest.approx(2 * stretch, rel=1e-3)
        assert (quota, period) == groups.limits_us(1.0, threads=2)
    assert "stopped 2 node(s)" in ok(coordinator(cli_env, "down"))
    assert not groups.path.exists()
    assert read_state(state) == [] and read_cpu_groups(state) is None


def test_a_start_that_fails_halfway_leaves_no_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = two_nodes({"first": 0.5, "second": 0.5}, free_ports(2))
    built = Namespaces.build
    made: list[Namespaces] = []
    holders: list[socket.socket] = []

    def build_and_take_seconds_port(self: Namespaces, cluster: ClusterSpec) -> None:
        built(self, cluster)
        made.append(self)
        host, port = self.at_home(cluster).node("second").address.rsplit(":", 1)
        # a socket belongs to the namespace it is made in
        holders.append(self.run_inside("second", lambda: socket.create_server((host, int(port)))))

    monkeypatch.setattr(Namespaces, "build", build_and_take_seconds_port)
    try:
        with pytest.raises(LocalClusterError, match="'second' exited at start"):
            start_cluster(cluster, tmp_path / "state", Isolation.KERNEL)
    finally:
        for holder in holders:
            holder.close()
    assert our_groups() == []
    (namespaces,) = made
    first = namespaces.at_home(cluster).node("first").address
    assert edge_nodes_listening_on({first}) == []
    assert read_state(tmp_path / "state") == []


def test_removing_the_groups_kills_what_a_worker_left_in_them() -> None:
    """A worker's child (ldconfig, run as a worker imports its libraries) can outlive it in
    its group; removal must not wait for it."""
    groups = CpuGroups.create(0.5, host_cores())
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        groups.place("node", leftover.pid, speed=0.5, threads=1)
        started = time.monotonic()
        groups.remove(timeout_s=5.0)
        assert time.monotonic() - started < 2.0
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert not groups.path.exists()
    finally:
        leftover.kill()
        leftover.wait()

"""A SIGTERM to a process inside a ``LocalCluster`` block (a benchmark, the demo) stops the
cluster it started: its workers (each in a session of its own, so the signal does not reach
them), and with kernel isolation its namespaces, links and CPU groups too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from cluster_helpers import kernel_networks_unavailable, leftovers

from coordinator.isolation import Isolation
from coordinator.local_cluster import STATE_FILE, stop_recorded
from coordinator.ports import free_ports

EXIT_TIMEOUT_S = 60.0

HOLDER = """
import json, sys, time
from pathlib import Path
from coordinator.isolation import Isolation
from coordinator.local_cluster import LocalCluster
from partition.cluster import parse_cluster

cluster = parse_cluster(json.loads(sys.argv[1]), "test")
with LocalCluster(cluster, Path(sys.argv[2]), isolation=Isolation(sys.argv[3])) as local:
    made = {"pids": [node.pid for node in local.nodes],
            "groups": str(local.cpu_groups.path) if local.cpu_groups else None,
            "prefix": local.namespaces.prefix if local.namespaces else None,
            "block": local.namespaces.block if local.namespaces else None}
    print(json.dumps(made), flush=True)
    time.sleep(600)
"""


def two_nodes() -> dict:
    names = ["a", "b"]
    return {
        "nodes": [{"name": name, "address": f"127.0.0.1:{port}", "memory": "1GiB",
                   "speed": 0.7} for name, port in zip(names, free_ports(2), strict=True)],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
        "source": "a",
        "sink": "a",
    }


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("isolation", [
    Isolation.NONE,
    pytest.param(Isolation.KERNEL, marks=pytest.mark.skipif(
        kernel_networks_unavailable() is not None, reason=kernel_networks_unavailable() or "")),
])
def test_sigterm_inside_the_block_stops_what_the_cluster_started(
        tmp_path: Path, isolation: Isolation) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(two_nodes()), str(state), isolation.value],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        made = json.loads(holder.stdout.readline() or "null")  # type: ignore[union-attr]
        assert made, f"the cluster did not start (exit status {holder.poll()})"
        assert all(alive(pid) for pid in made["pids"])
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(EXIT_TIMEOUT_S) == 128 + signal.SIGTERM
        assert [pid for pid in made["pids"] if alive(pid)] == []
        assert made["groups"] is None or not Path(made["groups"]).exists()
        if made["prefix"]:
            assert leftovers(made["prefix"], made["block"]) == []
        assert not (state / STATE_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
        stop_recorded(state)  # whatever a failed test left

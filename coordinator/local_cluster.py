"""A simulated edge cluster: one real ``edge-node`` process per node, on 127.0.0.1.

Emulation is a property of each worker: its node's ``speed`` becomes ``--speed-factor``;
link delays are set when the pipeline is wired (see :mod:`coordinator.deploy`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from partition.cluster import ClusterSpec
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
STATE_FILE = "cluster.json"


class LocalClusterError(EdgesplitError):
    """The simulated cluster could not start, or its state file is unusable."""


@dataclass(frozen=True)
class LocalNode:
    """One worker process of the simulated cluster."""

    name: str
    address: str
    pid: int
    log_path: str


def default_state_dir() -> Path:
    """``$EDGESPLIT_STATE`` or ``./.edgesplit``: where ``up`` records what it started."""
    return Path(os.environ.get("EDGESPLIT_STATE", ".edgesplit"))


def start_cluster(cluster: ClusterSpec, state_dir: Path) -> list[LocalNode]:
    """Start one ``edge-node`` per node of ``cluster`` and wait until each answers.

    Raises
    ------
    LocalClusterError
        If an address is not on this machine, a cluster is already up, or a node does not
        come up (the message quotes its log); the nodes started so far are stopped.
    """
    for node in cluster.nodes:
        host = node.address.rpartition(":")[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise LocalClusterError(
                f"node {node.name!r} has address {node.address}; a simulated cluster runs on "
                "this machine only, so use 127.0.0.1:PORT addresses"
            )
    if read_state(state_dir):
        raise LocalClusterError(
            f"a simulated cluster is already up (state in {state_dir}); run `coordinator down`"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    started: list[LocalNode] = []
    try:
        for spec in cluster.nodes:
            started.append(_spawn(spec.name, spec.address, spec.speed, spec.threads, state_dir))
        write_state(state_dir, started)
        for node in started:
            _wait_ready(node)
    except BaseException:
        stop_nodes(started)
        clear_state(state_dir)
        raise
    return started


def _spawn(
    name: str, address: str, speed: float | None, threads: int | None, state_dir: Path
) -> LocalNode:
    log_path = state_dir / f"{name}.log"
    command = [
        sys.executable, "-m", "node.cli", "--listen", address, "--name", name,
        "--speed-factor", str(speed or 1.0), "--threads", str(threads or 1),
    ]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `coordinator up`; Ctrl-C there does not reach it
        )
    log.info("started %s on %s (pid %d)", name, address, process.pid)
    return LocalNode(name, address, process.pid, str(log_path))


def _wait_ready(node: LocalNode) -> None:
    """Block until ``node`` answers Describe with its own name (not some other server on its
    port); fail with the last line of its log if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.EdgeNodeStub(channel)
        while True:
            try:
                if stub.Describe(pb.DescribeRequest(), timeout=1.0).name == node.name:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
            if not _alive(node.pid):
                tail = Path(node.log_path).read_text(errors="replace").strip().splitlines()
                reason = tail[-1] if tail else "no output"
                raise LocalClusterError(f"node {node.name!r} exited at start: {reason}")
            if time.monotonic() > deadline:
                raise LocalClusterError(
                    f"node {node.name!r} did not answer on {node.address} within "
                    f"{READY_TIMEOUT_S:.0f} s; see {node.log_path}"
                )


def stop_nodes(nodes: list[LocalNode], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every node, wait for a clean exit, SIGKILL the ones still running."""
    for node in nodes:
        if _alive(node.pid):
            os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for node in nodes:
        while _alive(node.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(node.pid):
            log.warning("node %s did not stop in %.0f s; killing it", node.name, grace_s)
            os.kill(node.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs and is an edge-node (reaps it if it is our exited child)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return False
    except ChildProcessError:
        pass
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"node.cli" in cmdline


def write_state(state_dir: Path, nodes: list[LocalNode]) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps([asdict(n) for n in nodes], indent=1))


def read_state(state_dir: Path) -> list[LocalNode]:
    """The nodes recorded by ``up`` that still run; an empty list if none."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return []
    try:
        nodes = [LocalNode(**entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as err:
        raise LocalClusterError(f"{path} is damaged ({err}); delete it and stop nodes by hand") \
            from err
    return [n for n in nodes if _alive(n.pid)]


def clear_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


class LocalCluster:
    """Context manager: the simulated cluster is up inside the ``with`` block, and always
    stopped when it ends, even on an error."""

    def __init__(self, cluster: ClusterSpec, state_dir: Path) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.nodes: list[LocalNode] = []

    def __enter__(self) -> LocalCluster:
        self.nodes = start_cluster(self.cluster, self.state_dir)
        return self

    def __exit__(self, *exc_info: object) -> None:
        stop_nodes(self.nodes)
        clear_state(self.state_dir)

    def restart(self, name: str) -> LocalNode:
        """Start node ``name`` again (same address and speed) after it stopped; wait until
        it answers."""
        spec = self.cluster.node(name)
        node = _spawn(spec.name, spec.address, spec.speed, spec.threads, self.state_dir)
        self.nodes = [node if n.name == name else n for n in self.nodes]
        write_state(self.state_dir, self.nodes)
        _wait_ready(node)
        return node

"""A simulated edge cluster: one real ``edge-node`` process per node, on 127.0.0.1.

Emulation is a property of each worker: its node's ``speed`` becomes ``--speed-factor``, or
with :attr:`Isolation.KERNEL` a CPU quota (see :mod:`coordinator.isolation`); link delays are
set when the pipeline is wired (see :mod:`coordinator.deploy`). With :attr:`Isolation.KERNEL`
each worker also runs in its own network namespace on its home address, links between them
shaped by the kernel (see :mod:`coordinator.netns`), and emulates only links' latency. Each
shared medium of the cluster gets its own arbiter process (:mod:`node.arbiter`), started
before the workers, which are told its address, and stopped with them. What ``up`` started
is recorded in the user's state directory, so ``down`` finds it from anywhere. With a
``security`` block the workers run with TLS and the token, each with its certificate from
beside the CA's (the layout ``coordinator certs`` writes); :func:`with_fresh_certs` makes one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, TypeVar

import grpc
import platformdirs
import psutil

from coordinator.certs import make_certs, node_arguments
from coordinator.isolation import CpuGroups, Isolation, cores_wanted, host_cores
from coordinator.netns import Namespaces
from coordinator.ports import free_ports
from node.channels import channel_credentials, channel_options, token_metadata
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.security import Security, client_security, is_loopback
from partition.cluster import ClusterSpec
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)

T = TypeVar("T")
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
STATE_FILE = "cluster.json"
CERTS_DIR = "certs"
PLANNING_NODES_FILE = "nodes.yaml"
"""Written by ``coordinator up --secure`` or when speeds are stretched: the cluster's
nodes.yaml as it runs, with its ``security`` and stretched speeds."""


class LocalClusterError(EdgesplitError):
    """The simulated cluster could not start, or its state file is unusable."""


@dataclass(frozen=True)
class LocalNode:
    """One process of the simulated cluster: a worker, or (``arbiter``) the arbiter of
    the shared medium ``name``."""

    name: str
    address: str
    pid: int
    log_path: str
    arbiter: bool = False


class _Record(NamedTuple):
    """What ``up`` recorded: the workers, their CPU groups, the media's arbiters and the
    network namespaces."""

    nodes: list[LocalNode]
    cpu_groups: CpuGroups | None
    arbiters: list[LocalNode]
    namespaces: Namespaces | None


def default_state_dir() -> Path:
    """Where ``up`` records what it started and keeps the nodes' logs: ``$EDGESPLIT_STATE``,
    else the user's state directory (``~/.local/state/edgesplit`` on Linux)."""
    return Path(os.environ.get("EDGESPLIT_STATE") or platformdirs.user_state_path("edgesplit"))


def start_cluster(
    cluster: ClusterSpec, state_dir: Path, isolation: Isolation = Isolation.NONE
) -> list[LocalNode]:
    """Start one ``edge-node`` per node of ``cluster`` and wait until each answers; with
    :attr:`Isolation.KERNEL`, each in its own CPU group (:func:`read_cpu_groups` has them)
    and network namespace, on its home address (:func:`read_namespaces` has them).

    Raises
    ------
    LocalClusterError
        If an address is not on this machine, a cluster is already up, or a node does not
        come up (the message quotes its log); the nodes started so far are stopped.
    IsolationError
        If kernel isolation is unavailable or a group or namespace cannot be made; nothing
        is left behind.
    """
    for node in cluster.nodes:
        if not is_loopback(node.address):
            raise LocalClusterError(
                f"node {node.name!r} has address {node.address}; a simulated cluster runs on "
                "this machine only, so use 127.0.0.1:PORT addresses"
            )
    _check_none_up(state_dir)
    security = client_security(cluster.security)
    state_dir.mkdir(parents=True, exist_ok=True)
    cpu_groups = namespaces = None
    started: list[LocalNode] = []
    arbiters: list[LocalNode] = []
    try:
        if isolation is Isolation.KERNEL:
            cpu_groups = CpuGroups.create(cores_wanted(cluster), host_cores())
            write_state(state_dir, started, cpu_groups)
            namespaces = Namespaces.claim(cluster, str(state_dir.resolve()))
            # records the groups and namespaces before they are made, and before any node
            write_state(state_dir, started, cpu_groups, namespaces=namespaces)
            namespaces.build(cluster)
            cluster = namespaces.at_home(cluster)
        ports = _arbiter_ports(cluster)
        for medium, port in zip(cluster.media, ports, strict=True):
            host = namespaces.medium(medium.name).home if namespaces else "127.0.0.1"
            arbiters.append(_in_medium(namespaces, medium.name, functools.partial(
                _spawn_arbiter, medium.name, f"{host}:{port}", state_dir)))
            write_state(state_dir, started, cpu_groups, arbiters=arbiters)
        for arbiter in arbiters:
            _in_medium(namespaces, arbiter.name, functools.partial(_wait_arbiter, arbiter))
        media = {arbiter.name: arbiter.address for arbiter in arbiters}
        for spec in cluster.nodes:
            started.append(_spawn(cluster, spec.name, state_dir, cpu_groups, namespaces, media))
            write_state(state_dir, started, cpu_groups)
        for node in started:
            _ready(node, cluster, security, cpu_groups)
    except BaseException:
        stop_cluster(state_dir, started, cpu_groups, namespaces)
        raise
    return started


def _in_medium(namespaces: Namespaces | None, medium: str, function: Callable[[], T]) -> T:
    """``function()`` in medium ``medium``'s namespace if there are ``namespaces``, else
    here: an arbiter runs, and is reached, there."""
    return namespaces.run_in_medium(medium, function) if namespaces else function()


def _arbiter_ports(cluster: ClusterSpec) -> list[int]:
    """A free port for each medium's arbiter, none of them a node's."""
    taken = {node.address.rpartition(":")[2] for node in cluster.nodes}
    while True:
        ports = free_ports(len(cluster.media))
        if not taken.intersection(map(str, ports)):
            return ports


def _spawn_arbiter(name: str, address: str, state_dir: Path) -> LocalNode:
    """Start the arbiter of medium ``name`` on ``address``."""
    log_path = state_dir / f"medium-{name}.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, *_arbiter_arguments(name, address)], stdout=log_file,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    log.info("started the arbiter of medium %s on %s (pid %d)", name, address, process.pid)
    return LocalNode(name, address, process.pid, str(log_path), arbiter=True)


def _wait_arbiter(arbiter: LocalNode) -> None:
    """Block until ``arbiter`` accepts connections; fail with its log if it exits first."""
    host, _, port = arbiter.address.rpartition(":")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1.0):
            return
        if _process(arbiter) is None:
            tail = Path(arbiter.log_path).read_text(errors="replace").strip().splitlines()
            raise LocalClusterError(f"the arbiter of medium {arbiter.name!r} exited at start: "
                                    f"{tail[-1] if tail else 'no output'}")
        if time.monotonic() > deadline:
            raise LocalClusterError(
                f"the arbiter of medium {arbiter.name!r} did not listen on {arbiter.address} "
                f"within {READY_TIMEOUT_S:.0f} s; see {arbiter.log_path}")
        time.sleep(0.1)


def with_fresh_certs(cluster: ClusterSpec, state_dir: Path) -> ClusterSpec:
    """``cluster`` with a ``security`` block naming new certificates and a new token, made in
    ``state_dir/certs`` (replacing any there from an earlier cluster)."""
    _check_none_up(state_dir)
    certs = state_dir / CERTS_DIR
    shutil.rmtree(certs, ignore_errors=True)
    return replace(cluster, security=make_certs(certs, cluster))


def _check_none_up(state_dir: Path) -> None:
    if read_state(state_dir):
        raise LocalClusterError(
            f"a simulated cluster is already up (state in {state_dir}); run `coordinator down`"
        )


def _spawn(
    cluster: ClusterSpec, name: str, state_dir: Path, cpu_groups: CpuGroups | None,
    namespaces: Namespaces | None,
    media: Mapping[str, str],
) -> LocalNode:
    """Start node ``name`` of ``cluster`` (with its credentials if the cluster has them),
    unslowed if there are ``cpu_groups`` (its group's quota, set by :func:`_ready`, slows
    it), in its namespace if there are ``namespaces`` (the kernel, not the worker, then
    limits its links' bandwidth), told the address of each medium's arbiter (``media``)."""
    spec = cluster.node(name)
    address, speed, threads = spec.address, spec.speed or 1.0, spec.threads or 1
    extra_args = node_arguments(cluster.security, name) if cluster.security else []
    log_path = state_dir / f"{name}.log"
    command = [
        sys.executable, *_node_arguments(name, address),
        "--speed-factor", str(1.0 if cpu_groups else speed), "--threads", str(threads),
        *(["--links-shaped"] if namespaces else []), *extra_args,
        *(f"--medium={medium}={arbiter}" for medium, arbiter in media.items()),
    ]
    with log_path.open("ab") as log_file:
        def start() -> subprocess.Popen[bytes]:
            # A new session: it outlives `coordinator up`, and Ctrl-C there does not reach it.
            return subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        process = namespaces.run_inside(name, start) if namespaces else start()
    node = LocalNode(name, address, process.pid, str(log_path))
    log.info("started %s on %s (pid %d)", name, address, process.pid)
    return node


def _ready(node: LocalNode, cluster: ClusterSpec, security: Security | None,
           cpu_groups: CpuGroups | None) -> None:
    """Wait until ``node`` answers, then put it in its CPU group if there are ``cpu_groups``:
    it imports and starts at the host's speed (a quarter-core quota made that take ~14 s)
    and computes at its own."""
    _wait_ready(node, security)
    if cpu_groups is not None:
        spec = cluster.node(node.name)
        cpu_groups.place(node.name, node.pid, spec.speed or 1.0, spec.threads or 1)


def _wait_ready(node: LocalNode, security: Security | None) -> None:
    """Block until ``node`` answers Describe with its own name (not some other server on its
    port); fail with the last line of its log if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    options = channel_options(security, node.name)
    with (
        grpc.secure_channel(node.address, channel_credentials(security), options)
        if security and security.tls else grpc.insecure_channel(node.address, options)
    ) as channel:
        stub = pb_grpc.EdgeNodeStub(channel)
        while True:
            try:
                reply = stub.Describe(pb.DescribeRequest(), timeout=1.0,
                                      metadata=token_metadata(security))
                if reply.name == node.name:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
            if _process(node) is None:
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
    running = {process: node for node in nodes if (process := _process(node)) is not None}
    for process in running:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, stuck = psutil.wait_procs(list(running), timeout=grace_s)  # reaps our own children
    for process in stuck:
        log.warning("node %s did not stop in %.0f s; killing it", running[process].name, grace_s)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(stuck, timeout=grace_s)


def _node_arguments(name: str, address: str) -> list[str]:
    """The start of an ``edge-node`` command line after the interpreter: what identifies it."""
    return ["-m", "node.cli", "--listen", address, "--name", name]


def _arbiter_arguments(name: str, address: str) -> list[str]:
    """An arbiter's command line after the interpreter."""
    return ["-m", "node.arbiter", "--listen", address, "--medium", name]


def _process(node: LocalNode) -> psutil.Process | None:
    """``node``'s process while it runs: its pid, if that is still this node's ``edge-node``
    (or arbiter) command (a pid may be reused). Reaps the node if it is our exited child."""
    expected = (_arbiter_arguments if node.arbiter else _node_arguments)(node.name, node.address)
    try:
        process = psutil.Process(node.pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            process.wait(0)  # raises TimeoutExpired if it is not our child to reap
            return None
        arguments = process.cmdline()[1 : 1 + len(expected)]
    except psutil.Error:
        return None
    return process if arguments == expected else None


def write_state(
    state_dir: Path, nodes: list[LocalNode], cpu_groups: CpuGroups | None, *,
    arbiters: list[LocalNode] | None = None, namespaces: Namespaces | None = None,
) -> None:
    """Record the cluster's processes; ``arbiters`` or ``namespaces`` of ``None`` keep
    those recorded."""
    recorded = _read_record(state_dir)
    arbiters = recorded.arbiters if arbiters is None else arbiters
    namespaces = recorded.namespaces if namespaces is None else namespaces
    record = {"nodes": [asdict(n) for n in nodes],
              "cpu_groups": cpu_groups.to_dict() if cpu_groups else None,
              "arbiters": [asdict(a) for a in arbiters],
              "namespaces": namespaces.to_dict() if namespaces else None}
    (state_dir / STATE_FILE).write_text(json.dumps(record, indent=1))


def _read_record(state_dir: Path) -> _Record:
    """Every process, the CPU groups and the namespaces ``up`` recorded (running or not)."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return _Record([], None, [], None)
    try:
        record = json.loads(path.read_text())
        nodes = [LocalNode(**entry) for entry in record["nodes"]]
        arbiters = [LocalNode(**entry) for entry in record.get("arbiters", [])]
        groups, namespaces = record["cpu_groups"], record.get("namespaces")
        return _Record(nodes, CpuGroups.from_dict(groups) if groups is not None else None,
                       arbiters,
                       Namespaces.from_dict(namespaces) if namespaces is not None else None)
    except (ValueError, TypeError, KeyError) as err:
        raise LocalClusterError(
            f"{path} is damaged ({err!r}); delete it and stop nodes by hand"
        ) from err


def read_state(state_dir: Path) -> list[LocalNode]:
    """The nodes recorded by ``up`` that still run; an empty list if none."""
    return [n for n in _read_record(state_dir).nodes if _process(n) is not None]


def read_arbiters(state_dir: Path) -> list[LocalNode]:
    """The media's arbiters recorded by ``up`` that still run."""
    return [a for a in _read_record(state_dir).arbiters if _process(a) is not None]


def read_cpu_groups(state_dir: Path) -> CpuGroups | None:
    """The CPU groups of the cluster ``up`` started with kernel isolation, else ``None``;
    their :attr:`~CpuGroups.stretch` scales every node's speed (and so the predictions)."""
    return _read_record(state_dir).cpu_groups


def read_namespaces(state_dir: Path) -> Namespaces | None:
    """The network namespaces of the cluster ``up`` started with kernel isolation, else
    ``None``."""
    return _read_record(state_dir).namespaces


def stop_cluster(
    state_dir: Path, nodes: list[LocalNode], cpu_groups: CpuGroups | None,
    namespaces: Namespaces | None = None,
) -> None:
    """Stop ``nodes`` and then the media's recorded arbiters, remove ``namespaces`` and
    ``cpu_groups`` once they are empty, and clear the state (kept if one could not be
    removed, so ``down`` can try again)."""
    stop_nodes(nodes)
    stop_nodes(_read_record(state_dir).arbiters)
    try:
        if namespaces is not None:
            namespaces.remove()
    finally:
        if cpu_groups is not None:
            cpu_groups.remove()
    clear_state(state_dir)


def stop_recorded(state_dir: Path) -> tuple[int, int]:
    """Stop the cluster ``state_dir`` records (what ``down`` does): its nodes and arbiters
    that still run, its CPU groups and its namespaces. How many nodes and arbiters ran."""
    record = _read_record(state_dir)
    running = [n for n in record.nodes if _process(n) is not None]
    arbiters = len(read_arbiters(state_dir))
    stop_cluster(state_dir, running, record.cpu_groups, record.namespaces)
    return len(running), arbiters


def clear_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / PLANNING_NODES_FILE).unlink(missing_ok=True)


def exit_on_sigterm() -> Callable[[], None]:
    """Make a SIGTERM raise :class:`SystemExit` (exit status 143) in the main thread, so the
    ``with`` blocks it interrupts clean up (a benchmark's workers run in sessions of their
    own, and a plain SIGTERM would leave them running); returns what puts the old handler
    back. Does nothing off the main thread or where SIGTERM already has a handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return lambda: None

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


class LocalCluster:
    """Context manager: the simulated cluster is up inside the ``with`` block, and always
    stopped when it ends, even on an error or a SIGTERM (which, inside the block, raises
    :class:`SystemExit` in the main thread unless something else already handles it).

    With ``secure``, the workers run with fresh certificates and a token, and
    :attr:`cluster` carries the ``security`` block to plan and connect with. With
    :attr:`Isolation.KERNEL`, :attr:`cpu_groups` are the workers' CPU groups,
    :attr:`namespaces` their network namespaces, and :attr:`cluster` gives each node its
    home address.
    """

    def __init__(self, cluster: ClusterSpec, state_dir: Path, *, secure: bool = False,
                 isolation: Isolation = Isolation.NONE) -> None:
        self.cluster = cluster
        self.state_dir = state_dir
        self.secure = secure
        self.isolation = isolation
        self.nodes: list[LocalNode] = []
        self.cpu_groups: CpuGroups | None = None
        self.namespaces: Namespaces | None = None
        self._on_sigterm: Callable[[], None] = lambda: None

    def __enter__(self) -> LocalCluster:
        self._on_sigterm = exit_on_sigterm()
        try:
            if self.secure:
                self.cluster = with_fresh_certs(self.cluster, self.state_dir)
            self.nodes = start_cluster(self.cluster, self.state_dir, self.isolation)
        except BaseException:
            self._on_sigterm()
            raise
        self.cpu_groups = read_cpu_groups(self.state_dir)
        self.namespaces = read_namespaces(self.state_dir)
        if self.namespaces is not None:
            self.cluster = self.namespaces.at_home(self.cluster)
        if self.cpu_groups is not None and (line := self.cpu_groups.stretch_line()):
            log.warning("%s", line)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            stop_cluster(self.state_dir, self.nodes, self.cpu_groups, self.namespaces)
        finally:
            self._on_sigterm()

    def restart(self, name: str) -> LocalNode:
        """Start node ``name`` again (same address and speed); wait until it answers.

        A process of the node that still runs (leaving, or hung) is stopped first, as
        :func:`stop_nodes` does, so the new one can take its port.
        """
        stop_nodes([n for n in self.nodes if n.name == name])
        media = {a.name: a.address for a in _read_record(self.state_dir).arbiters}
        node = _spawn(self.cluster, name, self.state_dir, self.cpu_groups, self.namespaces,
                      media)
        self.nodes = [node if n.name == name else n for n in self.nodes]
        write_state(self.state_dir, self.nodes, self.cpu_groups)
        try:
            _ready(node, self.cluster, client_security(self.cluster.security), self.cpu_groups)
        except BaseException:
            stop_nodes([node])
            raise
        return node

    def cut(self, name: str) -> None:
        """Cut node ``name`` off the network: its process keeps running, but every link of
        its namespace is down (needs :attr:`Isolation.KERNEL`)."""
        self._network().cut(name)

    def heal(self, name: str) -> None:
        """Reconnect node ``name`` after :meth:`cut`."""
        self._network().heal(name)

    def _network(self) -> Namespaces:
        if self.namespaces is None:
            raise LocalClusterError(
                "only a cluster started with isolation=Isolation.KERNEL has links to cut; "
                "start it with that"
            )
        return self.namespaces

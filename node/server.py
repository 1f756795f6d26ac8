"""The edge-node gRPC server: the servicer and the ``serve(config)`` entry point."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import NoReturn

import grpc
import torch

from node.airtime import Arbiters
from node.auth import AuthInterceptor, WiredPeers
from node.codec import WireFrame, check_frame, decode_failure
from node.config import NodeConfig
from node.data_path import add_servicer
from node.errors import FrameError, FrameSpecError, LimitError, ListenError, ProbeError
from node.health import NodeHealth
from node.link import MediumUse
from node.loading import receive_artifact
from node.messages import FailureCode, Hop, NodeInfo, encoding_from_proto, link_from_proto
from node.next_hop import NextHop
from node.pipeline import Outlet, StageRunner, Work
from node.probe import EchoService, NodeProber, ProbeOptions
from node.profiling import NodeProfiler
from node.results import ResultsOwner
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.rpc_options import server_options
from node.security import is_loopback, server_credentials
from node.sysinfo import cpu_count, cpu_model, memory_bytes, resident_bytes
from partition.allocator import release_free_memory
from partition.artifact import load_program
from partition.errors import EdgesplitError
from partition.queues import QUEUE_DEPTH

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
"""How long in-flight calls may finish after SIGTERM/SIGINT before they are cancelled."""

REFUSAL_READ_S = 0.5
"""How long a refused ``Submit`` waits for the frame a sender may be writing."""

RELEASE_ABOVE_BYTES = 16 * 1024 * 1024
"""A refused frame at least this large has its memory given back to the OS at once."""

DRAIN_QUIET_S = 1.0
"""A draining node leaves once it has held no frame for this long (the coordinator has
routed around it)."""

DRAIN_TIMEOUT_S = 5.0
"""A draining node leaves after this long even if frames still arrive (or a result waits
for a subscriber that is gone); the coordinator replays what it did not finish."""


def media_problem(media: Sequence[MediumUse], arbiters: Mapping[str, str]) -> str | None:
    """Why a Wire's links cannot cross ``media`` here (``arbiters``: the node's), or ``None``."""
    for use in media:
        if use.name not in arbiters:
            return (f"Wire's link crosses medium {use.name!r}, but this node was started "
                    "without its arbiter; start the cluster with `coordinator up`, which "
                    "passes --medium NAME=HOST:PORT")
        if not 0 < use.bytes_per_s < math.inf or use.uses not in (1, 2):
            return (f"Wire's medium {use.name!r} needs a positive finite bytes_per_s and 1 "
                    f"or 2 uses, not {use.bytes_per_s!r} and {use.uses!r}")
    return None


class EdgeNodeServicer(pb_grpc.EdgeNodeServicer):
    """Decode, hand to the stage runner, encode; the logic lives in plain modules."""

    def __init__(
        self, config: NodeConfig, runner: StageRunner, results: ResultsOwner,
        profiler: NodeProfiler, peers: WiredPeers, health: NodeHealth,
    ) -> None:
        self._config = config
        self._runner = runner
        self._results = results
        self._profiler = profiler
        self._peers = peers
        self._health = health
        self._prober = NodeProber(config.max_message_bytes, config.security)
        self._echo = EchoService()
        self.resident_overhead_bytes = 0
        """Resident memory once serving, before any stage (set by :class:`EdgeNodeServer`)."""

    async def Describe(
        self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeInfo:
        total, available = memory_bytes()
        stage = self._runner.stage
        return NodeInfo(
            name=self._config.name,
            hostname=socket.gethostname(),
            cpu_model=cpu_model(),
            cpu_count=cpu_count(),
            torch_threads=torch.get_num_threads(),
            memory_total_bytes=total,
            memory_available_bytes=available,
            torch_version=torch.__version__,
            device=self._config.device,
            speed_factor=self._runner.speed_factor,
            stage=stage.info if stage else None,
            requests_served=self._runner.stats.count,
            queue_depth=self._runner.queue_depth,
            p50_stage_seconds=self._runner.stats.p50,
            bytes_sent=self._runner.bytes_sent,
            resident_overhead_bytes=self.resident_overhead_bytes,
            outbound_links=tuple(self._runner.outbound_links()),
        ).to_proto()

    async def Profile(
        self, request_iterator: AsyncIterator[pb.ProfileChunk], context: grpc.aio.ServicerContext
    ) -> pb.ProfileResult:
        try:
            profile = await self._profiler.profile(request_iterator)
        except EdgesplitError as err:
            await _refuse(context, "a Profile call", err)
        return pb.ProfileResult(profile_json=json.dumps(profile))

    async def LoadStage(
        self, request_iterator: AsyncIterator[pb.StageChunk], context: grpc.aio.ServicerContext
    ) -> pb.LoadStageReply:
        started = time.perf_counter()
        try:
            spec, artifact = await receive_artifact(
                request_iterator,
                max_bytes=self._config.max_stage_bytes,
                stall_s=self._config.upload_stall_s,
            )
            stage = await asyncio.to_thread(
                lambda data: self._runner.place(load_program(data), spec, len(data)), artifact
            )
        except EdgesplitError as err:  # LimitError, ArtifactError, ModelLoadError
            await _refuse(context, "a stage", err)
        self._runner.install(stage)
        del artifact  # the upload, and the stage replaced, go back to the OS at once
        release_free_memory()
        await self._health.set_ready(self._runner.wired)
        log.info(
            "stage %d loaded: sha256 %s, %d bytes, %.2f ms a request here",
            spec.index, spec.artifact_sha256, stage.size_bytes, stage.calibrated_s * 1e3,
        )
        return pb.LoadStageReply(
            stage=stage.info.to_proto(), load_seconds=time.perf_counter() - started
        )

    async def Wire(
        self, request: pb.WireRequest, context: grpc.aio.ServicerContext
    ) -> pb.WireReply:
        security = self._config.security
        encoding = encoding_from_proto(request.outbound_encoding)
        if encoding is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Wire names unknown outbound encoding {request.outbound_encoding}; upgrade "
                "this node to the coordinator's version",
            )
        hops = [Hop.from_proto(hop) for hop in request.next_hops]
        outbound, inbound = link_from_proto(request.outbound), link_from_proto(request.inbound)
        crossed = [*outbound.media, *inbound.media, *(m for hop in hops for m in hop.link.media)]
        if problem := media_problem(crossed, self._config.media):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if security and security.tls and any(not hop.node for hop in hops):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "with TLS, Wire must name each next node its certificate has to carry",
            )
        if any(not hop.share > 0 for hop in hops):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Wire gives next hop shares {[hop.share for hop in hops]}; each must be "
                "positive (the next stage's shares add up to 1)",
            )
        outlets: list[Outlet] = []
        try:
            for hop in hops:
                outlets.append(Outlet(await self._connect(hop, context), hop.node, hop.share,
                                      hop.link))
        except BaseException:
            for outlet in outlets:
                await outlet.sink.close()
            raise
        if not hops:
            outlets.append(Outlet(self._results, None, 1.0, outbound))
        self._peers.previous = frozenset(request.previous_nodes)
        await self._runner.wire(outlets, inbound, encoding)
        await self._health.set_ready(self._runner.stage is not None)
        log.info(
            "wired: next hop %s in %s, outbound %s, inbound %s",
            ", ".join(f"{o.sink.destination} ({o.share:.0%})" for o in outlets), encoding.value,
            [str(o.link) for o in outlets], inbound,
        )
        return pb.WireReply()

    async def _connect(self, hop: Hop, context: grpc.aio.ServicerContext) -> NextHop:
        """A stream to ``hop``, connected; the ``Wire`` call is refused if it does not
        accept connections."""
        security = self._config.security
        next_hop = NextHop(hop.address, self._config.max_message_bytes, security,
                           hop.node or None)
        try:
            await next_hop.connect()
        except TimeoutError:
            await next_hop.close()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"next hop {hop.address} does not accept connections"
                + (f" or its certificate does not name node {hop.node!r}"
                   if security and security.tls else ""),
            )
        return next_hop

    async def Submit(
        self,
        request_iterator: AsyncIterator[WireFrame | FrameError],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.Ack]:
        if self._runner.stage is None or not self._runner.wired:
            missing = "has no stage loaded; call LoadStage" if self._runner.stage is None else (
                "is not wired; call Wire")
            # Take the frame the sender may be writing first: refusing a stream while a
            # message is still arriving makes gRPC report INTERNAL instead of this status.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFUSAL_READ_S):
                    await context.read()
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self._config.name!r} {missing} first",
            )
        # context.read(), not ``async for`` over request_iterator: gRPC's iterator keeps the
        # last frame alive until the next one arrives, a refused 200 MB frame included.
        try:
            while (frame := await context.read()) is not grpc.aio.EOF:
                size = len(frame.raw) if isinstance(frame, WireFrame) else 0
                work = await self._accept(frame, context)
                del frame  # a refused frame's bytes go now, not when the next frame arrives
                if work.frame is None and size >= RELEASE_ABOVE_BYTES:
                    release_free_memory()
                await self._runner.submit(work)
                yield pb.Ack(request_id=work.request_id)
        finally:  # gRPC's buffers of a frame over --max-frame-bytes go with the stream
            release_free_memory()

    async def _accept(
        self, frame: WireFrame | FrameError, context: grpc.aio.ServicerContext
    ) -> Work:
        """Turn one incoming frame into work, or close the stream if it is malformed."""
        try:
            if isinstance(frame, FrameError):
                raise frame
            failure = decode_failure(frame)
            if failure is not None:
                return Work(failure.request_id, failure=frame.raw)
            header, payload = frame.header, frame.payload
            due = await self._runner.inbound.send(len(header) + len(payload))
            stage = self._runner.stage
            received = check_frame(header, payload, stage.spec.receives)
        except FrameSpecError as err:
            answer = self._runner.failure_frame(
                err.request_id, FailureCode.INVALID_ARGUMENT, str(err)
            )
            return Work(err.request_id, failure=answer)
        except FrameError as err:
            log.warning("closed a Submit stream: %s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return Work(received.request_id, stage=stage, frame=received, due=due)

    async def Results(
        self, request: pb.ResultsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        owner = False
        try:
            async with self._results.own():
                owner = True
                await context.send_initial_metadata(())
                await self._results.pump(context.write)
        except LimitError as err:  # another stream owns the results, or this one stalled
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if owner else grpc.StatusCode.ALREADY_EXISTS
            await context.abort(code, str(err))


    async def Probe(
        self, request: pb.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProbeReply:
        security = self._config.security
        if not request.target_address or (
                security and security.tls and not request.target_node):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Probe must name the target's address"
                + (" and, with TLS, the node its certificate has to carry"
                   if security and security.tls else ""),
            )
        options = ProbeOptions(request.payload_bytes, request.rounds)
        try:
            measured = await self._prober.probe(
                request.target_address, request.target_node or None, options,
                link_from_proto(request.outbound), link_from_proto(request.inbound),
            )
        except LimitError as err:
            await _refuse(context, "a Probe call", err)
        except ProbeError as err:
            log.warning("probe failed: %s", err)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        log.info("probed %s: %s", request.target_address, measured)
        return measured.to_proto()

    async def Echo(
        self, request_iterator: AsyncIterator[pb.EchoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EchoReply]:
        async for reply in self._echo.answer(context):
            yield reply


class EdgeNodeServer:
    """One running node: the gRPC server, its stage runner, and the results hub."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.arbiters = Arbiters(config.media)
        self.runner = StageRunner(
            node_name=config.name, device=config.device, speed_factor=config.speed_factor,
            airtime=self.arbiters,
        )
        self.results = ResultsOwner(QUEUE_DEPTH, config.results_stall_s)
        profiler = NodeProfiler(
            speed_factor=config.speed_factor,
            max_bytes=config.max_stage_bytes,
            stall_s=config.upload_stall_s,
        )
        peers = WiredPeers()
        self.health = NodeHealth()
        self.server = grpc.aio.server(
            options=server_options(config.max_message_bytes),
            interceptors=[AuthInterceptor(config.security, peers)] if config.security else None,
        )
        self.servicer = EdgeNodeServicer(
            config, self.runner, self.results, profiler, peers, self.health
        )
        add_servicer(self.servicer, self.server)
        self.health.add_to(self.server)
        self.port = 0

    async def start(self) -> None:
        """Bind, start serving and start the stage loops; :class:`ListenError` if taken."""
        _check_free(self.config.listen)
        security = self.config.security
        try:
            if security is not None and security.tls:
                self.port = self.server.add_secure_port(
                    self.config.listen, server_credentials(security)
                )
            else:
                self.port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError as err:
            raise _listen_error(self.config.listen, "cannot bind") from err
        await self.health.set_ready(False)
        await self.server.start()
        self.runner.start()
        self.servicer.resident_overhead_bytes = resident_bytes()
        log.info(
            "node %r listening on %s (device %s, speed factor %g, %d torch threads)",
            self.config.name, self.config.listen, self.config.device.value,
            self.config.speed_factor, torch.get_num_threads(),
        )
        if not is_loopback(self.config.listen) and not (
            security and security.tls and security.token
        ):
            log.warning(
                "listening on %s without TLS and a cluster token: anyone on the network can "
                "replace this node's stage and read its data; see `coordinator certs`",
                self.config.listen,
            )

    async def drain(
        self, quiet_s: float = DRAIN_QUIET_S, timeout_s: float = DRAIN_TIMEOUT_S
    ) -> None:
        """Report NOT_SERVING, then finish the frames held until none arrives for
        ``quiet_s`` (or ``timeout_s`` passes); the coordinator replays what is left."""
        log.info("node %r draining", self.config.name)
        await self.health.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        quiet_since = loop.time()
        while loop.time() < deadline and loop.time() - quiet_since < quiet_s:
            await asyncio.sleep(0.05)
            if self.runner.holding:
                quiet_since = loop.time()
        if self.runner.holding:
            log.warning("left with %d frame(s) unfinished", self.runner.holding)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Let in-flight calls finish for ``grace_s``, then stop everything."""
        log.info("node %r stopping", self.config.name)
        await self.server.stop(grace_s)
        await self.runner.stop()
        await self.arbiters.close()


async def serve(config: NodeConfig) -> None:
    """Run a node until SIGTERM or SIGINT, then drain and stop gracefully.

    SIGUSR1 halves the emulated speed (a device heating up), SIGUSR2 restores it.
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    node = EdgeNodeServer(config)
    await node.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: node.runner.set_speed_factor(node.runner.speed_factor / 2)
    )
    loop.add_signal_handler(
        signal.SIGUSR2, lambda: node.runner.set_speed_factor(config.speed_factor)
    )
    await stopping.wait()
    await node.drain()
    await node.stop()


async def _refuse(context: grpc.aio.ServicerContext, what: str, err: EdgesplitError) -> NoReturn:
    """Log and refuse a call with ``err``'s sentence, after giving back what it received.

    RESOURCE_EXHAUSTED for a :class:`LimitError`, INVALID_ARGUMENT otherwise.
    """
    err.__traceback__ = None  # its frames hold the bytes received so far
    release_free_memory()
    log.warning("refused %s: %s", what, err)
    limit = isinstance(err, LimitError)
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if limit else grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(code, str(err))


def _check_free(listen: str) -> None:
    """Fail early, with a clear message, if another process holds the port."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ListenError(f"cannot listen on {listen}: expected HOST:PORT")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ListenError(f"cannot listen on {listen}: unknown host ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise _listen_error(listen, err.strerror or str(err)) from err


def _listen_error(listen: str, reason: str) -> ListenError:
    return ListenError(
        f"cannot listen on {listen}: {reason.lower()}; pick another --listen port"
    )

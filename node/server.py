"""The edge-node gRPC server: the servicer and the ``serve(config)`` entry point."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator

import grpc
import torch

from node.codec import WireFrame, decode_frame
from node.config import NodeConfig
from node.data_path import add_servicer
from node.errors import FrameError, FrameSpecError, ListenError
from node.health import NodeHealth
from node.loading import receive_artifact
from node.messages import FailureCode, NodeInfo, link_from_proto
from node.next_hop import NextHop
from node.pipeline import QUEUE_DEPTH, StageRunner, Work
from node.profiling import profile_on_node, receive_model
from node.results import ResultsHub
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.rpc_options import server_options
from node.sysinfo import cpu_count, cpu_model, memory_bytes
from partition.artifact import load_program
from partition.errors import EdgesplitError

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
"""How long in-flight calls may finish after SIGTERM/SIGINT before they are cancelled."""

DRAIN_QUIET_S = 1.0
"""A draining node leaves once it has held no frame for this long (the coordinator has
routed around it)."""

DRAIN_TIMEOUT_S = 5.0
"""A draining node leaves after this long even if frames still arrive (or a result waits
for a subscriber that is gone); the coordinator replays what it did not finish."""


class EdgeNodeServicer(pb_grpc.EdgeNodeServicer):
    """Decode, hand to the stage runner, encode; the logic lives in plain modules."""

    def __init__(
        self, config: NodeConfig, runner: StageRunner, results: ResultsHub, health: NodeHealth
    ) -> None:
        self._config = config
        self._runner = runner
        self._results = results
        self._health = health

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
            requests_served=self._runner.stats.requests_served,
            queue_depth=self._runner.queue_depth,
            p50_stage_seconds=self._runner.stats.p50_seconds,
        ).to_proto()

    async def Profile(
        self, request_iterator: AsyncIterator[pb.ProfileChunk], context: grpc.aio.ServicerContext
    ) -> pb.ProfileResult:
        try:
            options, data = await receive_model(request_iterator)
            profile = await asyncio.to_thread(
                profile_on_node, data, options, self._config.speed_factor
            )
        except EdgesplitError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.ProfileResult(profile_json=json.dumps(profile))

    async def LoadStage(
        self, request_iterator: AsyncIterator[pb.StageChunk], context: grpc.aio.ServicerContext
    ) -> pb.LoadStageReply:
        started = time.perf_counter()
        try:
            spec, artifact = await receive_artifact(request_iterator)
            stage = await asyncio.to_thread(
                lambda: self._runner.place(load_program(artifact), spec, len(artifact))
            )
        except EdgesplitError as err:  # ArtifactError, ModelLoadError
            log.warning("refused a stage: %s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        self._runner.stage = stage
        await self._health.set_ready(self._runner.sink is not None)
        log.info(
            "stage %d loaded: sha256 %s, %d bytes, %.2f ms a request here",
            spec.index, spec.artifact_sha256, len(artifact), stage.calibrated_s * 1e3,
        )
        return pb.LoadStageReply(
            stage=stage.info.to_proto(), load_seconds=time.perf_counter() - started
        )

    async def Wire(
        self, request: pb.WireRequest, context: grpc.aio.ServicerContext
    ) -> pb.WireReply:
        if request.next_address:
            hop = NextHop(request.next_address, self._config.max_message_bytes)
            try:
                await hop.connect()
            except TimeoutError:
                await hop.close()
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"next hop {request.next_address} does not accept connections",
                )
            sink: NextHop | ResultsHub = hop
        else:
            sink = self._results
        outbound, inbound = link_from_proto(request.outbound), link_from_proto(request.inbound)
        await self._runner.wire(sink, outbound, inbound)
        await self._health.set_ready(self._runner.stage is not None)
        log.info(
            "wired: next hop %s, outbound %s, inbound %s",
            request.next_address or "Results subscribers", outbound, inbound,
        )
        return pb.WireReply()

    async def Submit(
        self,
        request_iterator: AsyncIterator[WireFrame | FrameError],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.Ack]:
        if self._runner.stage is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self._config.name!r} has no stage loaded; call LoadStage first",
            )
        if self._runner.sink is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self._config.name!r} is not wired; call Wire first",
            )
        async for frame in request_iterator:
            work = await self._accept(frame, context)
            await self._runner.submit(work)
            yield pb.Ack(request_id=work.request_id)

    async def _accept(
        self, frame: WireFrame | FrameError, context: grpc.aio.ServicerContext
    ) -> Work:
        """Turn one incoming frame into work, or close the stream if it is malformed."""
        if isinstance(frame, FrameError):
            log.warning("closed a Submit stream: %s", frame)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(frame))
        if frame.failure is not None:
            failure = pb.Failure.FromString(frame.failure)
            return Work(failure.request_id, failure=frame.raw)
        header, payload = frame.header, frame.payload
        await self._runner.inbound.carry(len(header) + len(payload))
        stage = self._runner.stage
        try:
            request_id, tensors = decode_frame(header, payload, stage.spec.receives)
        except FrameSpecError as err:
            failure = self._runner.failure_frame(
                err.request_id, FailureCode.INVALID_ARGUMENT, str(err)
            )
            return Work(err.request_id, failure=failure)
        except FrameError as err:
            log.warning("closed a Submit stream: %s", err)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return Work(request_id, stage=stage, tensors=tensors)

    async def Results(
        self, request: pb.ResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async with self._results.subscribe() as queue:
            await context.send_initial_metadata(())
            while True:
                yield await queue.get()


class EdgeNodeServer:
    """One running node: the gRPC server, its stage runner, and the results hub."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.runner = StageRunner(
            node_name=config.name, device=config.device, speed_factor=config.speed_factor
        )
        self.results = ResultsHub(QUEUE_DEPTH)
        self.health = NodeHealth()
        self.server = grpc.aio.server(options=server_options(config.max_message_bytes))
        add_servicer(EdgeNodeServicer(config, self.runner, self.results, self.health), self.server)
        self.health.add_to(self.server)
        self.port = 0

    async def start(self) -> None:
        """Bind, start serving and start the stage loops; :class:`ListenError` if taken."""
        _check_free(self.config.listen)
        try:
            self.port = self.server.add_insecure_port(self.config.listen)
        except RuntimeError as err:
            raise _listen_error(self.config.listen, "cannot bind") from err
        await self.health.set_ready(False)
        await self.server.start()
        self.runner.start()
        log.info(
            "node %r listening on %s (device %s, speed factor %g, %d torch threads)",
            self.config.name, self.config.listen, self.config.device.value,
            self.config.speed_factor, torch.get_num_threads(),
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

"""Talking to a node: the :class:`WorkerHandle` interface and its gRPC implementation.

The coordinator sees only this module's types, never gRPC's. Transport failures map to
:class:`NodeUnreachableError`, errors the node reports to :class:`NodeRejectedError`;
nothing is retried here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from grpc._cython import cygrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from node.channels import open_channel
from node.codec import Trace, decode_failure, decode_frame, decode_trace, encode_frame
from node.data_path import results_stream, submit_stream
from node.errors import FrameSpecError, NodeRejectedError, NodeUnreachableError, ProbeError
from node.health import OVERALL, is_serving
from node.link import NO_EMULATION, LinkEmulation
from node.messages import Failure, FailureCode, NodeInfo, StageInfo, Wiring, link_to_proto
from node.probe import PROBE_TIMEOUT_S, LinkMeasurement, ProbeOptions, measure_link
from node.profiling import ProfileOptions
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.security import Security
from partition.compression import LinkEncoding
from partition.errors import EdgesplitError
from partition.profiler import ProgressCallback
from partition.spec import StageSpec, TensorSpec

CHUNK_BYTES = 1024 * 1024
"""Size of the chunks a stage artifact or model file is streamed in."""

CALL_TIMEOUT_S = 30.0
"""Deadline of the short control calls (Describe, Wire)."""

_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# How gRPC describes connections that failed in the TLS handshake.
_CONNECT_FAILED = "failed to connect to all addresses"
_SERVER_DROPPED = "Socket closed"
_HANDSHAKE_FAILED = ("handshake failed", "Hostname Verification", "certificate")

_T = TypeVar("_T")

_STATUS_TASK = "_AioCall._handle_status_once_received"
"""The coroutine of the task in which gRPC awaits a streaming call's final status."""
SETTLE_TIMEOUT_S = 1.0
"""Bound on the wait for gRPC to take the final status of the calls a handle ended."""


@dataclass(frozen=True)
class Result:
    """The answer to one request: its output tensors, or the failure that replaced them;
    ``trace`` holds each stage's report if the request was traced."""

    request_id: int
    outputs: dict[str, torch.Tensor] | None = None
    failure: Failure | None = None
    trace: Trace | None = None


class FrameSender(ABC):
    """The data path into the first stage: frames go in, in order, until :meth:`close`,
    their tensors in ``encoding`` (the first link's)."""

    encoding: LinkEncoding

    @abstractmethod
    async def send(
        self, request_id: int, tensors: Mapping[str, torch.Tensor], trace: Trace | None = None
    ) -> None:
        """Send one request's input tensors (``trace=()`` to trace it through every stage);
        waits while the pipeline pushes back.

        Raises :class:`NodeRejectedError` once the node has closed the stream (for example
        after a malformed frame); earlier acknowledged requests are still answered.
        """

    @abstractmethod
    async def close(self) -> None:
        """Finish sending and wait until every frame is acknowledged."""

    @abstractmethod
    def abort(self) -> None:
        """Stop at once (the node is gone or hung); unacknowledged frames may be lost."""


class ResultStream(ABC):
    """Results from the last stage, in the order it finished them, until :meth:`close`."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[Result]: ...

    @abstractmethod
    async def close(self) -> None:
        """Cancel the subscription; an iteration waiting on it ends once the transport has
        ended its read (so await the reader, rather than cancel it mid-read)."""


class WorkerHandle(ABC):
    """Every remote call a node offers."""

    name: str
    address: str

    @abstractmethod
    async def describe(self) -> NodeInfo:
        """What the node is, what it has loaded, and how busy it is."""

    @abstractmethod
    async def profile(self, model: bytes, options: ProfileOptions) -> dict[str, Any]:
        """Profile a model file (a torch.export archive) on the node; the profile's dict."""

    @abstractmethod
    async def load_stage(
        self, spec: StageSpec, artifact: bytes, progress: ProgressCallback | None = None
    ) -> StageInfo:
        """Ship a stage artifact; the node checks its size and hash, then loads it."""

    @abstractmethod
    async def wire(self, wiring: Wiring) -> None:
        """Deal outputs among ``wiring.next_hops``, or (none) send them to Results
        subscribers here, in ``wiring.encoding`` (the outbound hop's).

        With TLS, each next hop's certificate must name its node, and only
        ``wiring.previous_nodes`` (besides the coordinator) may send frames here.
        """

    @abstractmethod
    async def probe(
        self, target_address: str, options: ProbeOptions, *, target_node: str | None = None,
        outbound: LinkEmulation = NO_EMULATION, inbound: LinkEmulation = NO_EMULATION,
    ) -> LinkMeasurement:
        """Have the node measure its link to the node at ``target_address`` (whose
        certificate must name ``target_node`` with TLS), through the emulation of the link
        there (``outbound``) and back (``inbound``)."""

    @abstractmethod
    async def measure_link(self, options: ProbeOptions) -> LinkMeasurement:
        """Measure the link from this process to the node."""

    @abstractmethod
    async def check_health(self, service: str = OVERALL, timeout_s: float = 1.0) -> bool:
        """Ask the standard health service: True if ``service`` is SERVING."""

    @abstractmethod
    def watch_health(self, service: str = OVERALL) -> AsyncIterator[bool]:
        """Each change of ``service``'s health (True for SERVING), until the stream breaks."""

    @abstractmethod
    async def open_sender(self, encoding: LinkEncoding = LinkEncoding.RAW) -> FrameSender:
        """Open the data path into this node's stage; frames are sent in ``encoding``."""

    @abstractmethod
    async def open_results(self, expected: Sequence[TensorSpec] | None = None) -> ResultStream:
        """Subscribe to this (last) node's results; subscribed once it returns.

        With ``expected``, each result frame is checked against it.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the connection."""


class GrpcWorkerHandle(WorkerHandle):
    """A node reached over gRPC at ``address`` (``host:port``); create it inside the loop.

    With TLS and a ``name``, the node's certificate must name it.
    """

    def __init__(
        self, address: str, name: str | None = None, security: Security | None = None
    ) -> None:
        self.address = address
        self.name = name or address
        self._channel = open_channel(address, security, server_name=name)
        self._stub = pb_grpc.EdgeNodeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def describe(self) -> NodeInfo:
        with _mapped_errors(self, "Describe"):
            reply = await _finished(self._stub.Describe(pb.DescribeRequest(),
                                                        timeout=CALL_TIMEOUT_S))
        return NodeInfo.from_proto(reply)

    async def profile(self, model: bytes, options: ProfileOptions) -> dict[str, Any]:
        first = pb.ProfileChunk(
            options=pb.ProfileOptions(
                granularity=options.granularity,
                threads=options.threads,
                repeats=options.repeats,
                warmup=options.warmup,
            )
        )
        chunks = _chunked(model, first, lambda data: pb.ProfileChunk(data=data), None)
        with _mapped_errors(self, "Profile"):
            reply = await _finished(self._stub.Profile(chunks))
        return json.loads(reply.profile_json)

    async def load_stage(
        self, spec: StageSpec, artifact: bytes, progress: ProgressCallback | None = None
    ) -> StageInfo:
        header = pb.StageHeader(
            spec_json=json.dumps(spec.to_dict()),
            total_bytes=len(artifact),
            sha256=spec.artifact_sha256,
        )
        first = pb.StageChunk(header=header)
        chunks = _chunked(artifact, first, lambda data: pb.StageChunk(data=data), progress)
        with _mapped_errors(self, "LoadStage"):
            reply = await _finished(self._stub.LoadStage(chunks))
        return StageInfo.from_proto(reply.stage)

    async def wire(self, wiring: Wiring) -> None:
        with _mapped_errors(self, "Wire"):
            await _finished(self._stub.Wire(wiring.to_proto(), timeout=CALL_TIMEOUT_S))

    async def probe(
        self, target_address: str, options: ProbeOptions, *, target_node: str | None = None,
        outbound: LinkEmulation = NO_EMULATION, inbound: LinkEmulation = NO_EMULATION,
    ) -> LinkMeasurement:
        request = pb.ProbeRequest(
            target_address=target_address, target_node=target_node or "",
            payload_bytes=options.payload_bytes, rounds=options.rounds,
            outbound=link_to_proto(outbound), inbound=link_to_proto(inbound),
        )
        with _mapped_errors(self, "Probe"):
            reply = await _finished(
                self._stub.Probe(request, timeout=PROBE_TIMEOUT_S + CALL_TIMEOUT_S))
        return LinkMeasurement.from_proto(reply)

    async def measure_link(self, options: ProbeOptions) -> LinkMeasurement:
        try:
            with _mapped_errors(self, "Echo"):
                return await measure_link(self._channel, options, NO_EMULATION, NO_EMULATION)
        except ProbeError as err:
            raise ProbeError(f"node {self.name!r} at {self.address}: {err}") from err

    async def check_health(self, service: str = OVERALL, timeout_s: float = 1.0) -> bool:
        with _mapped_errors(self, "Check"):
            reply = await _finished(self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            ))
        return is_serving(reply)

    async def watch_health(self, service: str = OVERALL) -> AsyncIterator[bool]:
        call = self._health.Watch(health_pb2.HealthCheckRequest(service=service))
        with _mapped_errors(self, "Watch"):
            while (reply := await _finished(call, call.read())) is not grpc.aio.EOF:
                yield is_serving(reply)

    async def open_sender(self, encoding: LinkEncoding = LinkEncoding.RAW) -> FrameSender:
        return _GrpcFrameSender(self, submit_stream(self._channel), encoding)

    async def open_results(self, expected: Sequence[TensorSpec] | None = None) -> ResultStream:
        call = results_stream(self._channel)
        with _mapped_errors(self, "Results"):
            await call.initial_metadata()
            if call.done():  # failed before subscribing: read() raises the call's error
                await call.read()
        return _GrpcResultStream(self, call, expected)

    async def close(self) -> None:
        """Cancel the calls still open, close the channel, and wait until gRPC has taken
        the final status of every call that ended here (see :func:`_settled`)."""
        await self._channel.close()
        await _settled()


class _GrpcFrameSender(FrameSender):
    def __init__(
        self, node: GrpcWorkerHandle, call: grpc.aio.StreamStreamCall, encoding: LinkEncoding
    ) -> None:
        self.encoding = encoding
        self._node = node
        self._call = call
        self._acks = asyncio.create_task(self._read_acks())

    async def send(
        self, request_id: int, tensors: Mapping[str, torch.Tensor], trace: Trace | None = None
    ) -> None:
        try:
            await self._call.write(encode_frame(request_id, tensors, trace, self.encoding))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self._acks  # raises the call's error
            raise  # the call ended without an error, yet refused the write

    async def close(self) -> None:
        with contextlib.suppress(asyncio.InvalidStateError):  # already ended: _acks knows why
            await _finished(self._call, self._call.done_writing())
        await asyncio.shield(self._acks)  # cancelled, this leaves the acks' read to abort()

    def abort(self) -> None:
        self._call.cancel()
        self._acks.add_done_callback(lambda acks: acks.cancelled() or acks.exception())

    async def _read_acks(self) -> None:
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as err:
            raise _error(self._node, "Submit", err) from err


class _GrpcResultStream(ResultStream):
    def __init__(
        self,
        node: GrpcWorkerHandle,
        call: grpc.aio.UnaryStreamCall,
        expected: Sequence[TensorSpec] | None,
    ) -> None:
        self._node = node
        self._call = call
        self._expected = expected

    async def __aiter__(self) -> AsyncIterator[Result]:
        with _mapped_errors(self._node, "Results"):
            async for frame in self._call:
                failure = decode_failure(frame)
                if failure is not None:
                    yield Result(failure.request_id, failure=failure)
                    continue
                try:
                    request_id, outputs = decode_frame(frame.header, frame.payload, self._expected)
                except FrameSpecError as err:  # a frame of another plan: answer it, go on
                    failure = Failure(err.request_id, FailureCode.INVALID_ARGUMENT, str(err),
                                      self._node.name, -1)
                    yield Result(err.request_id, failure=failure)
                    continue
                yield Result(request_id, outputs=outputs, trace=decode_trace(frame.header))

    async def close(self) -> None:
        self._call.cancel()


async def _finished(call: Any, step: Awaitable[_T] | None = None) -> _T:
    """Await ``step``, one operation of ``call`` (the whole call if none). If this task is
    cancelled meanwhile, cancel the call and wait until gRPC has finished the operation
    before raising: gRPC completes an abandoned operation later, on the loop that started
    it, and fails ("Event loop is closed") if that loop is closed by then."""
    running = asyncio.ensure_future(call if step is None else step)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        call.cancel()
        await asyncio.wait({running})
        if not running.cancelled():
            running.exception()  # the call's end, brought on by the cancel: not news
        raise


async def _settled() -> None:
    """Wait until gRPC's own tasks awaiting the final status of calls that ended (cancelled,
    here or by a closed channel) have it.

    A cancelled call is done at once, but gRPC's task still awaits the core's completion of
    the call's status; if the event loop closes first, gRPC fails on that completion in the
    next loop ("Event loop is closed"). gRPC offers no handle on that task, so it is found
    by its coroutine, whose scope holds the call.
    """
    ended = [task for task in asyncio.all_tasks() if _awaits_ended_call(task)]
    if ended:
        await asyncio.wait(ended, timeout=SETTLE_TIMEOUT_S)


def _awaits_ended_call(task: asyncio.Task[Any]) -> bool:
    coroutine = task.get_coro()
    if getattr(coroutine, "__qualname__", None) != _STATUS_TASK:
        return False
    held = [held for scope in gc.get_referents(coroutine) for held in gc.get_referents(scope)]
    return any(isinstance(call, cygrpc._AioCall) and call.done() for call in held)


@contextlib.contextmanager
def _mapped_errors(node: WorkerHandle, method: str) -> Iterator[None]:
    """Map a failed call of ``method`` on ``node`` to the project's errors."""
    try:
        yield
    except grpc.aio.AioRpcError as err:
        raise _error(node, method, err) from err


def _error(node: WorkerHandle, method: str, err: grpc.aio.AioRpcError) -> EdgesplitError:
    details = err.details() or ""
    if err.code() in _UNREACHABLE and details.startswith(_CONNECT_FAILED):
        if _SERVER_DROPPED in details:
            return NodeUnreachableError(
                f"node {node.name!r} at {node.address} closed the connection during the TLS "
                "handshake: it requires TLS with a certificate from its cluster's CA, so use "
                "that cluster's ca, cert and key (the security block of nodes.yaml)"
            )
        if any(sign in details for sign in _HANDSHAKE_FAILED):
            return NodeUnreachableError(
                f"node {node.name!r} at {node.address} failed the TLS handshake: its "
                f"certificate is not from our CA or does not name node {node.name!r}; start it "
                "with this cluster's certificates (`coordinator certs`)"
            )
    if err.code() in _UNREACHABLE:
        return NodeUnreachableError(
            f"node {node.name!r} at {node.address} is unreachable; "
            f"is `edge-node --listen {node.address}` running there?"
        )
    return NodeRejectedError(
        f"node {node.name!r} at {node.address} refused {method} "
        f"({err.code().name}): {err.details()}"
    )


def _chunked(
    data: bytes,
    first: Any,
    make: Callable[[bytes], Any],
    progress: ProgressCallback | None,
) -> Iterator[Any]:
    """``first`` (carrying the first chunk of ``data``), then the rest of ``data`` in chunks."""
    first.data = data[:CHUNK_BYTES]
    yield first
    for offset in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
        if progress is not None:
            progress(offset, len(data))
        yield make(data[offset : offset + CHUNK_BYTES])
    if progress is not None:
        progress(len(data), len(data))

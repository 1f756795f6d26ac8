"""Link probes: the round-trip time and bandwidth from here to a node, over gRPC.

A probe sends messages on one ``Echo`` stream: the fastest tiny one times the round trip,
sized ones the bandwidth (the median extra time a sized message takes over a tiny one). On
an emulated link each message is charged its time over the link out and its reply's over
the link back (its transfer time and latency, the figures the send loop delays frames by),
added to what the round trip measured rather than slept: the event loop wakes a sleeper up
to a millisecond late on a busy machine, which would read as latency. So on a simulated
cluster a probe recovers the emulated figures plus what the loopback itself takes.

A node probes for the coordinator, one probe at a time, within :data:`MAX_PROBE_BYTES`,
:data:`MAX_PROBE_ROUNDS` and :data:`PROBE_TIMEOUT_S`, and sends nothing sized to a target
before it answered a tiny ``Echo``: a probe cannot make a node hold much memory, run long,
or pour data on an address that is not a worker accepting this node's credentials. A node
answers at most :data:`MAX_ECHO_STREAMS` ``Echo`` streams at once and closes one that stays
idle for :data:`ECHO_IDLE_S` (:class:`EchoService`), so a peer without credentials on a
cluster without TLS cannot hold streams open.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from node.data_path import method_path
from node.errors import LimitError, ProbeError
from node.limits import check_within
from node.link import NO_EMULATION, LinkEmulation
from node.next_hop import CONNECT_TIMEOUT_S, hop_channel
from node.rpc import edgesplit_pb2 as pb
from node.security import Security

MAX_PROBE_BYTES = 16 * 1024 * 1024
"""Largest sized payload a node sends (and so holds) for one probe."""

MAX_PROBE_ROUNDS = 20
"""Most timed rounds a node runs for one probe."""

PROBE_TIMEOUT_S = 120.0
"""Longest a node spends on one probe, emulated delays included."""

ECHO_TIMEOUT_S = 30.0
"""Deadline of one ``Echo``."""

ECHO_IDLE_S = 10.0
"""A node closes an ``Echo`` stream with no message for this long (a probe sends its next
message as soon as the last reply arrives)."""

MAX_ECHO_STREAMS = 4
"""Most ``Echo`` streams a node answers at once (probes run one at a time per node)."""

WARMUP_ROUNDS = 2
"""Untimed rounds before a probe's timed ones."""

TINY_PER_ROUND = 3
"""Tiny messages per round; the fastest of them is the round's round trip."""

_TINY = pb.EchoRequest(payload=b"\0").SerializeToString()


@dataclass(frozen=True)
class ProbeOptions:
    """What to send: ``payload_bytes`` per sized ``Echo``, ``rounds`` timed rounds."""

    payload_bytes: int
    rounds: int

    def check(self, max_message_bytes: int) -> None:
        """Refuse sizes beyond the node's bounds: :class:`LimitError` naming the field."""
        largest = min(MAX_PROBE_BYTES, max_message_bytes - 64)
        check_within("Probe", (
            ("payload_bytes", self.payload_bytes, 1, largest),
            ("rounds", self.rounds, 1, MAX_PROBE_ROUNDS),
        ))


@dataclass(frozen=True)
class LinkMeasurement:
    """A link as measured: the fastest round trip (queueing and scheduling only add to the
    link's own), the median bandwidth, and the rounds taken."""

    rtt_s: float
    bytes_per_s: float
    rounds: int

    @property
    def latency_s(self) -> float:
        """One-way latency: half the round trip."""
        return self.rtt_s / 2

    def to_proto(self) -> pb.ProbeReply:
        return pb.ProbeReply(rtt_seconds=self.rtt_s, bytes_per_s=self.bytes_per_s,
                             rounds=self.rounds)

    @classmethod
    def from_proto(cls, msg: pb.ProbeReply) -> LinkMeasurement:
        return cls(msg.rtt_seconds, msg.bytes_per_s, msg.rounds)


class EchoStream:
    """One ``Echo`` stream: each :meth:`round_trip` writes a message (an ``EchoRequest``'s
    wire bytes, serialized once) and waits for its reply."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(method_path("Echo"), request_serializer=None,
                                       response_deserializer=pb.EchoReply.FromString)
        self._call = method()

    async def round_trip(
        self, message: bytes, outbound: LinkEmulation = NO_EMULATION,
        inbound: LinkEmulation = NO_EMULATION,
    ) -> float:
        """Seconds until ``message`` is answered, plus its emulated time over ``outbound``
        and its reply's over ``inbound``.

        Raises ``grpc.aio.AioRpcError`` if the stream fails, :class:`ProbeError` if it ends or
        a reply takes over :data:`ECHO_TIMEOUT_S`.
        """
        started = time.perf_counter()
        try:
            async with asyncio.timeout(ECHO_TIMEOUT_S):
                await self._call.write(message)
                reply = await self._call.read()
        except TimeoutError:
            raise ProbeError(f"no Echo reply within {ECHO_TIMEOUT_S:.0f} s") from None
        if reply is grpc.aio.EOF:
            raise ProbeError("the Echo stream ended before its reply")
        measured = time.perf_counter() - started
        return measured + _crossing_s(outbound, len(message)) + _crossing_s(inbound,
                                                                           reply.ByteSize())

    def close(self) -> None:
        self._call.cancel()


def _crossing_s(link: LinkEmulation, nbytes: int) -> float:
    """Seconds a message of ``nbytes`` takes over ``link``: its transfer, then the latency."""
    return link.transfer_seconds(nbytes) + link.latency_s


async def measure_link(
    channel: grpc.aio.Channel,
    options: ProbeOptions,
    outbound: LinkEmulation = NO_EMULATION,
    inbound: LinkEmulation = NO_EMULATION,
) -> LinkMeasurement:
    """Time ``options.rounds`` rounds on ``channel`` (after :data:`WARMUP_ROUNDS` untimed
    ones that open the stream and its flow-control windows), each of
    :data:`TINY_PER_ROUND` tiny messages and one sized one: the round trip is the fastest
    tiny message, the bandwidth the payload over the median time a sized message took more
    than its round's fastest tiny one.

    Raises ``grpc.aio.AioRpcError`` if the stream fails, :class:`ProbeError` if it ends or
    hangs.
    """
    sized = pb.EchoRequest(payload=bytes(options.payload_bytes)).SerializeToString()
    stream = EchoStream(channel)

    async def one_round() -> tuple[float, float]:
        small = min([await stream.round_trip(_TINY, outbound, inbound)
                     for _ in range(TINY_PER_ROUND)])
        return small, await stream.round_trip(sized, outbound, inbound) - small

    try:
        for _ in range(WARMUP_ROUNDS):
            await one_round()
        rounds = [await one_round() for _ in range(options.rounds)]
    finally:
        stream.close()
    seconds = max(statistics.median(extra for _, extra in rounds), 1e-9)
    return LinkMeasurement(min(small for small, _ in rounds),
                           (len(sized) - len(_TINY)) / seconds, options.rounds)


class EchoService:
    """The answering side of ``Echo``: a byte count per message, within
    :data:`MAX_ECHO_STREAMS` streams and :data:`ECHO_IDLE_S` of idleness."""

    def __init__(self, max_streams: int = MAX_ECHO_STREAMS, idle_s: float = ECHO_IDLE_S) -> None:
        self._max_streams = max_streams
        self._idle_s = idle_s
        self._streams = 0

    async def answer(self, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EchoReply]:
        """Reply to each message of the stream ``context`` reads, until it ends; abort with
        RESOURCE_EXHAUSTED when :data:`MAX_ECHO_STREAMS` are open and DEADLINE_EXCEEDED
        when the stream idles."""
        if self._streams >= self._max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this node answers {self._max_streams} Echo streams already; "
                                "probe one link at a time")
        self._streams += 1
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_s):
                        # context.read(), not the iterator, which would keep the payload alive.
                        request = await context.read()
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"no Echo message for {self._idle_s:g} s; the stream "
                                        "is closed")
                if request is grpc.aio.EOF:
                    return
                received = len(request.payload)
                del request
                yield pb.EchoReply(received_bytes=received)
        finally:
            self._streams -= 1


class NodeProber:
    """Probes links from this node for the coordinator, one at a time."""

    def __init__(self, max_message_bytes: int, security: Security | None) -> None:
        self._max_message_bytes = max_message_bytes
        self._security = security
        self._busy = False

    async def probe(
        self, address: str, node: str | None, options: ProbeOptions,
        outbound: LinkEmulation, inbound: LinkEmulation,
    ) -> LinkMeasurement:
        """Measure the link to the node at ``address`` (whose certificate must name ``node``
        with TLS).

        Raises
        ------
        LimitError
            If a probe is running here, ``options`` exceed the bounds, or it takes longer
            than :data:`PROBE_TIMEOUT_S`.
        ProbeError
            If the target does not accept a connection, or refuses or drops an ``Echo``.
        """
        if self._busy:
            raise LimitError("this node is already probing a link; probe one link at a time")
        options.check(self._max_message_bytes)
        self._busy = True
        channel = hop_channel(address, self._max_message_bytes, self._security, node)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await _handshake(channel, node, self._security)
                return await measure_link(channel, options, outbound, inbound)
        except TimeoutError:
            raise LimitError(
                f"probing {address} took over {PROBE_TIMEOUT_S:.0f} s; ask for fewer rounds "
                "or smaller payloads"
            ) from None
        except grpc.aio.AioRpcError as err:
            raise ProbeError(f"probing {address}: the target broke the Echo stream "
                             f"({err.code().name}: {err.details()})") from None
        except ProbeError as err:
            raise ProbeError(f"probing {address}: {err}") from None
        finally:
            self._busy = False
            await channel.close()


async def _handshake(
    channel: grpc.aio.Channel, node: str | None, security: Security | None
) -> None:
    """Connect and send one tiny ``Echo``; :class:`ProbeError` if the target is not a node
    that accepts this node's credentials."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await channel.channel_ready()
        stream = EchoStream(channel)
        try:
            await stream.round_trip(_TINY)
        finally:
            stream.close()
    except (TimeoutError, grpc.aio.AioRpcError) as err:
        named = (f" or its certificate does not name node {node!r}"
                 if security is not None and security.tls else "")
        detail = f" ({err.code().name}: {err.details()})" if isinstance(
            err, grpc.aio.AioRpcError) else ""
        raise ProbeError(f"the target does not answer Echo{named}{detail}") from None

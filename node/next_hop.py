"""The long-lived ``Submit`` stream from this node to the next stage's node."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from node.channels import open_channel
from node.data_path import submit_stream
from node.security import Security

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""How long ``Wire`` waits for the next hop to accept a connection."""

CLOSE_TIMEOUT_S = 2.0
"""How long closing waits for the next hop to acknowledge; a hung one is cut off."""


def hop_channel(
    address: str, max_message_bytes: int, security: Security | None, node: str | None
) -> grpc.aio.Channel:
    """The channel a node opens to another node at ``address`` (whose certificate must name
    ``node`` with TLS): a next hop's, and a probe's."""
    return open_channel(address, security, server_name=node, max_message_bytes=max_message_bytes)


class NextHop:
    """Forwards frames to the next node over one ``Submit`` stream, reopened after a failure.

    A frame that cannot be written, or that was written but never acknowledged when the
    stream broke, is logged by request id and not retried: replaying requests after a node
    failure is the coordinator's job.
    """

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        security: Security | None = None,
        node: str | None = None,
    ) -> None:
        """``node``: the name the next hop's certificate must carry (with TLS)."""
        self.address = address
        self._channel = hop_channel(address, max_message_bytes, security, node)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._acks: asyncio.Task[None] | None = None
        self._unacked: deque[int] = deque()
        self._closed = False

    async def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Wait until the next node accepts a connection; ``TimeoutError`` if it does not."""
        async with asyncio.timeout(timeout_s):
            await self._channel.channel_ready()

    async def deliver(self, request_id: int, frame: bytes) -> None:
        """Write a serialized frame; waits while gRPC flow control pushes back. A frame
        for a hop already closed (the node was wired elsewhere meanwhile) is dropped: no
        stream is opened again on a channel being closed."""
        if self._closed:
            log.warning("request %d not forwarded to %s: the node was wired elsewhere",
                        request_id, self.address)
            return
        try:
            if self._call is None:
                self._call = submit_stream(self._channel)
                self._unacked.clear()
                self._acks = asyncio.create_task(self._read_acks(self._call))
            self._unacked.append(request_id)
            await self._call.write(frame)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            log.error("request %d not forwarded to %s: %s", request_id, self.address, err)
            self._call = None

    @property
    def destination(self) -> str:
        return self.address

    @property
    def backlog(self) -> int:
        """Frames written to the next node and not yet acknowledged by it."""
        return len(self._unacked)

    async def _read_acks(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while (ack := await call.read()) is not grpc.aio.EOF:
                while self._unacked and self._unacked.popleft() != ack.request_id:
                    pass
        except grpc.aio.AioRpcError as err:
            log.error(
                "next hop %s broke the stream (%s: %s); unacknowledged requests: %s",
                self.address, err.code().name, err.details(), list(self._unacked),
            )
            if self._call is call:
                self._call = None

    async def close(self) -> None:
        """Finish the stream (the next node keeps what it acknowledged) and the channel;
        a next hop that does not answer within :data:`CLOSE_TIMEOUT_S` is cut off."""
        self._closed = True
        call, self._call = self._call, None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if call is not None:
                    try:
                        await call.done_writing()
                    except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as err:
                        log.warning("closing the stream to %s: %s", self.address, err)
                if self._acks is not None:
                    await self._acks
        except TimeoutError:
            log.warning("next hop %s did not finish the stream; cut it off", self.address)
        await self._channel.close()

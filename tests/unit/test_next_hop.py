"""A next hop being closed takes no more frames: none reopens a stream on its channel."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import node.next_hop
from node.data_path import SERVICE
from node.next_hop import NextHop


async def test_a_frame_for_a_hop_being_closed_is_dropped_not_sent_on_a_new_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next node reads frames and never acknowledges them, so closing the hop waits
    for acknowledgements; a frame delivered meanwhile (the node was wired elsewhere while it
    was still on its way) must not open a new stream to the old next node."""
    monkeypatch.setattr(node.next_hop, "CLOSE_TIMEOUT_S", 0.5)
    streams: list[int] = []

    async def submit(frames, _context):
        streams.append(len(streams))
        async for _ in frames:
            pass
        await asyncio.Event().wait()  # no acknowledgement, and no end: close times out
        yield b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, {
        "Submit": grpc.stream_stream_rpc_method_handler(
            submit, request_deserializer=None, response_serializer=None)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        hop = NextHop(f"127.0.0.1:{port}", max_message_bytes=1 << 20)
        await hop.deliver(1, b"first")
        closing = asyncio.create_task(hop.close())
        await asyncio.sleep(0.1)  # closing: waiting for the first frame's acknowledgement
        await hop.deliver(2, b"late")
        await closing
        assert streams == [0]
    finally:
        await server.stop(None)

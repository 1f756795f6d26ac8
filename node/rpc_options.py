"""gRPC options shared by the node's server and every client, so both sides agree."""

from __future__ import annotations

MAX_MESSAGE_BYTES = 128 * 1024 * 1024
"""Largest gRPC message either side sends or accepts: a frame must fit in one."""


def grpc_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options: message size limits in both directions."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Server options: :func:`grpc_options`, and refuse a port another process holds."""
    return [*grpc_options(max_message_bytes), ("grpc.so_reuseport", 0)]

"""gRPC plumbing of the ``EdgeNode`` service, derived from the generated descriptor.

The method table (names, paths, streaming kinds and message classes) comes from
``edgesplit.proto`` through the generated ``edgesplit_pb2``; nothing is copied by hand.
Only the data path departs from the generated codecs: ``encode_frame`` writes a ``Frame``
message's wire bytes in one copy, so a frame is never rebuilt as a protobuf object on the
way out (upb takes ~1.4 ms/MB to serialize a large ``bytes`` field), and ``read_frame``
splits received bytes into views instead of parsing them into a protobuf object (which
copies the payload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from node.codec import WireFrame, read_frame
from node.errors import FrameError
from node.rpc import edgesplit_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["EdgeNode"]
"""The ``EdgeNode`` service of ``edgesplit.proto``."""

_HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
"""The handler factory for each (client streaming, server streaming) pair."""


def method_path(name: str) -> str:
    """The path a call of method ``name`` goes to, e.g. ``/edgesplit.v1.EdgeNode/Submit``."""
    return f"/{SERVICE.full_name}/{SERVICE.methods_by_name[name].name}"


def submit_stream(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """Open a ``Submit`` stream whose ``write`` takes a ``Frame``'s wire bytes."""
    method = channel.stream_stream(
        method_path("Submit"), request_serializer=None, response_deserializer=pb.Ack.FromString
    )
    return method()


def read_submitted_frame(data: bytes) -> WireFrame | FrameError:
    """``read_frame`` for the server: a malformed message is handed to the handler (which
    answers INVALID_ARGUMENT) instead of raising inside gRPC (which would answer INTERNAL)."""
    try:
        return read_frame(data)
    except FrameError as err:
        return err


def results_stream(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall:
    """Subscribe to ``Results``; each item read is a :class:`~node.codec.WireFrame`."""
    method = channel.unary_stream(
        method_path("Results"),
        request_serializer=pb.ResultsRequest.SerializeToString,
        response_deserializer=read_frame,
    )
    return method(pb.ResultsRequest())


_ZERO_COPY: dict[str, dict[str, Any]] = {
    "Submit": {"request_deserializer": read_submitted_frame},
    "Results": {"response_serializer": None},  # the servicer yields Frame wire bytes
}
"""Where the server departs from the generated codecs: the data path."""


def method_handlers(servicer: object) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per method of the service, calling the servicer's method of that name."""
    handlers = {}
    for method in SERVICE.methods:
        codecs = {
            "request_deserializer": GetMessageClass(method.input_type).FromString,
            "response_serializer": GetMessageClass(method.output_type).SerializeToString,
        } | _ZERO_COPY.get(method.name, {})
        make = _HANDLER_KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(getattr(servicer, method.name), **codecs)
    return handlers


def add_servicer(servicer: object, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_EdgeNodeServicer_to_server``, with the
    data path's codecs."""
    handler = grpc.method_handlers_generic_handler(SERVICE.full_name, method_handlers(servicer))
    server.add_generic_rpc_handlers((handler,))

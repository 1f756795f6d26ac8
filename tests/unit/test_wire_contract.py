"""The server answers exactly the ``EdgeNode`` service of ``proto/edgesplit.proto``.

The proto is compiled afresh (not read from the checked-in stubs), so a method added to it
fails here until the stubs are regenerated and the servicer serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pb2 import FileDescriptorSet
from grpc_tools import protoc

from node.config import Device, NodeConfig
from node.data_path import SERVICE, add_servicer, method_handlers, method_path
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from node.server import EdgeNodeServer

PROTO = Path(__file__).resolve().parents[2] / "proto" / "edgesplit.proto"

CALL_DEADLINE_S = 5.0
"""Each call's deadline. ``Echo``'s stream outlives the server's ``stop(0)`` and ends only
here, with DEADLINE_EXCEEDED; a method without an implementation answers UNIMPLEMENTED at
once, long before it."""

Kinds = dict[str, tuple[bool, bool]]
"""Method name -> (client streaming, server streaming)."""


@pytest.fixture(scope="module")
def proto_service(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Kinds]:
    """The full name of the proto's ``EdgeNode`` service and its methods' streaming kinds."""
    out = tmp_path_factory.mktemp("proto") / "edgesplit.pb"
    argv = ["protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]
    if protoc.main(argv) != 0:
        raise AssertionError(f"protoc could not compile {PROTO}")
    [file] = FileDescriptorSet.FromString(out.read_bytes()).file
    [service] = [s for s in file.service if s.name == "EdgeNode"]
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    return f"{file.package}.{service.name}", kinds


def test_handler_table_is_the_proto_service(proto_service: tuple[str, Kinds]) -> None:
    full_name, kinds = proto_service
    handlers = method_handlers(pb_grpc.EdgeNodeServicer())
    served = {name: (h.request_streaming, h.response_streaming) for name, h in handlers.items()}
    assert SERVICE.full_name == full_name
    assert served == kinds
    assert {method_path(name) for name in kinds} == {f"/{full_name}/{name}" for name in kinds}


async def test_server_answers_every_proto_method(proto_service: tuple[str, Kinds]) -> None:
    node = EdgeNodeServer(NodeConfig("127.0.0.1:0", name="contract", device=Device.CPU))
    await node.start()
    try:
        codes = await answers(f"127.0.0.1:{node.port}", *proto_service, stop=node.stop)
    finally:
        await node.stop()
    assert set(codes) == set(proto_service[1])
    unserved = [name for name, code in codes.items() if code == grpc.StatusCode.UNIMPLEMENTED]
    assert unserved == []


async def test_a_method_without_an_implementation_is_detected(
    proto_service: tuple[str, Kinds],
) -> None:
    """The check above can fail: the generated base servicer implements nothing."""
    server = grpc.aio.server()
    add_servicer(pb_grpc.EdgeNodeServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        codes = await answers(f"127.0.0.1:{port}", *proto_service, stop=server.stop)
    finally:
        await server.stop(None)
    assert set(codes.values()) == {grpc.StatusCode.UNIMPLEMENTED}


async def answers(
    address: str, full_name: str, kinds: Kinds, stop: Callable[[float], Awaitable[None]]
) -> dict[str, grpc.StatusCode]:
    """Call every method with empty messages; the status each ends with.

    Each call is first answered (headers or a status); then the server stops, which ends
    the calls still being served (``Results`` streams until cancelled) with a status of its
    own, never UNIMPLEMENTED.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        calls = {}
        for name, (client_streaming, server_streaming) in kinds.items():
            factory = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[client_streaming, server_streaming]
            request = iter([b""]) if client_streaming else b""
            calls[name] = factory(f"/{full_name}/{name}")(request, timeout=CALL_DEADLINE_S)
        for call in calls.values():
            await call.initial_metadata()
        await stop(0)
        return {name: await call.code() for name, call in calls.items()}

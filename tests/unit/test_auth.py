"""The worker's auth interceptor: the role table, the token check, once-per-peer logging."""

from __future__ import annotations

import logging
from collections import namedtuple

import grpc
import pytest
from grpc_health.v1 import health_pb2

from node.auth import (
    ALLOWED_ROLES,
    AuthInterceptor,
    Role,
    WiredPeers,
    peer_address,
    permitted,
    token_matches,
)
from node.rpc import edgesplit_pb2 as pb
from node.security import COORDINATOR_NAME, Security

SERVICE = pb.DESCRIPTOR.services_by_name["EdgeNode"]
Details = namedtuple("Details", "method invocation_metadata")


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    """The part of ``grpc.aio.ServicerContext`` the interceptor reads."""

    def __init__(self, peer: str, certificate: str | None = None) -> None:
        self._peer = peer
        self._certificate = certificate

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [self._certificate.encode()]} if self._certificate else {}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def method(name: str) -> str:
    return f"/{SERVICE.full_name}/{SERVICE.methods_by_name[name].name}"


def test_role_table_covers_every_method_of_the_service_and_of_health() -> None:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    assert set(ALLOWED_ROLES) == {method(m.name) for m in SERVICE.methods} | {
        f"/{health.full_name}/{m.name}" for m in health.methods
    }
    assert ALLOWED_ROLES[f"/{health.full_name}/Watch"] == ALLOWED_ROLES[method("Describe")]


@pytest.mark.parametrize("name, peer, previous, allowed", [
    ("LoadStage", COORDINATOR_NAME, (), True),
    ("LoadStage", "b", ("a",), False),
    ("Wire", "a", (), False),
    ("Profile", "a", (), False),
    ("Results", "a", (), False),
    ("Describe", "a", (), True),
    ("Describe", COORDINATOR_NAME, (), True),
    ("Submit", COORDINATOR_NAME, (), True),
    ("Submit", "a", ("a",), True),  # the node wired before this one
    ("Submit", "b", ("a", "b"), True),  # a replica of the previous stage
    ("Submit", "c", ("a", "b"), False),  # any other node
    ("Submit", "a", (), False),  # the first stage: only the coordinator sends
    ("Describe", None, (), False),  # no certificate at all
])
def test_permitted(name: str, peer: str | None, previous: tuple[str, ...], allowed: bool) -> None:
    assert permitted(ALLOWED_ROLES[method(name)], peer, frozenset(previous)) is allowed


def test_node_role_is_not_the_coordinator_role() -> None:
    assert not permitted(frozenset({Role.COORDINATOR}), "camera", frozenset())
    assert not permitted(frozenset({Role.NODE}), COORDINATOR_NAME, frozenset())


@pytest.mark.parametrize("metadata, ok", [
    ((("authorization", "Bearer s3cret"),), True),
    ((("x-other", "1"), ("authorization", "Bearer s3cret")), True),
    ((("authorization", b"Bearer s3cret"),), True),
    ((("authorization", "Bearer s3cre"),), False),
    ((("authorization", "Bearer s3cret2"),), False),
    ((("authorization", "Basic s3cret"),), False),
    ((("authorization", "s3cret"),), False),
    ((), False),
])
def test_token_matches(metadata: tuple, ok: bool) -> None:
    assert token_matches(metadata, b"s3cret") is ok


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared = []
    monkeypatch.setattr("node.auth.hmac.compare_digest",
                        lambda a, b: compared.append((a, b)) or a == b)
    assert token_matches((("authorization", "Bearer abc"),), b"abc")
    assert compared == [(b"abc", b"abc")]


@pytest.mark.parametrize("peer, address", [
    ("ipv4:10.0.0.5:43210", "10.0.0.5"),
    ("ipv6:[::1]:43210", "[::1]"),
    ("unix:/tmp/socket", "unix:/tmp/socket"),
])
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


async def call(
    interceptor: AuthInterceptor, name: str, context: FakeContext, token: str | None
) -> str:
    """Run a unary method through the interceptor; what the real handler returned."""

    async def behaviour(request: object, context: object) -> str:
        return "served"

    async def continuation(details: Details) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(behaviour)

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    handler = await interceptor.intercept_service(continuation, Details(method(name), metadata))
    return await handler.unary_unary(None, context)


async def test_wrong_or_missing_token_is_unauthenticated() -> None:
    interceptor = AuthInterceptor(Security(token=b"right"), WiredPeers())
    assert await call(interceptor, "Describe", FakeContext("ipv4:10.0.0.1:1"), "right") == "served"
    for token in ("wrong", None):
        with pytest.raises(Aborted) as caught:
            await call(interceptor, "Describe", FakeContext("ipv4:10.0.0.1:1"), token)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_refusals_are_logged_once_per_peer_address(caplog: pytest.LogCaptureFixture) -> None:
    interceptor = AuthInterceptor(Security(token=b"right"), WiredPeers())
    caplog.set_level(logging.WARNING, logger="node.auth")
    peers = ["ipv4:10.0.0.7:5001", "ipv4:10.0.0.7:5002", "ipv4:10.0.0.7:5003",
             "ipv4:10.0.0.8:5001", "ipv4:10.0.0.8:5009"]
    for peer in peers:
        with pytest.raises(Aborted):
            await call(interceptor, "Submit", FakeContext(peer), "wrong")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "10.0.0.7" in lines[0] and "10.0.0.8" in lines[1]


async def test_roles_follow_the_certificate_and_the_wiring() -> None:
    peers = WiredPeers()
    security = Security(token=b"t", ca=b"ca", cert=b"cert", key=b"key")
    interceptor = AuthInterceptor(security, peers)
    coordinator = FakeContext("ipv4:10.0.0.1:1", COORDINATOR_NAME)
    node_a = FakeContext("ipv4:10.0.0.2:1", "a")
    assert await call(interceptor, "LoadStage", coordinator, "t") == "served"
    for name in ("LoadStage", "Wire", "Submit"):
        with pytest.raises(Aborted) as caught:
            await call(interceptor, name, node_a, "t")
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "'a' may not call" in str(caught.value)
    peers.previous = frozenset({"a"})
    assert await call(interceptor, "Submit", node_a, "t") == "served"
    with pytest.raises(Aborted):  # the token is checked first, whatever the certificate
        await call(interceptor, "Describe", coordinator, "wrong")


async def test_streaming_handlers_are_checked_before_they_run() -> None:
    ran = []

    async def behaviour(requests: object, context: object):
        ran.append(True)
        yield "ack"

    async def continuation(details: Details) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(behaviour)

    interceptor = AuthInterceptor(Security(token=b"t"), WiredPeers())
    handler = await interceptor.intercept_service(continuation, Details(method("Submit"), ()))
    with pytest.raises(Aborted):
        async for _ in handler.stream_stream(None, FakeContext("ipv4:10.0.0.1:1")):
            pass
    assert not ran
    ok = Details(method("Submit"), (("authorization", "Bearer t"),))
    handler = await interceptor.intercept_service(continuation, ok)
    assert [r async for r in handler.stream_stream(None, FakeContext("ipv4:10.0.0.1:1"))] == [
        "ack"
    ]

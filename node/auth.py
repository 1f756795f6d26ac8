"""Who may call what on a node: the token check and the per-method role table, in one
server interceptor.

Without TLS only the token is checked: anyone holding it may call anything, since no role
can be proven. With TLS the peer's certificate (already verified against the cluster's CA
by the handshake) names its holder: :data:`~node.security.COORDINATOR_NAME`, or a node.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import grpc
from grpc_health.v1 import health_pb2

from node.rpc import edgesplit_pb2 as pb
from node.security import COORDINATOR_NAME, Security

log = logging.getLogger(__name__)

MAX_LOGGED_PEERS = 1024
"""Refusals are logged once per peer address, for at most this many addresses."""


class Role(StrEnum):
    """Who a caller is, as its certificate proves."""

    COORDINATOR = "coordinator"
    NODE = "node"
    """Any node of the cluster."""
    UPSTREAM = "upstream"
    """A node that ``Wire`` named as one of the previous stage's."""


_SERVICE = pb.DESCRIPTOR.services_by_name["EdgeNode"]
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def _by_method(roles: Mapping[str, frozenset[Role]]) -> dict[str, frozenset[Role]]:
    """Key the table by full method path; every method of the service needs an entry."""
    methods = set(_SERVICE.methods_by_name)
    if set(roles) != methods:
        raise RuntimeError(f"role table does not match the EdgeNode service: "
                           f"{sorted(set(roles) ^ methods)}")
    return {f"/{_SERVICE.full_name}/{name}": allowed for name, allowed in roles.items()}


ALLOWED_ROLES: dict[str, frozenset[Role]] = _by_method({
    "Describe": frozenset({Role.COORDINATOR, Role.NODE}),
    "Profile": frozenset({Role.COORDINATOR}),
    "LoadStage": frozenset({Role.COORDINATOR}),
    "Wire": frozenset({Role.COORDINATOR}),
    "Submit": frozenset({Role.COORDINATOR, Role.UPSTREAM}),
    "Results": frozenset({Role.COORDINATOR}),
    "Probe": frozenset({Role.COORDINATOR}),
    "Echo": frozenset({Role.COORDINATOR, Role.NODE}),
}) | {  # the standard health service: whoever may Describe may ask
    f"/{_HEALTH.full_name}/{method.name}": frozenset({Role.COORDINATOR, Role.NODE})
    for method in _HEALTH.methods
}
"""The roles that may call each method (with TLS)."""


@dataclass
class WiredPeers:
    """What ``Wire`` told this node about its neighbours: the nodes that may ``Submit`` here
    (every node of the previous stage)."""

    previous: frozenset[str] = frozenset()


def token_matches(metadata: Sequence[tuple[str, str | bytes]], token: bytes) -> bool:
    """True if ``metadata`` carries ``authorization: Bearer <token>``; compared in constant
    time."""
    for key, value in metadata:
        if key == "authorization":
            presented = value if isinstance(value, bytes) else value.encode()
            scheme, _, secret = presented.partition(b" ")
            return scheme == b"Bearer" and hmac.compare_digest(secret, token)
    return False


def permitted(allowed: frozenset[Role], peer: str | None, previous: Collection[str]) -> bool:
    """May the holder of the certificate named ``peer`` call a method ``allowed`` roles may?"""
    if peer is None:
        return False
    if peer == COORDINATOR_NAME:
        return Role.COORDINATOR in allowed
    return Role.NODE in allowed or (Role.UPSTREAM in allowed and peer in previous)


def certificate_name(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The common name of the peer's verified certificate, or ``None`` without one."""
    names = auth_context.get("x509_common_name") or ()
    return names[0].decode() if names else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, before any servicer method runs, a call without the cluster token
    (UNAUTHENTICATED) or, with TLS, from a certificate whose role may not call the method
    (PERMISSION_DENIED).

    The certificate and the peer's address are only known to the call's context, so the
    check wraps each handler: it runs first, then the real handler.
    """

    def __init__(self, security: Security, peers: WiredPeers) -> None:
        self._token = security.token
        self._tls = security.tls
        self._peers = peers
        self._logged: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None

        async def check(context: grpc.aio.ServicerContext) -> None:
            await self._check(details, context)

        return _guarded(handler, check)

    async def _check(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext
    ) -> None:
        method = details.method.rpartition("/")[2]
        if self._token is not None and not token_matches(
            details.invocation_metadata or (), self._token
        ):
            self._log_refusal(context, f"{method} without the cluster token")
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong cluster token; use this cluster's token file "
                "(security.token_file in nodes.yaml, edge-node --token-file)",
            )
        if not self._tls:
            return
        peer = certificate_name(context.auth_context())
        allowed = ALLOWED_ROLES.get(details.method, frozenset())
        if not permitted(allowed, peer, self._peers.previous):
            self._log_refusal(context, f"{method} from certificate {peer!r}")
            roles = ", ".join(sorted(allowed)) or "nobody"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {peer!r} may not call {method} on this node (allowed: {roles})",
            )

    def _log_refusal(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Log a refusal once per peer address, however many calls or frames follow."""
        address = peer_address(context.peer())
        if address in self._logged or len(self._logged) >= MAX_LOGGED_PEERS:
            return
        self._logged.add(address)
        log.warning("refused %s at %s; further refusals of this address are not logged",
                    what, address)


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.5:43210`` -> ``10.0.0.5``: the peer's address without its port."""
    scheme, _, rest = peer.partition(":")
    return rest.rpartition(":")[0] if scheme in ("ipv4", "ipv6") else peer


def _guarded(
    handler: grpc.RpcMethodHandler,
    check: Callable[[grpc.aio.ServicerContext], Awaitable[None]],
) -> grpc.RpcMethodHandler:
    """``handler`` with ``check(context)`` run before its behaviour, whatever its kind."""
    kind = (f"{'stream' if handler.request_streaming else 'unary'}_"
            f"{'stream' if handler.response_streaming else 'unary'}")
    behaviour = getattr(handler, kind)
    if inspect.isasyncgenfunction(behaviour):  # a streaming reply yielded, not written
        async def guarded(request, context):
            await check(context)
            async for reply in behaviour(request, context):
                yield reply
    else:
        async def guarded(request, context):
            await check(context)
            return await behaviour(request, context)
    return handler._replace(**{kind: guarded})

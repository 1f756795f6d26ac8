"""The one place channels to a node are made: by the coordinator and by a node's next hop.

With TLS the channel shows this process's certificate and trusts only the cluster's CA; with
``server_name`` the node's certificate must name it (so a next hop is the node the plan
says, not whoever holds its address). With a token, every call carries
``authorization: Bearer <token>``, added by a client interceptor because gRPC refuses call
credentials on a channel without TLS.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from node.rpc_options import MAX_MESSAGE_BYTES, grpc_options
from node.security import Security

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]
"""Retry a lost connection at least every second, so a node that comes back is seen soon;
and give each channel its own connections (gRPC shares them between channels with the same
target and options by default), so a new channel to a node that just restarted connects
afresh rather than through another channel's connection state."""


def open_channel(
    address: str,
    security: Security | None,
    *,
    server_name: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> grpc.aio.Channel:
    """An asyncio channel to the node at ``address`` (``host:port``) with ``security``."""
    options = channel_options(security, server_name, max_message_bytes)
    metadata = token_metadata(security)
    interceptors = [kind(metadata) for kind in _TOKEN_INTERCEPTORS] if metadata else None
    if security is not None and security.tls:
        return grpc.aio.secure_channel(
            address, channel_credentials(security), options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


def channel_options(
    security: Security | None,
    server_name: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> list[tuple[str, str | int]]:
    """Message size limits, and with TLS the name the node's certificate must carry."""
    options: list[tuple[str, str | int]] = [*grpc_options(max_message_bytes), *RECONNECT_OPTIONS]
    if security is not None and security.tls and server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def channel_credentials(security: Security) -> grpc.ChannelCredentials:
    """Mutual TLS: trust the cluster's CA only, and show this process's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=security.ca, private_key=security.key, certificate_chain=security.cert
    )


def token_metadata(security: Security | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries the cluster token (none without a token)."""
    if security is None or security.token is None:
        return ()
    return (("authorization", f"Bearer {security.token.decode()}"),)


class _AddsToken:
    """Adds the token's metadata to a call's details."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata: Sequence[tuple[str, str | bytes]] = tuple(details.metadata or ())
        return details._replace(metadata=grpc.aio.Metadata(*metadata, *self._metadata))


# grpc.aio files an interceptor under one kind of call only, so there is one class per kind.
class _UnaryUnaryToken(_AddsToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStreamToken(_AddsToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnaryToken(_AddsToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStreamToken(_AddsToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


_TOKEN_INTERCEPTORS = (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)

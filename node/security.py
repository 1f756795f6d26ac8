"""The cluster's credentials as a process holds them: the token and the TLS files' bytes.

The coordinator and every node hold the same CA certificate and token; each holds its own
certificate and key. A node's certificate names the node (common name and a DNS subject
alternative name); the coordinator's is named :data:`COORDINATOR_NAME`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from node.errors import SecurityConfigError
from partition.security_spec import SecuritySpec

COORDINATOR_NAME = "edgesplit-coordinator"
"""Common name of the coordinator's certificate; a node may not be called this."""


@dataclass(frozen=True, repr=False)  # repr=False: a log line never shows the secrets
class Security:
    """The cluster token, and the PEM bytes of the CA certificate, this process's certificate
    and its key (all three, or none: then no TLS)."""

    token: bytes | None = None
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None


def load_security(
    *,
    token_file: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> Security | None:
    """Read and check the credential files given; ``None`` if none is given.

    Raises
    ------
    SecurityConfigError
        A file is unreadable or not what it should be, the key does not belong to the
        certificate, or only some of the three TLS files are given.
    """
    if not any((token_file, ca, cert, key)):
        return None
    if any((ca, cert, key)) and not all((ca, cert, key)):
        raise SecurityConfigError(
            "TLS needs a CA certificate, a certificate and its key together; give all three"
        )
    token = _token(token_file) if token_file else None
    if ca is None:
        return Security(token=token)
    ca_pem, cert_pem, key_pem = _read(ca), _read(cert), _read(key)
    _certificate(ca_pem, ca)
    certificate = _certificate(cert_pem, cert)
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise SecurityConfigError(
            f"{key}: not an unencrypted PEM private key; give the .key file written by "
            "`coordinator certs`"
        ) from err
    if private_key.public_key() != certificate.public_key():
        raise SecurityConfigError(f"{key}: this key does not belong to the certificate {cert}")
    return Security(token=token, ca=ca_pem, cert=cert_pem, key=key_pem)


def client_security(spec: SecuritySpec | None) -> Security | None:
    """The coordinator's credentials named by a ``security:`` block (of nodes.yaml or a plan)."""
    if spec is None:
        return None
    return load_security(token_file=spec.token_file, ca=spec.ca, cert=spec.cert, key=spec.key)


def server_credentials(security: Security) -> grpc.ServerCredentials:
    """TLS for a node's port: its certificate, and clients must show one from the same CA."""
    return grpc.ssl_server_credentials(
        [(security.key, security.cert)], root_certificates=security.ca, require_client_auth=True
    )


def is_loopback(listen: str) -> bool:
    """True if ``HOST:PORT`` is reachable from this machine only."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or empty (every interface)
        return False


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(
            f"{path}: cannot read the file ({err.strerror}); check the path and its permissions"
        ) from err


def _token(path: str) -> bytes:
    token = _read(path).strip()
    if not token or not all(0x21 <= byte <= 0x7E for byte in token):
        raise SecurityConfigError(
            f"{path}: not a cluster token (one line of printable characters without spaces); "
            "use the token file written by `coordinator certs`"
        )
    return token


def _certificate(pem: bytes, path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise SecurityConfigError(
            f"{path}: not a PEM certificate; give the .crt file written by `coordinator certs`"
        ) from err

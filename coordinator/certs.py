"""A cluster's credentials in one step: a CA, a certificate per node and for the coordinator,
and a random token.

Layout of the directory (the coordinator's ``security:`` block names the first, the
coordinator's pair and the token; node ``NAME``'s files sit beside the CA)::

    ca.crt  ca.key  coordinator.crt  coordinator.key  NAME.crt  NAME.key ...  token

A node's certificate names the node (common name and a DNS subject alternative name) and its
host (an IP or DNS subject alternative name); the coordinator's is named
:data:`~node.security.COORDINATOR_NAME`. Keys are EC P-256; keys and the token are mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from node.security import COORDINATOR_NAME
from partition.cluster import ClusterSpec
from partition.errors import EdgesplitError
from partition.security_spec import SecuritySpec

VALID_DAYS = 3650
"""How long the certificates are valid: edge devices are rarely re-provisioned."""

CA_NAME = "edgesplit cluster CA"
_DNS_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class CertificateError(EdgesplitError):
    """The cluster's certificates cannot be made as asked."""


def make_certs(directory: Path, cluster: ClusterSpec) -> SecuritySpec:
    """Write the cluster's CA, node and coordinator certificates and token into
    ``directory``; the coordinator's ``security:`` block for them (absolute paths).

    Raises
    ------
    CertificateError
        A node's name cannot be a certificate's DNS name, or ``directory`` holds a CA already.
    """
    for node in cluster.nodes:
        if not _DNS_NAME.match(node.name) or node.name in (COORDINATOR_NAME, "ca", "coordinator"):
            raise CertificateError(
                f"node name {node.name!r} cannot name a certificate; rename it in nodes.yaml "
                f"with letters, digits, '-' and '.' (not 'ca', 'coordinator' or "
                f"{COORDINATOR_NAME!r})"
            )
    directory = directory.resolve()
    if (directory / "ca.key").exists():
        raise CertificateError(
            f"{directory} holds a CA already; pick an empty directory, or delete it to start over"
        )
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(CA_NAME, ca_key.public_key(), ca_key, None, sans=(), ca=True)
    _write(directory / "ca.crt", _pem(ca_cert))
    _write(directory / "ca.key", _key_pem(ca_key), secret=True)
    for node in cluster.nodes:
        _issue(directory, node.name, (node.name, node.address.rpartition(":")[0].strip("[]")),
               ca_key, ca_cert)
    _issue(directory, "coordinator", (COORDINATOR_NAME,), ca_key, ca_cert,
           common_name=COORDINATOR_NAME)
    _write(directory / "token", (secrets.token_urlsafe(32) + "\n").encode(), secret=True)
    return SecuritySpec(
        ca=str(directory / "ca.crt"), cert=str(directory / "coordinator.crt"),
        key=str(directory / "coordinator.key"), token_file=str(directory / "token"),
    )


def node_files(security: SecuritySpec, node: str) -> tuple[Path, Path]:
    """Node ``node``'s certificate and key: beside the CA certificate, named after the node."""
    directory = Path(security.ca).parent
    return directory / f"{node}.crt", directory / f"{node}.key"


def node_arguments(security: SecuritySpec, node: str) -> list[str]:
    """The ``edge-node`` options that turn on TLS and the token for node ``node``."""
    arguments = []
    if security.tls:
        cert, key = node_files(security, node)
        arguments += ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", security.ca]
    if security.token_file:
        arguments += ["--token-file", security.token_file]
    return arguments


def _issue(
    directory: Path,
    stem: str,
    names: tuple[str, ...],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str | None = None,
) -> None:
    """Write ``stem.crt`` and ``stem.key``: a certificate for ``names`` signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(common_name or stem, key.public_key(), ca_key, ca_cert, names, ca=False)
    _write(directory / f"{stem}.crt", _pem(cert))
    _write(directory / f"{stem}.key", _key_pem(key), secret=True)


def _certificate(
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    sans: tuple[str, ...],
    *,
    ca: bool,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in dict.fromkeys(sans)]),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    """Write ``path``; a secret is created readable by its owner only (0600), never wider."""
    mode = 0o600 if secret else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its mode through os.open
    with os.fdopen(fd, "wb") as file:
        file.write(data)

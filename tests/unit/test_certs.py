"""``coordinator certs``: what the certificates name, file modes, and reading them back."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from coordinator.certs import CertificateError, make_certs, node_arguments
from coordinator.cli import main
from node.errors import SecurityConfigError
from node.security import COORDINATOR_NAME, client_security, is_loopback, load_security
from partition.cluster import load_cluster, parse_cluster
from partition.errors import ClusterSpecError

NODES = """\
nodes:
  - {name: camera, address: '192.168.1.20:50051', memory: 1GiB}
  - {name: gateway, address: 'gw.local:50052', memory: 1GiB}
links:
  default: {bandwidth: 100Mbps, latency: 2ms}
"""


@pytest.fixture
def nodes_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(NODES)
    return path


def read_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names(cert: x509.Certificate) -> tuple[str, list[object]]:
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return common, [*sans.get_values_for_type(x509.DNSName),
                    *sans.get_values_for_type(x509.IPAddress)]


def test_certificates_name_nodes_and_hosts(tmp_path: Path, nodes_yaml: Path) -> None:
    security = make_certs(tmp_path / "certs", load_cluster(nodes_yaml))
    directory = tmp_path / "certs"
    ca = read_cert(directory / "ca.crt")
    assert names(read_cert(directory / "camera.crt")) == (
        "camera", ["camera", ipaddress.ip_address("192.168.1.20")]
    )
    assert names(read_cert(directory / "gateway.crt")) == ("gateway", ["gateway", "gw.local"])
    assert names(read_cert(directory / "coordinator.crt"))[0] == COORDINATOR_NAME
    for stem in ("camera", "gateway", "coordinator"):
        read_cert(directory / f"{stem}.crt").verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert security.ca == str(directory / "ca.crt")
    assert security.cert == str(directory / "coordinator.crt")
    assert security.token_file == str(directory / "token")


def test_keys_and_token_are_private(tmp_path: Path, nodes_yaml: Path) -> None:
    make_certs(tmp_path / "certs", load_cluster(nodes_yaml))
    for path in (tmp_path / "certs").iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.suffix == ".key" or path.name == "token"
        assert mode == (0o600 if secret else 0o644), path.name
    token = (tmp_path / "certs" / "token").read_text().strip()
    assert len(token) >= 40
    make_certs(tmp_path / "other", load_cluster(nodes_yaml))
    assert (tmp_path / "other" / "token").read_text().strip() != token


def test_credentials_load_back(tmp_path: Path, nodes_yaml: Path) -> None:
    spec = make_certs(tmp_path / "certs", load_cluster(nodes_yaml))
    security = client_security(spec)
    assert security.tls and security.token == (tmp_path / "certs/token").read_bytes().strip()
    assert node_arguments(spec, "camera") == [
        "--tls-cert", str(tmp_path / "certs/camera.crt"),
        "--tls-key", str(tmp_path / "certs/camera.key"),
        "--tls-ca", spec.ca, "--token-file", spec.token_file,
    ]
    assert security.token.decode() not in repr(security)  # no secret in a log line


def test_refuses_an_existing_ca_and_unusable_names(tmp_path: Path, nodes_yaml: Path) -> None:
    cluster = load_cluster(nodes_yaml)
    make_certs(tmp_path / "certs", cluster)
    with pytest.raises(CertificateError, match="holds a CA already"):
        make_certs(tmp_path / "certs", cluster)
    for name in ("cam_1", COORDINATOR_NAME, "ca"):
        odd = parse_cluster({"nodes": [{"name": name, "address": "h:1", "memory": 1}]}, "t")
        with pytest.raises(CertificateError, match="cannot name a certificate"):
            make_certs(tmp_path / name, odd)


def test_bad_credential_files_are_one_line_errors(tmp_path: Path, nodes_yaml: Path) -> None:
    spec = make_certs(tmp_path / "certs", load_cluster(nodes_yaml))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    cases = [
        (dict(ca=str(garbage), cert=spec.cert, key=spec.key), "not a PEM certificate"),
        (dict(ca=spec.ca, cert=spec.cert, key=str(garbage)), "not an unencrypted PEM private"),
        (dict(ca=spec.ca, cert=spec.cert, key=str(tmp_path / "certs/camera.key")),
         "does not belong to the certificate"),
        (dict(ca=spec.ca, cert=str(tmp_path / "nope.crt"), key=spec.key), "cannot read the file"),
        (dict(ca=spec.ca), "give all three"),
        (dict(token_file=str(tmp_path / "certs/ca.crt")), "not a cluster token"),
    ]
    for files, message in cases:
        with pytest.raises(SecurityConfigError, match=message) as caught:
            load_security(**files)
        assert "\n" not in str(caught.value)
    assert load_security() is None


def test_security_block_in_nodes_yaml(tmp_path: Path, nodes_yaml: Path) -> None:
    make_certs(tmp_path / "certs", load_cluster(nodes_yaml))
    nodes_yaml.write_text(NODES + "security:\n  ca: certs/ca.crt\n  cert: certs/coordinator.crt\n"
                          "  key: certs/coordinator.key\n  token_file: certs/token\n")
    security = load_cluster(nodes_yaml).security
    assert security.key == str(tmp_path / "certs" / "coordinator.key")  # relative to the yaml
    for block, message in [
        ("security: {ca: certs/ca.crt, key: certs/coordinator.key}\n", "security.cert: missing"),
        ("security: {token_file: certs/none}\n", "security.token_file: "),
        ("security: {}\n", "security: empty"),
        ("security: {token: abc}\n", "security.token: unknown field 'token'"),
    ]:
        nodes_yaml.write_text(NODES + block)
        with pytest.raises(ClusterSpecError, match=message):
            load_cluster(nodes_yaml)


def test_certs_command_prints_the_block_and_node_commands(
    tmp_path: Path, nodes_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certs", str(tmp_path / "certs"), "--nodes", str(nodes_yaml)]) == 0
    out = capsys.readouterr().out
    assert f"security:\n  ca: {tmp_path / 'certs' / 'ca.crt'}\n" in out
    assert (f"edge-node --listen 192.168.1.20:50051 --name camera --tls-cert "
            f"{tmp_path / 'certs' / 'camera.crt'}") in out
    nodes_yaml.write_text(NODES + out[out.index("security:"):out.index("start each node")])
    assert load_cluster(nodes_yaml).security.tls  # the printed block works as printed


@pytest.mark.parametrize("listen, loopback", [
    ("127.0.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
    ("0.0.0.0:1", False), ("[::]:1", False), (":1", False), ("192.168.1.2:1", False),
    ("jetson.local:1", False),
])
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback

"""Mutual TLS, the cluster token and roles, against real worker processes and real
certificates made by ``coordinator certs``' code.

A module-wide cluster of three nodes runs with TLS and a token, a pipeline deployed on it;
each test then knocks on it with the wrong credentials. A second cluster runs with a token
only.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from cli_helpers import ok, split_in_two_memory, status_rows
from cluster_helpers import (
    READY_TIMEOUT_S,
    Shift,
    make_stage,
    node_command,
    spawn_node,
    stop_node,
)
from cluster_helpers import wait_listening as wait_node_listening
from model_zoo import ExportedSample

from coordinator.certs import make_certs, node_files
from coordinator.deploy import deploy
from coordinator.local_cluster import LocalCluster, LocalNode
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from coordinator.samples import skip_dag, write_sample
from node.client import GrpcWorkerHandle
from node.errors import NodeRejectedError, NodeUnreachableError
from node.messages import Hop, Wiring
from node.probe import ProbeOptions
from node.security import Security, client_security, load_security
from partition.cluster import ClusterSpec, parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective, Plan
from partition.planning import plan_from_schedule
from partition.profiler import profile_layers
from partition.security_spec import SecuritySpec
from partition.split import split

ATOL = 1e-5


def three_nodes() -> ClusterSpec:
    return parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{free_ports(1)[0]}", "memory": "1GiB"}
                  for i in range(3)],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "security test cluster")


def three_stage_plan(sample: ExportedSample, cluster: ClusterSpec) -> Plan:
    """``sample`` split into thirds on n0, n1, n2 (in that order)."""
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    cost = build_cost_model(layer_graph, cluster, {n: profile for n in cluster.names})
    count = layer_graph.num_layers
    cuts = [0, count // 3, 2 * count // 3, count]
    spans = [Span(i, a, b) for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False))]
    return plan_from_schedule(sample.model, layer_graph, cluster, cost, evaluate(cost, spans),
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)


async def deploy_and_check(plan: Plan, sample: ExportedSample) -> None:
    """Deploy ``plan`` and check its outputs, one request and several in flight."""
    layer_graph = build_layer_graph(sample.model.program)
    await deploy(plan, split(plan, layer_graph), emulate_links=False)
    async with await Pipeline.connect(plan) as pipeline:
        (first,) = await pipeline.infer(sample.inputs)
        assert torch.allclose(first, sample.expected[0], atol=ATOL)
        batch = [torch.randn_like(sample.inputs[0]) for _ in range(8)]
        answers = await pipeline.map(batch)
    with torch.no_grad():
        for x, (got,) in zip(batch, answers, strict=True):
            assert torch.allclose(got, sample.module(x), atol=ATOL)


@dataclass(frozen=True)
class SecureCluster:
    plan: Plan
    security: SecuritySpec
    nodes: list[LocalNode]

    def address(self, name: str) -> str:
        return self.plan.addresses[name]

    def as_node(self, name: str) -> Security:
        """The credentials of node ``name``, as a caller would use them."""
        cert, key = node_files(self.security, name)
        return load_security(token_file=self.security.token_file, ca=self.security.ca,
                             cert=str(cert), key=str(key))


@pytest.fixture(scope="module")
def secure(sample_exported, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    """Three workers with mutual TLS and a token, and ``skip_dag`` deployed on them."""
    sample = sample_exported("skip_dag")
    with LocalCluster(three_nodes(), tmp_path_factory.mktemp("secure"), secure=True) as local:
        plan = three_stage_plan(sample, local.cluster)
        assert plan.security == local.cluster.security and plan.security.tls
        asyncio.run(deploy_and_check(plan, sample))
        yield SecureCluster(plan, local.cluster.security, local.nodes)


def test_outputs_are_correct_with_mtls_and_token(secure: SecureCluster, sample_exported) -> None:
    sample = sample_exported("skip_dag")

    async def again() -> torch.Tensor:
        async with await Pipeline.connect(secure.plan) as pipeline:
            return (await pipeline.infer(sample.inputs))[0]

    assert torch.allclose(asyncio.run(again()), sample.expected[0], atol=ATOL)


async def describe(address: str, name: str, security: Security | None) -> None:
    handle = GrpcWorkerHandle(address, name, security)
    try:
        await handle.describe()
    finally:
        await handle.close()


async def test_a_client_without_a_certificate_is_refused(secure: SecureCluster) -> None:
    coordinator_ = client_security(secure.security)
    no_certificate = Security(token=coordinator_.token, ca=coordinator_.ca)
    with pytest.raises(NodeUnreachableError, match="TLS handshake"):
        await describe(secure.address("n0"), "n0", no_certificate)
    with pytest.raises(NodeUnreachableError):  # no TLS at all
        await describe(secure.address("n0"), "n0", Security(token=coordinator_.token))


async def test_a_certificate_from_another_ca_is_refused(
    secure: SecureCluster, tmp_path: Path
) -> None:
    cluster = parse_cluster({"nodes": [{"name": "n0", "address": "127.0.0.1:1", "memory": 1}]},
                            "stranger")
    stranger = client_security(make_certs(tmp_path / "stranger", cluster))
    real = client_security(secure.security)
    with pytest.raises(NodeUnreachableError, match="TLS handshake"):  # trusts our CA only
        await describe(secure.address("n0"), "n0", replace(stranger, ca=real.ca))
    with pytest.raises(NodeUnreachableError, match="TLS handshake"):  # and is not trusted
        await describe(secure.address("n0"), "n0", replace(real, ca=stranger.ca))


async def test_no_token_or_a_wrong_token_is_unauthenticated(secure: SecureCluster) -> None:
    real = client_security(secure.security)
    for token in (None, b"not-the-token"):
        with pytest.raises(NodeRejectedError, match="UNAUTHENTICATED"):
            await describe(secure.address("n1"), "n1", replace(real, token=token))


async def test_a_node_certificate_cannot_load_or_wire(
    secure: SecureCluster, chain_stages
) -> None:
    handle = GrpcWorkerHandle(secure.address("n1"), "n1", secure.as_node("n0"))
    try:
        await handle.describe()  # a node may ask what another is
        with pytest.raises(NodeRejectedError, match="PERMISSION_DENIED.*'n0' may not call"):
            await handle.load_stage(chain_stages[0].spec, chain_stages[0].data)
        with pytest.raises(NodeRejectedError, match="PERMISSION_DENIED"):
            await handle.wire(Wiring((Hop(secure.address("n0"), "n0"),)))
        with pytest.raises(NodeRejectedError, match="PERMISSION_DENIED"):
            await handle.open_results()
    finally:
        await handle.close()


async def test_a_node_may_submit_only_to_the_node_it_is_wired_to(
    secure: SecureCluster,
) -> None:
    # n1 follows n0: n2's certificate may not open a Submit stream to it, nor may n0's or
    # n1's to n0, the first stage (frames there come from the coordinator only). No frame is
    # written: with TLS, a write racing the refusal can turn its status into INTERNAL.
    for sender, receiver in (("n2", "n1"), ("n0", "n0"), ("n1", "n0")):
        handle = GrpcWorkerHandle(secure.address(receiver), receiver, secure.as_node(sender))
        try:
            frames = await handle.open_sender()
            with pytest.raises(NodeRejectedError, match=f"PERMISSION_DENIED.*'{sender}' may not"):
                await frames.close()
        finally:
            await handle.close()


async def test_wire_refuses_a_next_hop_that_is_not_the_named_node(
    secure: SecureCluster,
) -> None:
    handle = GrpcWorkerHandle(secure.address("n0"), "n0", client_security(secure.security))
    try:  # n1's address, but the plan would say n2: n1's certificate does not name n2
        with pytest.raises(NodeRejectedError, match="FAILED_PRECONDITION"):
            await handle.wire(Wiring((Hop(secure.address("n1"), "n2"),)))
    finally:
        await handle.close()


async def test_only_the_coordinator_may_probe_and_only_the_named_node(
    secure: SecureCluster,
) -> None:
    options = ProbeOptions(64 * 1024, 2)
    handle = GrpcWorkerHandle(secure.address("n0"), "n0", client_security(secure.security))
    try:  # node to node over mutual TLS with the token, as frames travel
        measured = await handle.probe(secure.address("n1"), options, target_node="n1")
        assert measured.rounds == 2 and measured.bytes_per_s > 0 and measured.rtt_s > 0
        with pytest.raises(NodeRejectedError, match="INVALID_ARGUMENT.*certificate"):
            await handle.probe(secure.address("n1"), options)
        with pytest.raises(NodeRejectedError, match="FAILED_PRECONDITION.*does not name"):
            await handle.probe(secure.address("n1"), options, target_node="n2")
    finally:
        await handle.close()
    as_node = GrpcWorkerHandle(secure.address("n1"), "n1", secure.as_node("n0"))
    try:
        with pytest.raises(NodeRejectedError, match="PERMISSION_DENIED.*'n0' may not call Probe"):
            await as_node.probe(secure.address("n2"), options, target_node="n2")
        assert (await as_node.measure_link(options)).rounds == 2  # a node may answer probes
    finally:
        await as_node.close()


async def test_refusals_are_logged_once_per_peer(secure: SecureCluster) -> None:
    real = client_security(secure.security)
    for _ in range(5):
        with pytest.raises(NodeRejectedError):
            await describe(secure.address("n2"), "n2", replace(real, token=b"wrong"))
    [n2] = [n for n in secure.nodes if n.name == "n2"]
    refused = [line for line in Path(n2.log_path).read_text().splitlines() if "refused" in line]
    assert len(refused) == 1, refused
    assert "127.0.0.1" in refused[0]


def test_token_only_cluster(sample_exported, tmp_path: Path) -> None:
    sample = sample_exported("skip_dag")
    token = tmp_path / "token"
    token.write_text("a-cluster-token\n")
    cluster = replace(three_nodes(), security=SecuritySpec(token_file=str(token)))
    with LocalCluster(cluster, tmp_path / "state"):
        plan = three_stage_plan(sample, cluster)
        assert plan.security.token_file == str(token) and not plan.security.tls
        asyncio.run(deploy_and_check(plan, sample))
        address = plan.stages[1].address
        for security in (None, Security(token=b"wrong")):
            with pytest.raises(NodeRejectedError, match="UNAUTHENTICATED"):
                asyncio.run(describe(address, "n1", security))


def test_an_exposed_worker_without_security_warns_once(tmp_path: Path) -> None:
    node = spawn_node("open", f"0.0.0.0:{free_ports(1)[0]}", tmp_path / "open.log")
    try:
        wait_node_listening(node)
        # The port accepts connections a moment before the node logs its start.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "without TLS" not in node.log() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop_node(node)
    warnings = [line for line in node.log().splitlines() if "without TLS" in line]
    assert len(warnings) == 1, node.log()


def test_an_unreadable_credential_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "node.crt"
    garbage.write_text("not a certificate\n")
    done = subprocess.run(
        node_command(f"127.0.0.1:{free_ports(1)[0]}", "--tls-cert", str(garbage),
                     "--tls-key", str(garbage), "--tls-ca", str(garbage)),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip() == f"edge-node: {garbage}: not a PEM certificate; give the .crt " \
                                  "file written by `coordinator certs`", done.stderr


def test_up_secure_then_plan_deploy_run_status(
    tmp_path: Path, coordinator_here, up_nodes: list[LocalNode],
) -> None:
    addresses = {"alpha": f"127.0.0.1:{free_ports(1)[0]}", "beta": f"127.0.0.1:{free_ports(1)[0]}"}
    model = write_sample(skip_dag(), tmp_path / "skip_dag.pt2")
    memory = split_in_two_memory(model)  # neither node holds it all: the plan uses both
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes:\n" + "".join(
        f"  - {{name: {name}, address: '{address}', memory: {memory}}}\n"
        for name, address in addresses.items()
    ) + "links:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n")
    out = ok(coordinator_here("up", nodes, "--secure"))
    for match in re.finditer(r"(\w+) listening on (\S+) \(pid (\d+), log (\S+)\)", out):
        up_nodes.append(LocalNode(match[1], match[2], int(match[3]), match[4]))
    secure_nodes = tmp_path / "state" / "nodes.yaml"
    assert f"plan with --nodes {secure_nodes}" in out

    plan_path = tmp_path / "plan.json"
    ok(coordinator_here("plan", model, "--nodes", secure_nodes, "-o", plan_path,
                   "--repeats", "2"))
    ok(coordinator_here("deploy", plan_path))
    torch.save(torch.randn(4, 64), tmp_path / "in.pt")
    ok(coordinator_here("run", plan_path, "--input", tmp_path / "in.pt",
                   "--output", tmp_path / "out.pt"))
    rows = status_rows(ok(coordinator_here("status")))
    assert {name: rows[name][2] for name in addresses} == {"alpha": "up", "beta": "up"}
    assert "plan:" not in ok(coordinator_here("status", "--plan", plan_path))

    # Someone with the coordinator's credentials replaces the last stage: status flags it.
    plan = Plan.load(plan_path)
    stage = make_stage(Shift(1.0), index=1, receives=plan.stages[-1].receives[0],
                       sends=plan.stages[-1].receives[0])
    handle_name, handle_address = plan.stages[-1].node, plan.stages[-1].address

    async def replace_stage() -> None:
        handle = GrpcWorkerHandle(handle_address, handle_name, client_security(plan.security))
        try:
            await handle.load_stage(stage.spec, stage.data)
        finally:
            await handle.close()

    asyncio.run(replace_stage())
    rows = status_rows(ok(coordinator_here("status", "--plan", plan_path)))
    assert "(plan: " in rows[handle_name][4], rows
    ok(coordinator_here("down"))

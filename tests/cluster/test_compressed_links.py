"""Compressed links on real workers.

Two sample models split into three stages on three ``edge-node`` processes are deployed with
raw links, then with every link in fp16, then in int8 (the middle hop per channel). Each
answer must stay within its encoding's tolerance of the single-process model, the nodes must
send fewer bytes for the same requests, and ``verify`` must find every stage agreeing. A
frame with a malformed int8 tensor, and a Wire naming an unknown encoding, are refused.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import replace

import grpc
import msgpack
import pytest
import torch
import yaml
from cluster_helpers import Split
from test_pipeline import make_inputs

from coordinator.bench_check import Reference, run_checked
from coordinator.cli import main
from coordinator.deploy import deploy
from coordinator.pipeline import Pipeline
from coordinator.verify import verify
from node.client import GrpcWorkerHandle
from node.data_path import submit_stream
from node.rpc import edgesplit_pb2 as pb
from node.rpc import edgesplit_pb2_grpc as pb_grpc
from partition.artifact import ProgramRunner
from partition.cluster import ClusterSpec
from partition.compression import LinkEncoding
from partition.layers import build_layer_graph
from partition.plan import Plan
from partition.split import split

FP16, INT8 = LinkEncoding.FP16, LinkEncoding.INT8
ENCODINGS = {
    "fp16": (FP16, FP16, FP16, FP16),
    "int8": (INT8, INT8, LinkEncoding.INT8_CHANNEL, INT8),
}
"""Each plan's link encodings: source -> stage 0, 0 -> 1, 1 -> 2, stage 2 -> results."""

RELATIVE_ERROR = {"fp16": 2e-3, "int8": 3e-2}
"""Largest error of a request's outputs, as a norm relative to the model's outputs'."""

SHRINK = {"fp16": 0.6, "int8": 0.35}
"""Most bytes each node may send, against raw links, for the same requests."""

REQUESTS = 4


def encoded(plan: Plan, encodings: tuple[LinkEncoding, ...]) -> Plan:
    links = tuple(replace(link, encoding=e) for link, e in zip(plan.links, encodings,
                                                                strict=True))
    return replace(plan, links=links)


async def bytes_sent(plan: Plan) -> list[int]:
    """What each stage's node has sent so far, by ``Describe``."""
    sent = []
    for stage in plan.stages:
        handle = GrpcWorkerHandle(stage.address, stage.node)
        try:
            sent.append((await handle.describe()).bytes_sent)
        finally:
            await handle.close()
    return sent


async def run(parts: Split, plan: Plan, requests: list[dict]) -> tuple[list, list[int]]:
    """Deploy ``plan``, answer ``requests``: the answers and the bytes each node sent."""
    await deploy(plan, parts.artifacts, emulate_links=False)
    before = await bytes_sent(plan)
    async with await Pipeline.connect(plan, failover=False) as pipeline:
        answers = await pipeline.map(requests)
    after = await bytes_sent(plan)
    return answers, [b - a for a, b in zip(before, after, strict=True)]


def relative_error(got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...]) -> float:
    difference = math.sqrt(sum(float((a.double() - b.double()).detach().square().sum())
                               for a, b in zip(got, expected, strict=True)))
    scale = math.sqrt(sum(float(b.double().detach().square().sum()) for b in expected))
    return difference / scale


@pytest.mark.parametrize("name", ["resnet", "bert"])
async def test_compressed_links_answer_within_tolerance_with_fewer_bytes(
    name: str, three_stages: Callable[[str], Split]
) -> None:
    parts = three_stages(name)
    requests = [make_inputs(parts.plan.inputs, parts.sample.module, seed)
                for seed in range(REQUESTS)]
    expected = [parts.reference(*(r[s.name] for s in parts.plan.inputs)) for r in requests]
    answers, raw_sent = await run(parts, parts.plan, requests)
    for got, want in zip(answers, expected, strict=True):
        assert relative_error(got, want) < 1e-5

    for label, encodings in ENCODINGS.items():
        plan = encoded(parts.plan, encodings)
        answers, sent = await run(parts, plan, requests)
        errors = [relative_error(got, want) for got, want in zip(answers, expected, strict=True)]
        assert max(errors) < RELATIVE_ERROR[label], f"{name} over {label}: errors {errors}"
        assert min(errors) > 0, f"{name} over {label}: answers are bit-exact, so not compressed"
        for got, want in zip(answers[0], expected[0], strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
        assert all(s < SHRINK[label] * r for s, r in zip(sent, raw_sent, strict=True)), (
            f"{name} over {label}: nodes sent {sent} bytes, {raw_sent} with raw links"
        )
        assert await verify(plan, parts.artifacts, lambda i: requests[i], [0, 1]) == []


async def test_a_malformed_int8_tensor_closes_the_stream(
    three_stages: Callable[[str], Split]
) -> None:
    parts = three_stages("resnet")
    plan = encoded(parts.plan, ENCODINGS["int8"])
    await deploy(plan, parts.artifacts, emulate_links=False)
    [spec] = plan.inputs
    count = math.prod(spec.shape)
    header = msgpack.packb(
        {"id": 1, "tensors": [[spec.name, spec.dtype, list(spec.shape), count + 5, "int8"]]}
    )
    payload = struct.pack("<f", math.nan) + bytes(1 + count)
    first = plan.stages[0]
    async with grpc.aio.insecure_channel(first.address) as channel:
        call = submit_stream(channel)
        await call.write(pb.Frame(header=header, payload=payload).SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "scales must be positive finite numbers" in refused.value.details()

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await pb_grpc.EdgeNodeStub(channel).Wire(pb.WireRequest(outbound_encoding=99))
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown outbound encoding 99" in unknown.value.details()
    # the node serves on: the plan still answers
    async with await Pipeline.connect(plan, failover=False) as pipeline:
        [answer] = await pipeline.map([parts.sample.inputs])
    assert relative_error(answer, parts.sample.expected) < RELATIVE_ERROR["int8"]


async def test_auto_compression_over_a_slow_link_answers_within_its_budget(
    three_workers: ClusterSpec, sample_exported, tmp_path
) -> None:
    """node-0 holds the inputs and wants the results but computes 100x slower, and its links
    run at 1 Mbps: the plan moves the model off it and encodes what crosses those links."""
    sample = sample_exported("resnet")
    slow = [{"from": "node-0", "to": other, "bandwidth": "1Mbps", "latency": "1ms"}
            for other in ("node-1", "node-2")]  # both directions
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({
        "nodes": [{"name": n.name, "address": n.address, "memory": "2GiB",
                   "speed": 0.01 if n.name == "node-0" else 1.0} for n in three_workers.nodes],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}, "overrides": slow},
        "source": "node-0", "sink": "node-0",
    }))
    inputs = [make_inputs(sample.model.input_specs, sample.module, seed)
              for seed in range(REQUESTS)]
    calibration, out = tmp_path / "calibration.pt", tmp_path / "plan.json"
    torch.save([tuple(r.values()) for r in inputs], calibration)
    assert main(["plan", str(sample.path), "--nodes", str(nodes), "-o", str(out), "--repeats",
                 "2", "--compress", "auto", "--max-error", "0.05", "--calibration",
                 str(calibration)]) == 0
    plan = Plan.load(out)
    crossing = [link.encoding for link in plan.links if link.src != link.dst]
    assert any(e is not LinkEncoding.RAW for e in crossing), plan.links
    assert plan.accuracy.max_rel_error <= plan.accuracy.max_error == 0.05

    await deploy(plan, split(plan, build_layer_graph(sample.model.program)),
                 emulate_links=False)
    reference = ProgramRunner(sample.model.program)
    async with await Pipeline.connect(plan, failover=False) as pipeline:
        answers = await pipeline.map(inputs)
        checked = await run_checked(  # what `bench --check` runs: within the plan's budget
            pipeline, Reference(reference, lambda i: inputs[i % len(inputs)],
                                [spec.name for spec in plan.inputs]),
            requests=2 * REQUESTS, concurrency=4)
    assert (checked.answered, checked.failed, checked.mismatches) == (2 * REQUESTS, 0, 0)
    with torch.no_grad():
        expected = [reference(*r.values()) for r in inputs]
    scale = max(float(t.abs().max()) for out in expected for t in out)
    worst = max(float((a.double() - b.double()).abs().max())
                for got, want in zip(answers, expected, strict=True)
                for a, b in zip(got, want, strict=True))
    assert 0 < worst / scale <= plan.accuracy.max_error

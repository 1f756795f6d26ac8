"""Random and mutated inputs for every reader of untrusted bytes: each example ends in a valid
result or the project's own error, never another exception, a hang or a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.cli import main
from node.codec import decode_frame, decode_trace, encode_frame, read_frame
from node.errors import ArtifactError, FrameError, LimitError
from node.loading import receive_artifact
from node.rpc import edgesplit_pb2 as pb
from partition.cluster import ClusterSpec, load_cluster
from partition.compression import LinkEncoding
from partition.errors import ClusterSpecError, PlanFormatError, TensorSpecError
from partition.plan import Link, Objective, Plan, PlannedStage, Replica
from partition.quantize import WeightFormat
from partition.spec import StageSpec, TensorSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = settings(max_examples=150, deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

EXPECTED = (TensorSpec("x", "float32", (2, 3)), TensorSpec("ids", "int64", (4,)))
VALID_FRAME = encode_frame(7, {"x": torch.ones(2, 3), "ids": torch.arange(4)})
INT8_FRAME = encode_frame(7, {"x": torch.randn(2, 3), "ids": torch.arange(4)},
                          encoding=LinkEncoding.INT8)

def values(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    """Nested lists and maps of null, booleans, ``integers``, floats and short strings."""
    return st.recursive(
        st.none() | st.booleans() | integers | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                    max_size=4),
        max_leaves=12,
    )


json_values = values(st.integers())
msgpack_values = values(st.integers(-(2**63), 2**64 - 1))  # msgpack ints have 64 bits


def decode(data: bytes) -> None:
    """The data path's whole reading of a received message."""
    frame = read_frame(data)
    decode_frame(frame.header, frame.payload, EXPECTED)
    decode_trace(frame.header)


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid frame (raw or int8) with a byte flipped, its end cut off, bytes added or
    replaced."""
    data = draw(st.sampled_from([VALID_FRAME, INT8_FRAME]))
    edit = draw(st.sampled_from(["flip", "trim", "extend", "splice"]))
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    if edit == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    if edit == "trim":
        return data[:at]
    if edit == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    return data[:at] + draw(st.binary(max_size=8)) + data[at + 1:]


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """A valid frame whose msgpack header has one field replaced by a random value."""
    meta = {"id": 7, "tensors": [["x", "float32", [2, 3], 24], ["ids", "int64", [4], 32]]}
    target = draw(st.sampled_from(["id", "tensors", "entry", "name", "dtype", "shape",
                                   "nbytes", "count", "trace", "extra", "encoding"]))
    value = draw(msgpack_values)
    entry = meta["tensors"][draw(st.integers(0, 1))]
    if target in ("id", "tensors", "trace"):
        meta[target] = value
    elif target == "extra":
        meta[draw(st.text(max_size=4))] = value
    elif target == "entry":
        meta["tensors"][0] = value
    elif target == "count":
        meta["tensors"] = meta["tensors"] * draw(st.integers(0, 3))
    elif target == "encoding":
        entry.append(draw(st.sampled_from([e.value for e in LinkEncoding]) | msgpack_values))
    else:
        entry[["name", "dtype", "shape", "nbytes"].index(target)] = value
    header = msgpack.packb(meta)
    payload = bytes(VALID_FRAME[-56:])
    return pb.Frame(header=header, payload=payload).SerializeToString()


@FAST
@given(st.binary(max_size=256) | mutated_frames() | mutated_headers())
def test_frame_decoder_accepts_or_raises_frame_errors(data: bytes) -> None:
    with contextlib.suppress(FrameError, TensorSpecError):
        decode(data)


def test_the_valid_frames_decode() -> None:
    decode(VALID_FRAME)
    decode(INT8_FRAME)


SPEC = StageSpec(0, "a", 0, 1, EXPECTED, ("x",), (EXPECTED[0],), (EXPECTED[0],), "")
ARTIFACT = b"stage artifact bytes" * 10


@st.composite
def chunk_streams(draw: st.DrawFn) -> list[pb.StageChunk]:
    """A LoadStage stream: a good one with one thing changed, or random chunks."""
    digest = hashlib.sha256(ARTIFACT).hexdigest()
    spec = json.dumps({**SPEC.to_dict(), "artifact_sha256": digest})
    header = pb.StageHeader(spec_json=spec, total_bytes=len(ARTIFACT), sha256=digest)
    chunks = [pb.StageChunk(header=header, data=ARTIFACT[:50]), pb.StageChunk(data=ARTIFACT[50:])]
    edit = draw(st.sampled_from(["none", "no-header", "header-twice", "size", "hash", "spec",
                                 "extra", "drop", "random"]))
    if edit == "no-header":
        chunks[0].ClearField("header")
    elif edit == "header-twice":
        chunks[1].header.CopyFrom(header)
    elif edit == "size":
        chunks[0].header.total_bytes = draw(st.integers(0, 2**64 - 1))
    elif edit == "hash":
        chunks[0].header.sha256 = draw(st.text(max_size=64))
    elif edit == "spec":
        chunks[0].header.spec_json = draw(st.text(max_size=40) | json_values.map(json.dumps))
    elif edit == "extra":
        chunks.append(pb.StageChunk(data=draw(st.binary(min_size=1, max_size=8))))
    elif edit == "drop":
        chunks.pop(draw(st.integers(0, 1)))
    elif edit == "random":
        chunks = [pb.StageChunk.FromString(b) for b in draw(st.lists(
            st.builds(lambda: b"") | st.just(chunks[0].SerializeToString()), max_size=3))]
    return chunks


async def _stream(chunks: list[pb.StageChunk]):
    for chunk in chunks:
        yield chunk


@FAST
@given(chunk_streams())
def test_stage_upload_accepts_or_raises_artifact_errors(chunks: list[pb.StageChunk]) -> None:
    try:
        spec, data = asyncio.run(receive_artifact(_stream(chunks), max_bytes=10_000, stall_s=5))
    except (ArtifactError, LimitError) as err:
        assert "\n" not in str(err)
    else:
        assert data == ARTIFACT and spec.artifact_sha256 == hashlib.sha256(data).hexdigest()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) into a JSON-like value."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with up to three fields dropped, replaced, shuffled or truncated."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(document)))
        if not path:
            return draw(json_values)
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        key, value = path[-1], parent[path[-1]]
        edit = draw(st.sampled_from(["drop", "replace", "shuffle", "truncate"]))
        if edit == "drop" and isinstance(parent, dict):
            del parent[key]
        elif edit == "shuffle" and isinstance(value, list):
            parent[key] = draw(st.permutations(value))
        elif edit == "truncate" and isinstance(value, list):
            parent[key] = value[: draw(st.integers(0, len(value)))]
        else:
            parent[key] = draw(json_values)
    return document


CLUSTERS = [yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("cluster-*.yaml"))]


@FAST
@given(st.sampled_from(CLUSTERS).flatmap(mutated).map(yaml.safe_dump)
       | st.text(max_size=200) | json_values.map(yaml.safe_dump))
def test_cluster_loader_accepts_or_raises_cluster_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "nodes.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        assert isinstance(load_cluster(path), ClusterSpec)
    except ClusterSpecError as err:
        assert "\n" not in str(err) and str(path) in str(err)


def valid_plan() -> dict[str, Any]:
    """A plan of three layers in two stages on nodes a and b (source a, sink b)."""
    x, h, y = (TensorSpec(n, "float32", (2, 4)) for n in "xhy")

    def stage(k: int, node: str, start: int, end: int, receives, sends) -> PlannedStage:
        return PlannedStage(k, (Replica(node, f"127.0.0.1:{5000 + k}"),), start, end, f"l{start}",
                            f"l{end - 1}", receives, sends, 0.001, 0.0, 100, 1000,
                            weights=(WeightFormat.NONE, WeightFormat.INT4)[k],
                            artifact_bytes=(400, 60)[k])

    return Plan(
        "0" * 64, "model.pt2", "auto", ("l0", "l1", "l2"), (x,), (y,), Objective.THROUGHPUT,
        "a", "b", {"a": "127.0.0.1:5000", "b": "127.0.0.1:5001"},
        (stage(0, "a", 0, 2, (x,), (h,)), stage(1, "b", 2, 3, (h,), (y,))),
        (Link("a", "a", float("inf"), 0.0), Link("a", "b", 1e6, 0.001),
         Link("b", "b", float("inf"), 0.0)),
        0.01, 0.005, True, 0.005,
    ).to_dict()


def test_the_valid_plan_reads_back() -> None:
    assert Plan.from_dict(valid_plan()).to_dict() == valid_plan()
    stages = Plan.from_dict(valid_plan()).stages
    assert [(s.weights, s.artifact_bytes) for s in stages] == [
        (WeightFormat.NONE, 400), (WeightFormat.INT4, 60)
    ]


def test_a_version_1_plan_reads_as_one_node_per_stage() -> None:
    data = valid_plan()
    data["schema"] = "edgesplit.plan/1"
    for stage in data["stages"]:
        (replica,) = stage.pop("nodes")
        stage.update(node=replica["node"], address=replica["address"])
    plan = Plan.from_dict(data)
    assert [s.replicas for s in plan.stages] == [
        (Replica("a", "127.0.0.1:5000"),), (Replica("b", "127.0.0.1:5001"),)
    ]
    assert plan.to_dict() == valid_plan()


def test_a_replicated_stage_has_a_link_per_replica_pair() -> None:
    data = valid_plan()
    data["nodes"].append({"name": "c", "address": "127.0.0.1:5002"})
    data["stages"][1]["nodes"] = [
        {"node": "b", "address": "127.0.0.1:5001", "share": 0.75},
        {"node": "c", "address": "127.0.0.1:5002", "share": 0.25},
    ]
    with pytest.raises(PlanFormatError, match=r"links has 3 entries, but must have 5"):
        Plan.from_dict(data, "plan.json")
    link = {"bytes_per_s": 1e6, "latency_s": 0.001, "encoding": "raw"}
    data["links"] = [data["links"][0], {"from": "a", "to": "b", **link},
                     {"from": "a", "to": "c", **link}, {"from": "b", "to": "b", **link},
                     {"from": "c", "to": "b", **link}]
    plan = Plan.from_dict(data, "plan.json")
    assert plan.stages[1].nodes == ("b", "c") and plan.stages[1].replicated
    assert plan.hop_ends(1) == (("a",), ("b", "c")) and plan.hop_ends(2) == (("b", "c"), ("b",))
    assert [(x.src, x.dst) for x in plan.hop_links(1)] == [("a", "b"), ("a", "c")]
    assert [(x.src, x.dst) for x in plan.hop_links(2)] == [("b", "b"), ("c", "b")]
    assert Plan.from_dict(plan.to_dict()) == plan
    data["links"][2]["to"] = "b"
    with pytest.raises(PlanFormatError, match=r"links\[2\]\.to \('b'\) must be 'c'"):
        Plan.from_dict(data, "plan.json")


def test_a_plan_from_before_weight_formats_reads_as_float_weights() -> None:
    data = valid_plan()
    for stage in data["stages"]:
        del stage["weights"], stage["artifact_bytes"]
    plan = Plan.from_dict(data)
    assert [(s.weights, s.artifact_bytes) for s in plan.stages] == [(WeightFormat.NONE, None)] * 2
    assert all(stage["weights"] == "none" and "artifact_bytes" not in stage
               for stage in plan.to_dict()["stages"])


@FAST
@given(mutated(valid_plan()))
def test_plan_reader_accepts_or_raises_plan_errors(data: Any) -> None:
    try:
        assert isinstance(Plan.from_dict(data, "plan.json"), Plan)
    except PlanFormatError as err:
        assert "\n" not in str(err) and str(err).startswith("plan.json: ")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["stages"][0].update(end=0), r"stages\[0\]\.end \(0\) must be greater than"),
    (lambda d: d["links"].pop(), r"links has 2 entries, but must have 3"),
    (lambda d: d.update(stages=[]), r"stages is empty"),
    (lambda d: d["stages"][1]["nodes"][0].update(node="c"),
     r"stages\[1\]\.nodes\[0\]\.node \('c'\) is not one of"),
    (lambda d: d["stages"][1]["nodes"][0].update(share=0.5),
     r"stages\[1\]\.nodes \(0.5\) must have positive shares that add up to 1"),
    (lambda d: d["stages"][1].update(nodes=[]), r"stages\[1\]\.nodes is missing"),
    (lambda d: d["stages"][1]["nodes"].append(dict(d["stages"][0]["nodes"][0], share=0.0)),
     r"stages \(.*\) put two stages or replicas on one node"),
    (lambda d: d["stages"][1].update(compute_s="fast"), r"stages\[1\]\.compute_s \('fast'\)"),
    (lambda d: d["links"][1].update(to="a"), r"links\[1\]\.to \('a'\) must be 'b'"),
    (lambda d: d["model"].pop("layers"), r"model\.layers is missing"),
    (lambda d: d["stages"][1].update(weights="int3"),
     r"stages\[1\]\.weights \('int3'\) must be one of 'none', 'int8', 'int4'"),
    (lambda d: d["stages"][0].update(artifact_bytes=-1),
     r"stages\[0\]\.artifact_bytes \(-1\) must be a non-negative integer"),
])
def test_plan_mistakes_name_the_field(edit, message: str) -> None:
    data = valid_plan()
    edit(data)
    with pytest.raises(PlanFormatError, match=message):
        Plan.from_dict(data, "plan.json")


@settings(max_examples=12, deadline=5000,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["deploy", "bench", "status", "run"]),
       data=mutated(valid_plan()).filter(lambda d: not _reads(d)) | st.text(max_size=40))
def test_cli_prints_one_line_for_a_broken_plan(
    tmp_path: Path, capsys, command: str, data: Any
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    extra = ["--input", "in.pt", "--output", "out.pt"] if command == "run" else []
    argv = ["status", "--plan", str(path)] if command == "status" else [command, str(path),
                                                                         *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coordinator: error: ")
    assert "Traceback" not in err


def _reads(data: Any) -> bool:
    try:
        Plan.from_dict(data)
    except PlanFormatError:
        return False
    return True

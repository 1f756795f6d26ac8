"""The tensor codec: round trips for every dtype and shape kind, every malformed frame, and
failure frames."""

from __future__ import annotations

import math
import warnings

import msgpack
import numpy as np
import pytest
import torch

from node.codec import decode_failure, decode_frame, encode_failure, encode_frame, read_frame
from node.errors import FrameError, FrameSpecError
from node.messages import Failure, FailureCode
from node.rpc import edgesplit_pb2 as pb
from partition.errors import TensorSpecError
from partition.spec import _DTYPES, TensorSpec


def fields(request_id: int, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """Encode, parse as the protobuf ``Frame`` the receiver gets, return its two fields."""
    frame = pb.Frame.FromString(encode_frame(request_id, tensors))
    return frame.header, frame.payload


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) - 3
    if dtype.is_complex:
        return torch.complex(values, -values).to(dtype)
    return (values > 0) if dtype == torch.bool else values.to(dtype)


@pytest.mark.parametrize("dtype", list(_DTYPES.values()), ids=list(_DTYPES))
@pytest.mark.parametrize("shape", [(2, 3), (), (0,), (4, 0, 2), (1,)], ids=str)
def test_round_trip(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = sample(dtype, shape)
    header, payload = fields(42, {"t": tensor, "other": torch.ones(3)})
    request_id, tensors = decode_frame(header, payload)
    assert request_id == 42 and list(tensors) == ["t", "other"]
    assert tensors["t"].dtype == dtype and tensors["t"].shape == tensor.shape
    assert torch.equal(tensors["t"], tensor)


def test_non_contiguous_input_is_encoded_by_value() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header, payload = fields(1, {"t": base.t(), "s": base[:, ::2]})
    _, tensors = decode_frame(header, payload)
    assert torch.equal(tensors["t"], base.t()) and torch.equal(tensors["s"], base[:, ::2])


def test_decoded_tensors_are_views_of_the_payload_without_warnings() -> None:
    header, payload = fields(1, {"a": torch.ones(3), "b": torch.zeros(5)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, tensors = decode_frame(header, payload)
    start = np.frombuffer(payload, dtype=np.uint8).ctypes.data
    assert tensors["a"].data_ptr() == start
    assert tensors["b"].data_ptr() == start + 12


def test_expected_spec_is_checked_by_name_not_order() -> None:
    header, payload = fields(9, {"a": torch.ones(2), "b": torch.ones(1, dtype=torch.int64)})
    expected = [TensorSpec("b", "int64", (1,)), TensorSpec("a", "float32", (2,))]
    assert decode_frame(header, payload, expected)[0] == 9


@pytest.mark.parametrize(
    "expected",
    [
        [TensorSpec("a", "float32", (3,))],
        [TensorSpec("a", "float16", (2,))],
        [TensorSpec("z", "float32", (2,))],
        [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (2,))],
    ],
    ids=["shape", "dtype", "name", "missing"],
)
def test_mismatched_expected_spec(expected: list[TensorSpec]) -> None:
    header, payload = fields(9, {"a": torch.ones(2)})
    with pytest.raises(FrameSpecError, match=r"frame 9 has tensors a: float32\[2\], expected") as e:
        decode_frame(header, payload, expected)
    assert isinstance(e.value, TensorSpecError) and e.value.request_id == 9


def header_with(**changes: object) -> bytes:
    entry = {"name": "a", "dtype": "float32", "shape": [2], "nbytes": 8} | changes
    return msgpack.packb({"id": 5, "tensors": [list(entry.values())]})


GOOD_PAYLOAD = bytes(8)


@pytest.mark.parametrize(
    ("header", "payload", "message"),
    [
        (header_with(nbytes=12), bytes(12), "is float32\\[2\\] = 8 bytes, but the header says 12"),
        (header_with(dtype="float8"), GOOD_PAYLOAD, "unknown dtype 'float8'"),
        (header_with(), GOOD_PAYLOAD[:-1], "declares 8 payload bytes, body has 7"),
        (header_with(), GOOD_PAYLOAD + b"\0", "declares 8 payload bytes, body has 9"),
        (b"\xc1garbage", GOOD_PAYLOAD, "not valid msgpack"),
        (msgpack.packb([1, 2]) + b"\x00", GOOD_PAYLOAD, "not valid msgpack"),
        (msgpack.packb({"id": 5}), b"", "exactly the keys"),
        (msgpack.packb({"id": -1, "tensors": []}), b"", "unsigned 64-bit"),
        (msgpack.packb({"id": True, "tensors": []}), b"", "unsigned 64-bit"),
        (msgpack.packb({"id": 5, "tensors": {}}), b"", "must be a list"),
        (msgpack.packb({"id": 5, "tensors": [["a", "float32", [2]]]}), b"", "is not \\[name"),
        (header_with(shape=[-2]), GOOD_PAYLOAD, "is not \\[name"),
        (header_with(shape="2"), GOOD_PAYLOAD, "is not \\[name"),
        (
            msgpack.packb({"id": 5, "tensors": [["a", "uint8", [1], 1], ["a", "uint8", [1], 1]]}),
            bytes(2),
            "names repeat",
        ),
    ],
    ids=[
        "length-disagrees", "unknown-dtype", "truncated-body", "extra-bytes", "garbage-header",
        "trailing-header-bytes", "missing-key", "negative-id", "bool-id", "tensors-not-list",
        "short-entry", "negative-dim", "shape-not-list", "duplicate-name",
    ],
)
def test_malformed_frame(header: bytes, payload: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(header, payload)


def test_empty_frame_round_trips() -> None:
    assert decode_frame(*fields(0, {})) == (0, {})


@pytest.mark.parametrize("nbytes", [0, 1, 127, 128, 300_000])
def test_encoded_bytes_are_the_protobuf_serialization(nbytes: int) -> None:
    frame = encode_frame(2**63, {"t": torch.ones(nbytes, dtype=torch.uint8)})
    parsed = pb.Frame.FromString(frame)
    assert frame == pb.Frame(header=parsed.header, payload=parsed.payload).SerializeToString()


def test_failure_frame_round_trips() -> None:
    failure = Failure(2**63, FailureCode.STAGE_FAILED, "stage 1 failed", "gateway", 1)
    frame = read_frame(encode_failure(failure))
    assert decode_failure(frame) == failure
    assert len(frame.header) == len(frame.payload) == 0


def test_tensor_frame_carries_no_failure() -> None:
    assert decode_failure(read_frame(encode_frame(3, {"t": torch.ones(2)}))) is None


@pytest.mark.parametrize(
    "failure",
    [pb.Failure(request_id=1, code=pb.FAILURE_CODE_UNSPECIFIED).SerializeToString(), b"\xff"],
    ids=["unknown-code", "not-protobuf"],
)
def test_malformed_failure(failure: bytes) -> None:
    frame = read_frame(bytes([3 << 3 | 2, len(failure)]) + failure)  # Frame.failure, by hand
    with pytest.raises(FrameError, match="malformed failure"):
        decode_failure(frame)

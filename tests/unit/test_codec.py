"""The tensor codec: round trips for every dtype and shape kind, every malformed frame, and
failure frames."""

from __future__ import annotations

import math
import struct
import warnings

import msgpack
import numpy as np
import pytest
import torch

from node.codec import (
    check_frame,
    decode_failure,
    decode_frame,
    encode_failure,
    encode_frame,
    read_frame,
)
from node.errors import FrameError, FrameSpecError
from node.messages import Failure, FailureCode
from node.rpc import edgesplit_pb2 as pb
from partition.compression import LinkEncoding, encoded_bytes, roundtrip, tensor_encoding
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


def int8_header(**changes: object) -> bytes:
    """A header whose one entry has a fifth item, its encoding (int8 by default)."""
    return header_with(**({"shape": [4], "nbytes": 9, "encoding": "int8"} | changes))


def int8_payload(scale: float = 0.5, zero: int = 3) -> bytes:
    return struct.pack("<f", scale) + bytes([zero]) + bytes(4)


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
        (int8_header(encoding="int4"), int8_payload(), "unknown encoding 'int4'"),
        (int8_header(encoding="raw"), GOOD_PAYLOAD, "unknown encoding 'raw'"),
        (int8_header(encoding=7), int8_payload(), "is not \\[name"),
        (int8_header(dtype="int32", nbytes=16), bytes(16), "never sent in int8"),
        (int8_header(dtype="float16", encoding="fp16", nbytes=8), bytes(8), "never sent in fp16"),
        (int8_header(shape=[0], nbytes=0), b"", "never sent in int8"),
        (int8_header(nbytes=16), bytes(16), "in int8 = 9 bytes, but the header says 16"),
        (int8_header(), int8_payload()[:-1], "declares 9 payload bytes, body has 8"),
        (int8_header(), int8_payload(scale=math.nan), "scales must be positive finite"),
        (int8_header(), int8_payload(scale=-math.inf), "scales must be positive finite"),
        (int8_header(), int8_payload(scale=0.0), "scales must be positive finite"),
        (int8_header(), int8_payload(zero=255), "zero points must be at most 252"),
        (msgpack.packb({"id": 5, "tensors": [["a", "float32", [4], 9, "int8", "x"]]}),
         int8_payload(), "is not \\[name"),
        (msgpack.packb({"id": 5, "tensors": [["a", "float32", [2**31, 2**31], 2**63, "fp16"]]}),
         bytes(8), "declares 9223372036854775808 payload bytes, body has 8"),
    ],
    ids=[
        "length-disagrees", "unknown-dtype", "truncated-body", "extra-bytes", "garbage-header",
        "trailing-header-bytes", "missing-key", "negative-id", "bool-id", "tensors-not-list",
        "short-entry", "negative-dim", "shape-not-list", "duplicate-name",
        "unknown-encoding", "raw-named", "encoding-not-string", "int-tensor", "float16-in-fp16",
        "empty-tensor", "int8-length-disagrees", "int8-truncated", "nan-scale", "inf-scale",
        "zero-scale", "zero-point-out-of-range", "six-items", "huge-shape",
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


# -- frames compressed for their link -------------------------------------------------------

MIXED = {
    "h": torch.randn(2, 16, 32),
    "ids": torch.arange(10),
    "mask": torch.tensor([True, False]),
    "half": torch.randn(5).half(),
    "empty": torch.empty(0, 4),
}


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
def test_compressed_frame_round_trips_to_what_the_receiver_sees(encoding: LinkEncoding) -> None:
    header, payload = fields_in(8, MIXED, encoding)
    request_id, tensors = decode_frame(header, payload, [TensorSpec.of(n, t)
                                                         for n, t in MIXED.items()])
    assert request_id == 8 and list(tensors) == list(MIXED)
    for name, sent in MIXED.items():
        assert torch.equal(tensors[name], roundtrip(sent, encoding)), name
        assert tensors[name].dtype == sent.dtype
    assert torch.equal(tensors["ids"], MIXED["ids"]) and torch.equal(tensors["mask"],
                                                                     MIXED["mask"])
    entries = msgpack.unpackb(header)["tensors"]
    compressed = {e[0]: e[4] for e in entries if len(e) == 5}
    expected = {n: encoding.value for n, t in MIXED.items()
                if tensor_encoding(TensorSpec.of(n, t), encoding) is not LinkEncoding.RAW}
    assert compressed == expected
    assert len(payload) == sum(encoded_bytes(TensorSpec.of(n, t), encoding)
                               for n, t in MIXED.items())


def test_compressed_frames_are_smaller() -> None:
    tensors = {"h": torch.randn(1, 128, 768), "ids": torch.arange(128)}
    sizes = {e: len(encode_frame(1, tensors, encoding=e)) for e in LinkEncoding}
    raw = sizes[LinkEncoding.RAW]
    assert sizes[LinkEncoding.FP16] < 0.51 * raw and sizes[LinkEncoding.BF16] < 0.51 * raw
    assert sizes[LinkEncoding.INT8] < 0.26 * raw and sizes[LinkEncoding.INT8_CHANNEL] < 0.27 * raw


def test_checking_a_frame_builds_no_tensor_until_asked() -> None:
    header, payload = fields_in(3, {"h": torch.randn(4, 64)}, LinkEncoding.INT8)
    received = check_frame(header, payload, [TensorSpec("h", "float32", (4, 64))])
    assert received.request_id == 3 and received.trace is None
    assert received.tensors()["h"].shape == (4, 64)


def fields_in(request_id: int, tensors: dict[str, torch.Tensor], encoding: LinkEncoding
              ) -> tuple[bytes, bytes]:
    frame = pb.Frame.FromString(encode_frame(request_id, tensors, encoding=encoding))
    return frame.header, frame.payload

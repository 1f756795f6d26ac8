"""Link encodings: what the receiver gets back (within each encoding's tolerance, integers
bit-exact), exact byte counts, edge values, and payloads a hostile sender could craft."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from partition.compression import (
    CODES,
    PARAM_BYTES,
    LinkEncoding,
    channel_axis,
    check_encoded,
    codec_seconds,
    decode_tensor,
    encode_tensor,
    encoded_bytes,
    roundtrip,
    tensor_encoding,
)
from partition.errors import EncodingError
from partition.spec import TensorSpec

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHERS = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]
SHAPES = [(), (7,), (4, 33), (2, 24, 40), (3, 8, 5, 6), (1, 1000)]
RELATIVE = {LinkEncoding.FP16: 1e-3, LinkEncoding.BF16: 1e-2}
"""Relative error bound of the cast encodings (2^-11 and 2^-8 rounded up)."""
QUANTIZED = [LinkEncoding.INT8, LinkEncoding.INT8_CHANNEL]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 3).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


def scales(tensor: torch.Tensor, encoding: LinkEncoding) -> torch.Tensor:
    """Each element's scale, as the encoder chose it (broadcast over the tensor)."""
    encoded = encode_tensor(tensor, encoding)
    scale = encoded.parts[0]
    axis = channel_axis(tensor.shape) if encoding is LinkEncoding.INT8_CHANNEL else None
    shape = [1] * tensor.dim()
    if axis is not None:
        shape[axis] = scale.numel()
    return scale.view(shape).expand(tensor.shape).double()


def assert_within_tolerance(got: torch.Tensor, sent: torch.Tensor, encoding: LinkEncoding):
    assert got.dtype == sent.dtype and got.shape == sent.shape
    error = (got.double() - sent.double()).abs()
    if encoding in RELATIVE:
        # tiny values become subnormal in float16: allow float16's smallest step there
        bound = RELATIVE[encoding] * sent.double().abs() + 2**-24
    else:  # half a step, plus the rounding back to a float16 or bfloat16 tensor's dtype
        rounding = torch.finfo(sent.dtype).eps * sent.double().abs()
        bound = scales(sent, encoding) * (0.5 + 1e-4) + rounding
    assert bool((error <= bound).all()), f"error up to {error.max():.3g} beyond the bound"


@pytest.mark.parametrize("encoding", [e for e in LinkEncoding if e is not LinkEncoding.RAW],
                         ids=lambda e: e.value)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_floats_come_back_within_the_encodings_tolerance(
    encoding: LinkEncoding, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    sent = sample(dtype, shape)
    got = roundtrip(sent, encoding)
    if tensor_encoding(TensorSpec.of("t", sent), encoding) is LinkEncoding.RAW:
        assert torch.equal(got, sent)  # a float16 tensor on a fp16 link, say
    else:
        assert_within_tolerance(got, sent, encoding)


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
@pytest.mark.parametrize("dtype", OTHERS, ids=str)
def test_integer_bool_and_complex_tensors_cross_raw_and_bit_exact(
    encoding: LinkEncoding, dtype: torch.dtype
) -> None:
    sent = sample(dtype, (3, 40, 2))
    encoded = encode_tensor(sent, encoding)
    assert encoded.encoding is LinkEncoding.RAW
    assert encoded_bytes(TensorSpec.of("t", sent), encoding) == sent.numel() * sent.element_size()
    assert torch.equal(roundtrip(sent, encoding), sent)


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
@pytest.mark.parametrize("dtype", FLOATS + OTHERS, ids=str)
@pytest.mark.parametrize("shape", [*SHAPES, (0,), (5, 0, 3), (64, 16), (2, 3, 1, 1)], ids=str)
def test_encoded_bytes_is_the_exact_payload_length(
    encoding: LinkEncoding, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    encoded = encode_tensor(sample(dtype, shape), encoding)
    payload = b"".join(encoded.views())
    assert len(payload) == encoded.nbytes == encoded_bytes(
        TensorSpec("t", str(dtype).removeprefix("torch."), shape), encoding
    )


def test_compressed_encodings_shrink_float32_activations() -> None:
    spec = TensorSpec("h", "float32", (1, 128, 768))
    raw = encoded_bytes(spec, LinkEncoding.RAW)
    assert encoded_bytes(spec, LinkEncoding.FP16) == encoded_bytes(spec, LinkEncoding.BF16) \
        == raw // 2
    assert encoded_bytes(spec, LinkEncoding.INT8) == raw // 4 + PARAM_BYTES
    assert encoded_bytes(spec, LinkEncoding.INT8_CHANNEL) == raw // 4 + 768 * PARAM_BYTES


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
@pytest.mark.parametrize("shape", [(0,), (4, 0, 3)], ids=str)
def test_empty_tensors_cross_raw_with_their_shape(
    encoding: LinkEncoding, shape: tuple[int, ...]
) -> None:
    sent = torch.empty(shape)
    assert encode_tensor(sent, encoding).encoding is LinkEncoding.RAW
    got = roundtrip(sent, encoding)
    assert got.shape == sent.shape and got.dtype == sent.dtype


@pytest.mark.parametrize("encoding", QUANTIZED, ids=lambda e: e.value)
@pytest.mark.parametrize("value", [0.0, 5.0, -3.25, 1e-30, 3e38])
def test_constant_tensors_survive_quantization(encoding: LinkEncoding, value: float) -> None:
    sent = torch.full((4, 32, 3), value)
    got = roundtrip(sent, encoding)
    assert torch.allclose(got, sent, rtol=1e-6, atol=0)
    assert bool(torch.isfinite(encode_tensor(sent, encoding).parts[0]).all())


@pytest.mark.parametrize("encoding", QUANTIZED, ids=lambda e: e.value)
def test_zero_is_exact_after_quantization(encoding: LinkEncoding) -> None:
    sent = torch.relu(sample(torch.float32, (2, 16, 8, 8)))  # half zeros, as after a ReLU
    got = roundtrip(sent, encoding)
    assert bool((got[sent == 0] == 0).all())


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
def test_non_contiguous_tensors_are_encoded_by_value(encoding: LinkEncoding) -> None:
    base = sample(torch.float32, (48, 20))
    for view in (base.t(), base[:, ::3], base.view(4, 12, 20).permute(2, 0, 1)):
        assert not view.is_contiguous()
        got = roundtrip(view, encoding)
        expected = roundtrip(view.contiguous(), encoding)
        assert torch.equal(got, expected)
        if encoding is not LinkEncoding.RAW:
            assert_within_tolerance(got, view, encoding)


SPECIALS = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_nan_and_infinities_cross_exactly(encoding: LinkEncoding, dtype: torch.dtype) -> None:
    sent = sample(dtype, (4, 40))
    sent[0, :3] = torch.tensor(SPECIALS)
    sent[2, 7] = -math.inf
    got = roundtrip(sent, encoding)
    special = ~torch.isfinite(sent)
    assert torch.equal(torch.isnan(got), torch.isnan(sent))
    assert torch.equal(got[torch.isinf(sent)], sent[torch.isinf(sent)])
    # the finite values keep their tolerance: the specials do not stretch the range
    finite = got.masked_fill(special, 0)
    if encoding is not LinkEncoding.RAW and tensor_encoding(
            TensorSpec.of("t", sent), encoding) is not LinkEncoding.RAW:
        assert_within_tolerance(finite, sent.masked_fill(special, 0), encoding)


def test_finite_values_beyond_float16_saturate_instead_of_becoming_infinite() -> None:
    sent = torch.tensor([1e6, -7e4, 65504.0, math.inf, 1.0])
    got = roundtrip(sent, LinkEncoding.FP16)
    assert got.tolist() == [65504.0, -65504.0, 65504.0, math.inf, 1.0]


def test_float64_quantizes_in_float32_range() -> None:
    sent = torch.tensor([1e300, -1.0, 0.5], dtype=torch.float64)
    got = roundtrip(sent, LinkEncoding.INT8)
    assert got.dtype == torch.float64 and bool(torch.isfinite(got).all())
    assert got[0] == pytest.approx(torch.finfo(torch.float32).max, rel=1e-2)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((), None), ((4096,), None), ((8, 64, 28, 28), 1), ((2, 3, 4, 5, 6), 1),
     ((1, 128, 768), 2), ((256, 512), 1), ((1, 1000), None), ((2, 4, 64), None),
     ((4, 4, 64), 2)],
    ids=str,
)
def test_channel_axis_rule(shape: tuple[int, ...], axis: int | None) -> None:
    assert channel_axis(shape) == axis


def test_per_channel_scales_follow_each_channel() -> None:
    sent = sample(torch.float32, (2, 32, 16))
    sent[..., 0] *= 1000  # one outlier channel, as transformer activations have
    per_tensor = (roundtrip(sent, LinkEncoding.INT8) - sent)[..., 1:].abs().max()
    per_channel = (roundtrip(sent, LinkEncoding.INT8_CHANNEL) - sent)[..., 1:].abs().max()
    assert per_channel < per_tensor / 100


def quantized_payload(scale: float, zero: int, codes: bytes) -> bytes:
    return struct.pack("<f", scale) + bytes([zero]) + codes


SPEC = TensorSpec("t", "float32", (4,))


@pytest.mark.parametrize(
    ("data", "spec", "encoding", "message"),
    [
        (quantized_payload(math.nan, 3, bytes(4)), SPEC, LinkEncoding.INT8, "positive finite"),
        (quantized_payload(math.inf, 3, bytes(4)), SPEC, LinkEncoding.INT8, "positive finite"),
        (quantized_payload(0.0, 3, bytes(4)), SPEC, LinkEncoding.INT8, "positive finite"),
        (quantized_payload(-1.0, 3, bytes(4)), SPEC, LinkEncoding.INT8, "positive finite"),
        (quantized_payload(0.5, CODES, bytes(4)), SPEC, LinkEncoding.INT8, "at most 252"),
        (quantized_payload(0.5, 3, bytes(3)), SPEC, LinkEncoding.INT8, "takes 9 bytes, got 8"),
        (bytes(8), SPEC, LinkEncoding.INT8_CHANNEL,
         "takes 9 bytes, got 8"),
        (bytes(8), TensorSpec("t", "int64", (1,)), LinkEncoding.INT8, "never sent in int8"),
        (bytes(8), TensorSpec("t", "float16", (4,)), LinkEncoding.FP16, "never sent in fp16"),
        (bytes(0), TensorSpec("t", "float32", (0,)), LinkEncoding.BF16, "never sent in bf16"),
    ],
    ids=["nan-scale", "inf-scale", "zero-scale", "negative-scale", "zero-point-253",
         "short", "short-channel", "int64", "float16-fp16", "empty"],
)
def test_malformed_payloads_are_refused(
    data: bytes, spec: TensorSpec, encoding: LinkEncoding, message: str
) -> None:
    with pytest.raises(EncodingError, match=message):
        check_encoded(data, spec, encoding)
    with pytest.raises(EncodingError, match=message):
        decode_tensor(data, spec, encoding)


def test_every_code_of_a_valid_payload_decodes() -> None:
    data = quantized_payload(0.25, 10, bytes(range(256)))
    got = decode_tensor(data, TensorSpec("t", "float32", (256,)), LinkEncoding.INT8)
    assert got[:CODES].tolist() == [(q - 10) * 0.25 for q in range(CODES)]
    assert math.isnan(got[253]) and got[254] == math.inf and got[255] == -math.inf


def test_decoded_raw_tensors_are_views_and_compressed_ones_new_tensors() -> None:
    sent = sample(torch.float32, (3, 40))
    for encoding in (LinkEncoding.RAW, LinkEncoding.INT8):
        payload = bytearray(b"".join(encode_tensor(sent, encoding).views()))
        got = decode_tensor(memoryview(payload), TensorSpec.of("t", sent), encoding)
        shares = got.data_ptr() == torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
        assert shares == (encoding is LinkEncoding.RAW)


@pytest.mark.parametrize("encoding", list(LinkEncoding), ids=lambda e: e.value)
def test_codec_seconds_measures_both_sides(encoding: LinkEncoding) -> None:
    specs = [TensorSpec("h", "float32", (2, 64, 32)), TensorSpec("ids", "int64", (2, 64))]
    measured = codec_seconds(specs, encoding, repeats=3, warmup=1)
    for seconds in (measured.encode_s, measured.decode_s):
        assert math.isfinite(seconds) and 0 <= seconds < 10

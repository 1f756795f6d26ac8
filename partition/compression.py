"""Activation compression on a link: how a tensor crosses it, and what the receiver gets.

A link's :class:`LinkEncoding` applies to the non-empty floating-point tensors it makes
smaller; every other tensor (integers, bools, complex, empty ones, and float16/bfloat16
tensors on a ``fp16``/``bf16`` link) crosses it raw, bit-exact. The receiver decodes back to
the tensor's own dtype. Encoded bytes, tensor by tensor:

* ``fp16``, ``bf16``: the values cast to that dtype (2 bytes each). A finite value beyond its
  range saturates to the largest finite value; NaN and ±inf stay as they are.
* ``int8``, ``int8-channel``: affine uint8 codes ``x ≈ (q - zero_point) * scale``. The
  payload is ``C`` float32 scales, ``C`` uint8 zero points, then one uint8 code per element
  (C-contiguous). Finite values use codes 0..252 over a range stretched to include 0 (so 0
  is exact), which puts each within ``scale / 2`` of its value (plus the rounding back to a
  float16 or bfloat16 tensor's dtype); codes 253, 254 and 255 carry NaN, +inf and -inf
  exactly. ``int8`` has one channel (``C = 1``); ``int8-channel`` has one per index of the
  channel axis (:func:`channel_axis`). Values are quantized in float32 (finite float64
  values beyond its range saturate to it).

The planner prices a link with :func:`encoded_bytes`, its error with :func:`roundtrip` and
its time with :func:`codec_seconds`; the node's codec uses :func:`encode_tensor`,
:func:`check_encoded` and :func:`decode_tensor`. This module imports only torch.
"""

from __future__ import annotations

import enum
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from partition.errors import EncodingError
from partition.spec import TensorSpec, dtype_from_name


class LinkEncoding(enum.Enum):
    """How the floating-point tensors of a frame cross a link (see the module docstring)."""

    RAW = "raw"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT8_CHANNEL = "int8-channel"


CODES = 253
"""uint8 codes for finite values (0..252); the three above carry NaN, +inf and -inf."""

NAN_CODE, POS_INF_CODE, NEG_INF_CODE = 253, 254, 255

MIN_CHANNEL_ELEMENTS = 16
"""``int8-channel`` uses one scale for the whole tensor when its channels would hold fewer
elements than this each (a scale and a zero point cost 5 bytes: over this, at most ~31%)."""

PARAM_BYTES = 5
"""Bytes of one channel's float32 scale and uint8 zero point."""

_FIX = "send tensors as partition.compression.encode_tensor encodes them"
_WIRE_DTYPES = {LinkEncoding.FP16: torch.float16, LinkEncoding.BF16: torch.bfloat16}
_QUANTIZED = (LinkEncoding.INT8, LinkEncoding.INT8_CHANNEL)

Buffer = bytes | memoryview


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor as it crosses a link: ``encoding`` is the one actually applied (``RAW``
    where the link's does not apply), ``parts`` are C-contiguous CPU tensors whose bytes,
    in order, are the tensor's payload."""

    encoding: LinkEncoding
    parts: tuple[torch.Tensor, ...]

    def views(self) -> list[memoryview]:
        """The payload as byte views of ``parts``, without copying."""
        return [memoryview(part.reshape(-1).view(torch.uint8).numpy()) for part in self.parts]

    @property
    def nbytes(self) -> int:
        return sum(part.numel() * part.element_size() for part in self.parts)


@dataclass(frozen=True)
class CodecSeconds:
    """Median seconds to encode a frame's tensors on the sender and to decode them on the
    receiver."""

    encode_s: float
    decode_s: float


def tensor_encoding(spec: TensorSpec, encoding: LinkEncoding) -> LinkEncoding:
    """The encoding a tensor of ``spec`` crosses a link of ``encoding`` in: ``encoding`` for a
    non-empty floating-point tensor it makes smaller, ``RAW`` for every other tensor."""
    dtype = dtype_from_name(spec.dtype)
    if encoding is LinkEncoding.RAW or not dtype.is_floating_point or math.prod(spec.shape) == 0:
        return LinkEncoding.RAW
    if encoding in _WIRE_DTYPES and dtype.itemsize <= _WIRE_DTYPES[encoding].itemsize:
        return LinkEncoding.RAW
    return encoding


def channel_axis(shape: Sequence[int]) -> int | None:
    """The axis ``int8-channel`` gives each index its own scale and zero point, or ``None``
    for one scale over the whole tensor.

    Dim 1 of a tensor of 4 or more dims (the channels of NCHW and NCDHW activations), the
    last dim of a 2- or 3-dim one (the features of ``(batch, features)`` and of transformer
    ``(batch, tokens, hidden)`` activations, where outlier channels live); ``None`` for 0
    or 1 dims, or when a channel would hold fewer than :data:`MIN_CHANNEL_ELEMENTS`
    elements. Any axis keeps every value within its channel's ``scale / 2``; the choice only
    decides how tight the scales are.

    >>> channel_axis((8, 64, 28, 28)), channel_axis((1, 128, 768)), channel_axis((1, 1000))
    (1, 2, None)
    """
    if len(shape) < 2:
        return None
    axis = 1 if len(shape) >= 4 else len(shape) - 1
    if math.prod(shape) < MIN_CHANNEL_ELEMENTS * shape[axis]:
        return None
    return axis


def encoded_bytes(spec: TensorSpec, encoding: LinkEncoding) -> int:
    """Exact payload bytes a tensor of ``spec`` takes on a link of ``encoding`` (the frame
    header adds a few dozen bytes per tensor whatever the encoding).

    >>> encoded_bytes(TensorSpec("x", "float32", (1, 128, 768)), LinkEncoding.INT8)
    98309
    """
    used = tensor_encoding(spec, encoding)
    count = math.prod(spec.shape)
    if used is LinkEncoding.RAW:
        return spec.nbytes
    if used in _WIRE_DTYPES:
        return count * _WIRE_DTYPES[used].itemsize
    return count + PARAM_BYTES * _channels(spec.shape, used)


def encode_tensor(tensor: torch.Tensor, encoding: LinkEncoding) -> EncodedTensor:
    """``tensor`` as it crosses a link of ``encoding`` (moved to the CPU, made contiguous)."""
    data = tensor.detach().cpu().contiguous()
    used = tensor_encoding(TensorSpec.of("", data), encoding)
    if used is LinkEncoding.RAW:
        return EncodedTensor(used, (data,))
    if used in _WIRE_DTYPES:
        return EncodedTensor(used, (_narrow(data, _WIRE_DTYPES[used]),))
    return EncodedTensor(used, _quantize(data, channel_axis(data.shape) if
                                         used is LinkEncoding.INT8_CHANNEL else None))


def check_encoded(data: Buffer, spec: TensorSpec, encoding: LinkEncoding) -> None:
    """Check ``data``, the payload of a tensor of ``spec`` sent in ``encoding`` (the one
    :func:`encode_tensor` applied), before it is decoded.

    Raises
    ------
    EncodingError
        If ``encoding`` is not the one such a tensor is sent in, ``data`` is not
        :func:`encoded_bytes` long, or a scale is not a positive finite number or a zero
        point not a code for a finite value.
    """
    if tensor_encoding(spec, encoding) is not encoding:
        raise EncodingError(f"a {spec.dtype}{list(spec.shape)} tensor is never sent in "
                            f"{encoding.value}; send it raw")
    expected = encoded_bytes(spec, encoding)
    if len(data) != expected:
        raise EncodingError(f"{encoding.value} {spec.dtype}{list(spec.shape)} takes {expected} "
                            f"bytes, got {len(data)}; {_FIX}")
    if encoding in _QUANTIZED:
        scale, zero = _params(data, _channels(spec.shape, encoding))
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise EncodingError(f"{encoding.value} scales must be positive finite numbers, got "
                                f"{_sample(scale)}; {_FIX}")
        if bool((zero >= CODES).any()):
            raise EncodingError(f"{encoding.value} zero points must be at most {CODES - 1}, "
                                f"got {_sample(zero)}; {_FIX}")


def decode_tensor(data: Buffer, spec: TensorSpec, encoding: LinkEncoding) -> torch.Tensor:
    """The tensor of ``spec`` that ``data`` (its payload in ``encoding``) carries: a
    read-only view of ``data`` if raw, a new tensor otherwise.

    Raises
    ------
    EncodingError
        As :func:`check_encoded`.
    """
    check_encoded(data, spec, encoding)
    dtype = dtype_from_name(spec.dtype)
    if math.prod(spec.shape) == 0:
        return torch.empty(spec.shape, dtype=dtype)
    with warnings.catch_warnings():
        # A view of a read-only buffer is read-only; the stage programs never write into
        # their inputs, so torch's warning about it is noise here.
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        if encoding is LinkEncoding.RAW:
            return torch.frombuffer(data, dtype=dtype).view(spec.shape)
        if encoding in _WIRE_DTYPES:
            return torch.frombuffer(data, dtype=_WIRE_DTYPES[encoding]).view(spec.shape).to(dtype)
        return _dequantize(data, spec, encoding, dtype)


def roundtrip(tensor: torch.Tensor, encoding: LinkEncoding) -> torch.Tensor:
    """What the receiver of ``tensor`` over a link of ``encoding`` gets (on the CPU)."""
    encoded = encode_tensor(tensor, encoding)
    data = b"".join(encoded.views())
    return decode_tensor(data, TensorSpec.of("", tensor), encoded.encoding)


def codec_seconds(
    specs: Sequence[TensorSpec], encoding: LinkEncoding, *, repeats: int = 5, warmup: int = 1,
    seed: int = 0,
) -> CodecSeconds:
    """Measure, on this machine with torch's current thread count, the median seconds to
    encode the tensors of ``specs`` (a boundary's frame) for a link of ``encoding`` and to
    decode them back, on random normal floats (zeros for other dtypes).

    The encode time is the sender's to charge, the decode time the receiver's; raw costs a
    copy at most on either side.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(s.shape, generator=generator).to(dtype_from_name(s.dtype))
        if dtype_from_name(s.dtype).is_floating_point
        else torch.zeros(s.shape, dtype=dtype_from_name(s.dtype))
        for s in specs
    ]
    encode_times, decode_times = [], []
    for run in range(warmup + repeats):
        started = time.perf_counter()
        encoded = [encode_tensor(t, encoding) for t in tensors]
        payloads = [b"".join(e.views()) for e in encoded]
        encoded_at = time.perf_counter()
        for spec, e, payload in zip(specs, encoded, payloads, strict=True):
            decode_tensor(payload, spec, e.encoding)
        if run >= warmup:
            encode_times.append(encoded_at - started)
            decode_times.append(time.perf_counter() - encoded_at)
    return CodecSeconds(statistics.median(encode_times), statistics.median(decode_times))


def _channels(shape: Sequence[int], encoding: LinkEncoding) -> int:
    axis = channel_axis(shape) if encoding is LinkEncoding.INT8_CHANNEL else None
    return 1 if axis is None else shape[axis]


def _narrow(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data`` cast to ``dtype``, finite values beyond its range saturating to its largest."""
    narrow = data.to(dtype)
    if not bool(torch.isinf(narrow).any()):
        return narrow
    largest = torch.finfo(dtype).max
    return torch.where(torch.isfinite(data), data.clamp(-largest, largest), data).to(dtype)


def _quantize(data: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, ...]:
    """Scales, zero points and codes of ``data`` (non-empty, contiguous) per channel of
    ``axis`` (or for the whole tensor)."""
    values = _narrow(data, torch.float32) if data.dtype == torch.float64 else data.float()
    reduce = [d for d in range(values.dim()) if d != axis]
    low, high = _range(values, reduce)
    special = not bool(torch.isfinite(low).all() and torch.isfinite(high).all())
    if special:  # NaN or ±inf: take the range of the finite values (0 is in it anyway)
        low, high = _range(torch.where(torch.isfinite(values), values, 0.0), reduce)
    low, high = low.clamp(max=0).double(), high.clamp(min=0).double()
    scale = ((high - low) / (CODES - 1)).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale.double()).clamp(0, CODES - 1).to(torch.uint8)
    codes = (values / scale).add_(zero).round_().clamp_(0, CODES - 1).to(torch.uint8)
    if special:
        codes[torch.isnan(values)] = NAN_CODE
        codes[values == math.inf] = POS_INF_CODE
        codes[values == -math.inf] = NEG_INF_CODE
    return scale.reshape(-1), zero.reshape(-1), codes


def _range(values: torch.Tensor, reduce: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum, shaped to broadcast against ``values``."""
    return (torch.amin(values, dim=reduce, keepdim=True),
            torch.amax(values, dim=reduce, keepdim=True))


def _params(data: Buffer, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and zero points at the start of a quantized payload."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
        scale = torch.frombuffer(data, dtype=torch.float32, count=channels)
        zero = torch.frombuffer(data, dtype=torch.uint8, count=channels, offset=4 * channels)
    return scale, zero


def _dequantize(
    data: Buffer, spec: TensorSpec, encoding: LinkEncoding, dtype: torch.dtype
) -> torch.Tensor:
    axis = channel_axis(spec.shape) if encoding is LinkEncoding.INT8_CHANNEL else None
    channels = 1 if axis is None else spec.shape[axis]
    scale, zero = _params(data, channels)
    codes = torch.frombuffer(data, dtype=torch.uint8, offset=PARAM_BYTES * channels)
    codes = codes.view(spec.shape)
    shape = [1] * len(spec.shape)
    if axis is not None:
        shape[axis] = channels
    # The largest magnitude a code decodes to; compute in float64 if float32 would overflow.
    reach = float((torch.maximum(zero.int(), CODES - 1 - zero.int()) * scale.double()).max())
    work = torch.float32 if reach <= torch.finfo(torch.float32).max else torch.float64
    values = codes.to(work).sub_(zero.view(shape).to(work)).mul_(scale.view(shape).to(work))
    if reach > torch.finfo(dtype).max:
        values.clamp_(torch.finfo(dtype).min, torch.finfo(dtype).max)
    if bool((codes >= CODES).any()):
        values[codes == NAN_CODE] = math.nan
        values[codes == POS_INF_CODE] = math.inf
        values[codes == NEG_INF_CODE] = -math.inf
    return values.to(dtype)


def _sample(values: torch.Tensor) -> str:
    shown = values[:4].tolist()
    return f"{shown}{'...' if len(values) > 4 else ''}"

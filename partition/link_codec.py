"""The one place the planner gets link encodings from: :func:`link_codec`.

The planner needs three things of an encoding: what the receiver sees (``roundtrip``), the
bytes it puts on the wire, and the seconds it takes to encode and decode. :func:`link_codec`
bundles them; it is the single function to point at the runtime's own codec
(``partition.compression``: ``roundtrip``, ``encoded_bytes`` and its timing) once that is
merged. Until then it uses the reference below: float16 by a cast, int8 with one scale and
zero point per tensor. Only float32 tensors are encoded; the rest pass raw.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from partition.plan import LinkEncoding
from partition.spec import TensorSpec, dtype_from_name

TIMING_REPEATS = 5
"""Runs timed per tensor for the encode and decode seconds (the median is kept)."""
INT8_HEADER_BYTES = 8
"""An int8 tensor's scale and zero point, as float32."""


@dataclass(frozen=True)
class LinkCodec:
    """What the planner needs of the link encodings."""

    roundtrip: Callable[[torch.Tensor, LinkEncoding], torch.Tensor]
    encoded_bytes: Callable[[TensorSpec, LinkEncoding], int]
    seconds: Callable[[tuple[TensorSpec, ...], LinkEncoding], tuple[float, float]]


def link_codec() -> LinkCodec:
    """The link encodings the planner prices and measures."""
    return LinkCodec(_roundtrip, _encoded_bytes, _seconds)


def _encoded(dtype: torch.dtype, encoding: LinkEncoding) -> bool:
    return encoding is not LinkEncoding.RAW and dtype == torch.float32


def _encode(t: torch.Tensor, encoding: LinkEncoding) -> tuple[torch.Tensor, float, float]:
    if not _encoded(t.dtype, encoding):
        return t, 1.0, 0.0
    if encoding is LinkEncoding.FP16:
        return t.to(torch.float16), 1.0, 0.0
    low, high = float(t.min()), float(t.max())
    scale = (high - low) / 255 or 1.0
    return torch.round((t - low) / scale).to(torch.uint8), scale, low


def _decode(payload: tuple[torch.Tensor, float, float], dtype: torch.dtype) -> torch.Tensor:
    data, scale, low = payload
    if data.dtype == dtype:
        return data
    if data.dtype == torch.uint8:
        return data.to(dtype) * scale + low
    return data.to(dtype)


def _roundtrip(t: torch.Tensor, encoding: LinkEncoding) -> torch.Tensor:
    return _decode(_encode(t, encoding), t.dtype)


def _encoded_bytes(spec: TensorSpec, encoding: LinkEncoding) -> int:
    if not _encoded(dtype_from_name(spec.dtype), encoding):
        return spec.nbytes
    count = spec.nbytes // 4
    return 2 * count if encoding is LinkEncoding.FP16 else count + INT8_HEADER_BYTES


def _seconds(specs: tuple[TensorSpec, ...], encoding: LinkEncoding) -> tuple[float, float]:
    """Median seconds to encode and to decode random tensors of ``specs`` on this machine."""
    encode = decode = 0.0
    for spec in specs:
        dtype = dtype_from_name(spec.dtype)
        if not _encoded(dtype, encoding):
            continue
        tensor = torch.randn(spec.shape, generator=torch.Generator().manual_seed(0))
        encode += _median(lambda t=tensor: _encode(t, encoding))
        payload = _encode(tensor, encoding)
        decode += _median(lambda p=payload, d=dtype: _decode(p, d))
    return encode, decode


def _median(call: Callable[[], object]) -> float:
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

"""The planner's link codec adapter: what the receiver sees, bytes on the wire, timing."""

from __future__ import annotations

import torch

from partition.link_codec import INT8_HEADER_BYTES, link_codec
from partition.plan import LinkEncoding
from partition.spec import TensorSpec


def test_roundtrips_bytes_and_seconds() -> None:
    codec = link_codec()
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(6).reshape(2, 3)
    assert torch.equal(codec.roundtrip(x, LinkEncoding.FP16), x.half().float())
    int8 = codec.roundtrip(x, LinkEncoding.INT8)
    step = float(x.max() - x.min()) / 255
    assert int8.dtype == torch.float32 and float((int8 - x).abs().max()) <= step / 2 + 1e-6
    assert torch.equal(codec.roundtrip(x, LinkEncoding.RAW), x)
    for encoding in LinkEncoding:
        assert torch.equal(codec.roundtrip(ids, encoding), ids)
    spec, id_spec = TensorSpec.of("x", x), TensorSpec.of("ids", ids)
    assert codec.encoded_bytes(spec, LinkEncoding.FP16) == 300
    assert codec.encoded_bytes(spec, LinkEncoding.INT8) == 150 + INT8_HEADER_BYTES
    assert codec.encoded_bytes(id_spec, LinkEncoding.INT8) == id_spec.nbytes
    encode, decode = codec.seconds((spec, id_spec), LinkEncoding.INT8)
    assert encode > 0 and decode > 0
    assert codec.seconds((id_spec,), LinkEncoding.FP16) == (0.0, 0.0)

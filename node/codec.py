"""The tensor codec: a frame is a msgpack header plus the tensors' raw bytes.

The header is ``{"id": request_id, "tensors": [[name, dtype, shape, nbytes], ...]}`` with
dtype names from :mod:`partition.spec`; a tensor compressed for its link (see
:mod:`partition.compression`) has a fifth item, the encoding's name (``"fp16"``, ``"int8"``,
...), and ``nbytes`` counts its encoded bytes (an int8 tensor's scales and zero points lead
its bytes in the payload, so the header stays small). On a request the coordinator verifies
``"trace": [[stage_index, received, sent], ...]``: each stage it has passed appends the
fingerprints of the frame it received and of the frame it sent (:class:`StageReport`).
The payload is every tensor's bytes (C-contiguous, native byte order, as encoded)
concatenated in header order. The two are the ``header`` and ``payload``
fields of the ``Frame`` message: encoding writes the serialized message directly, decoding
takes the fields of a parsed one, checks every field and builds the tensors as views of the
payload, without copying. A frame that answers a request with a failure instead carries only
a ``Failure`` message; :func:`encode_failure` and :func:`decode_failure` are the one place
such frames are built and read.
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from google.protobuf.message import DecodeError

from node.errors import FrameError, FrameSpecError
from node.messages import Failure
from node.rpc import edgesplit_pb2 as pb
from partition.compression import (
    Buffer,
    LinkEncoding,
    check_encoded,
    decode_tensor,
    encode_tensor,
    encoded_bytes,
    tensor_encoding,
)
from partition.errors import EncodingError, TensorSpecError
from partition.spec import TensorSpec, dtype_from_name, dtype_name

MAX_HEADER_BYTES = 64 * 1024
"""Largest frame header a node reads: room for hundreds of tensors' names and shapes."""

MAX_TENSORS = 1024
"""Most tensors one frame may carry."""

MAX_TRACE = 256
"""Most stage reports one frame's trace may carry."""

_MAX_REQUEST_ID = 2**64 - 1
_HEADER_FIELD = 1  # field numbers of Frame.header, .payload and .failure in edgesplit.proto
_PAYLOAD_FIELD = 2
_FAILURE_FIELD = 3
_LENGTH_DELIMITED = 2


@dataclass(frozen=True)
class StageReport:
    """What stage ``index`` saw of a traced request: fingerprints (short float vectors, see
    :func:`node.pipeline.fingerprint`) of the frame it received and of the frame it sent."""

    index: int
    received: tuple[float, ...]
    sent: tuple[float, ...]


Trace = tuple[StageReport, ...]


@dataclass(frozen=True)
class WireFrame:
    """A received ``Frame`` message whose fields are views of the received bytes.

    ``raw`` is the whole message; ``failure`` holds the serialized ``Failure`` if set.
    """

    raw: bytes
    header: memoryview
    payload: memoryview
    failure: memoryview | None


def read_frame(data: bytes) -> WireFrame:
    """Split a serialized ``Frame`` into its fields without copying the payload.

    protobuf's own parser copies every ``bytes`` field (and fresh buffers above ~32 MB
    cost page faults), so the data path reads the three fields itself.

    Raises
    ------
    FrameError
        If ``data`` is not a well-formed ``Frame`` message.
    """
    view = memoryview(data)
    fields: dict[int, memoryview] = {}
    position = 0
    while position < len(view):
        key, position = _read_varint(view, position)
        number, wire_type = key >> 3, key & 7
        if wire_type != _LENGTH_DELIMITED or number not in (1, 2, 3):
            raise FrameError(f"frame has an unexpected field {number} of wire type {wire_type}")
        length, position = _read_varint(view, position)
        if position + length > len(view):
            raise FrameError("frame message is truncated")
        fields[number] = view[position : position + length]
        position += length
    empty = memoryview(b"")
    return WireFrame(
        data, fields.get(_HEADER_FIELD, empty), fields.get(_PAYLOAD_FIELD, empty),
        fields.get(_FAILURE_FIELD),
    )


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while position < len(view) and shift < 64:
        byte = view[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    raise FrameError("frame message has a malformed length")


def encode_frame(
    request_id: int, tensors: Mapping[str, torch.Tensor], trace: Trace | None = None,
    encoding: LinkEncoding = LinkEncoding.RAW,
) -> bytes:
    """Encode ``tensors`` for request ``request_id`` as a serialized ``Frame`` message for a
    link of ``encoding``; with ``trace`` (even empty) the request is traced: every stage
    adds its report.

    The result is what ``Frame(header=..., payload=...).SerializeToString()`` would give,
    built with one copy of the (encoded) data. Tensors are moved to the CPU and made
    contiguous as needed.
    """
    entries: list[list[Any]] = []
    views: list[memoryview] = []
    for name, tensor in tensors.items():
        encoded = encode_tensor(tensor, encoding)
        entry = [name, dtype_name(tensor.dtype), list(tensor.shape), encoded.nbytes]
        if encoded.encoding is not LinkEncoding.RAW:
            entry.append(encoded.encoding.value)
        entries.append(entry)
        views.extend(encoded.views())
    meta: dict[str, Any] = {"id": request_id, "tensors": entries}
    if trace is not None:
        meta["trace"] = [[r.index, list(r.received), list(r.sent)] for r in trace]
    header = msgpack.packb(meta)
    payload_bytes = sum(view.nbytes for view in views)
    return b"".join(
        [_field(_HEADER_FIELD, len(header)), header, _field(_PAYLOAD_FIELD, payload_bytes), *views]
    )


def encode_failure(failure: Failure) -> bytes:
    """A serialized ``Frame`` answering ``failure.request_id`` with ``failure``."""
    return pb.Frame(failure=failure.to_proto()).SerializeToString()


def decode_failure(frame: WireFrame) -> Failure | None:
    """The failure ``frame`` carries, or ``None`` if it carries tensors.

    Raises
    ------
    FrameError
        If the frame's ``Failure`` message is malformed or has an unknown code.
    """
    if frame.failure is None:
        return None
    try:
        return Failure.from_proto(pb.Failure.FromString(frame.failure))
    except (DecodeError, ValueError) as err:
        raise FrameError(f"frame carries a malformed failure ({err})") from err



@dataclass(frozen=True)
class _Entry:
    """A tensor of a frame's header: its spec, the encoding it was sent in, its bytes."""

    spec: TensorSpec
    encoding: LinkEncoding
    nbytes: int


@dataclass(frozen=True)
class ReceivedFrame:
    """A checked frame of tensors, not yet built: :meth:`tensors` builds them (decoding
    compressed tensors takes time, so call it off the event loop); ``trace`` is the
    frame's trace if its request is traced."""

    request_id: int
    trace: Trace | None
    payload: memoryview
    entries: tuple[_Entry, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name, in their own dtypes: raw ones are read-only views of the
        payload (a program must not write into its inputs in place), compressed ones new
        tensors."""
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for entry in self.entries:
            data = self.payload[offset : offset + entry.nbytes]
            tensors[entry.spec.name] = decode_tensor(data, entry.spec, entry.encoding)
            offset += entry.nbytes
        return tensors


def check_frame(
    header: Buffer, payload: Buffer, expected: Sequence[TensorSpec] | None = None
) -> ReceivedFrame:
    """Check a frame's header and payload; the tensors are built later, by the result.

    Raises
    ------
    FrameError
        If the frame is malformed: the header is longer than :data:`MAX_HEADER_BYTES` or
        not msgpack of the documented shape, it has more than :data:`MAX_TENSORS` tensors, a
        dtype or encoding is unknown or an encoding does not apply to its tensor, a byte
        length disagrees with dtype, shape and encoding, the lengths do not add up to the
        payload's size, or a compressed tensor's scales or zero points are out of range.
    FrameSpecError
        If the frame is well-formed but its tensors are not exactly ``expected``.
    """
    request_id, entries, trace = _parse_header(header)
    total = sum(entry.nbytes for entry in entries)
    if total != len(payload):
        raise FrameError(
            f"frame {request_id}: header declares {total} payload bytes, body has {len(payload)}"
        )
    if expected is not None:
        _check_expected(request_id, [entry.spec for entry in entries], expected)
    view = memoryview(payload)
    offset = 0
    for entry in entries:
        if entry.encoding is not LinkEncoding.RAW:
            try:
                check_encoded(view[offset : offset + entry.nbytes], entry.spec, entry.encoding)
            except EncodingError as err:
                raise FrameError(
                    f"frame {request_id}: tensor {entry.spec.name!r}: {err}"
                ) from err
        offset += entry.nbytes
    return ReceivedFrame(request_id, trace, view, tuple(entries))


def decode_frame(
    header: Buffer, payload: Buffer, expected: Sequence[TensorSpec] | None = None
) -> tuple[int, dict[str, torch.Tensor]]:
    """Check and decode a frame into ``(request_id, tensors)`` (see
    :meth:`ReceivedFrame.tensors`).

    Raises
    ------
    FrameError, FrameSpecError
        As :func:`check_frame`.
    """
    frame = check_frame(header, payload, expected)
    return frame.request_id, frame.tensors()


def decode_trace(header: Buffer) -> Trace | None:
    """The trace of a frame's ``header``, or ``None`` if its request is not traced.

    Raises
    ------
    FrameError
        As :func:`check_frame`, if the header is malformed.
    """
    return _parse_header(header)[2]


def _parse_header(header: Buffer) -> tuple[int, list[_Entry], Trace | None]:
    if len(header) > MAX_HEADER_BYTES:
        raise FrameError(
            f"frame header is {len(header)} bytes, more than the {MAX_HEADER_BYTES} a node reads"
        )
    try:
        meta = msgpack.unpackb(header)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise FrameError(f"frame header is not valid msgpack ({err})") from err
    if not isinstance(meta, dict) or set(meta) - {"trace"} != {"id", "tensors"}:
        raise FrameError(
            "frame header must be a map with exactly the keys 'id' and 'tensors', and 'trace' "
            "on a traced request"
        )
    request_id, entries = meta["id"], meta["tensors"]
    if not _is_int(request_id) or not 0 <= request_id <= _MAX_REQUEST_ID:
        raise FrameError(f"frame request id must be an unsigned 64-bit int, got {request_id!r}")
    if not isinstance(entries, list):
        raise FrameError(f"frame {request_id}: 'tensors' must be a list")
    if len(entries) > MAX_TENSORS:
        raise FrameError(
            f"frame {request_id} carries {len(entries)} tensors, more than the {MAX_TENSORS} "
            "a node accepts"
        )
    parsed = [_parse_entry(request_id, entry) for entry in entries]
    names = [entry.spec.name for entry in parsed]
    if len(set(names)) != len(names):
        raise FrameError(f"frame {request_id}: tensor names repeat: {names}")
    trace = meta.get("trace")
    return request_id, parsed, None if trace is None else _parse_trace(request_id, trace)


def _parse_trace(request_id: int, trace: Any) -> Trace:
    if not isinstance(trace, list) or len(trace) > MAX_TRACE:
        raise FrameError(f"frame {request_id}: 'trace' must be a list of at most {MAX_TRACE}")
    reports = []
    for entry in trace:
        ok = isinstance(entry, list) and len(entry) == 3
        if ok:
            index, received, sent = entry
            ok = _is_int(index) and index >= 0 and _is_floats(received) and _is_floats(sent)
        if not ok:
            raise FrameError(
                f"frame {request_id}: trace entry {reprlib.repr(entry)} is not "
                "[stage, received, sent]"
            )
        reports.append(StageReport(index, tuple(map(float, received)), tuple(map(float, sent))))
    return tuple(reports)


def _is_floats(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value
    )


def _parse_entry(request_id: int, entry: Any) -> _Entry:
    shape_ok = isinstance(entry, list) and len(entry) in (4, 5)
    if shape_ok:
        name, dtype, shape, nbytes, *encoding = entry
        shape_ok = (
            isinstance(name, str)
            and isinstance(dtype, str)
            and isinstance(shape, list)
            and all(_is_int(d) and d >= 0 for d in shape)
            and _is_int(nbytes)
            and all(isinstance(e, str) for e in encoding)
        )
    if not shape_ok:
        raise FrameError(
            f"frame {request_id}: tensor entry {reprlib.repr(entry)} is not "
            "[name, dtype, shape, nbytes] or [name, dtype, shape, nbytes, encoding]"
        )
    try:
        dtype_from_name(dtype)
    except TensorSpecError as err:
        raise FrameError(f"frame {request_id}: tensor {name!r}: {err}") from err
    spec = TensorSpec(name, dtype, tuple(shape))
    used = _parse_encoding(request_id, spec, encoding[0]) if encoding else LinkEncoding.RAW
    expected = encoded_bytes(spec, used)
    if nbytes != expected:
        sent_in = "" if used is LinkEncoding.RAW else f" in {used.value}"
        raise FrameError(
            f"frame {request_id}: tensor {name!r} is {dtype}{shape}{sent_in} = {expected} "
            f"bytes, but the header says {nbytes}"
        )
    return _Entry(spec, used, nbytes)


def _parse_encoding(request_id: int, spec: TensorSpec, name: str) -> LinkEncoding:
    """The compressed encoding ``name`` of a header entry, if it is one ``spec``'s tensor
    is sent in."""
    known = [e.value for e in LinkEncoding if e is not LinkEncoding.RAW]
    if name not in known:
        raise FrameError(
            f"frame {request_id}: tensor {spec.name!r} has unknown encoding {name!r}; "
            f"expected one of {', '.join(known)} (or none for raw)"
        )
    encoding = LinkEncoding(name)
    if tensor_encoding(spec, encoding) is not encoding:
        raise FrameError(
            f"frame {request_id}: tensor {spec.name!r} is {spec.dtype}{list(spec.shape)}, "
            f"which is never sent in {name}; send it raw"
        )
    return encoding


def _check_expected(
    request_id: int, got: Sequence[TensorSpec], expected: Sequence[TensorSpec]
) -> None:
    if sorted(got, key=_by_name) != sorted(expected, key=_by_name):
        raise FrameSpecError(
            request_id,
            f"frame {request_id} has tensors {_describe(got)}, expected {_describe(expected)}",
        )


def _field(number: int, length: int) -> bytes:
    """The protobuf key and length prefix of a length-delimited field."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length) if length else b""


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _by_name(spec: TensorSpec) -> str:
    return spec.name


def _describe(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in specs) or "none"

"""Plain, hashable descriptions of tensors and stages, shared by planner, worker and coordinator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from partition.errors import TensorSpecError

_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16,
        torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
        torch.complex64, torch.complex128,
    )
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32``; an unknown name raises :class:`TensorSpecError`."""
    try:
        return _DTYPES[name]
    except KeyError:
        known = ", ".join(sorted(_DTYPES))
        raise TensorSpecError(f"unknown dtype {name!r}; expected one of {known}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's dtype and shape; ``nbytes`` is its size on the wire."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * dtype_from_name(self.dtype).itemsize

    def check(self, tensor: torch.Tensor) -> None:
        """Raise :class:`TensorSpecError` unless ``tensor`` has this dtype and shape."""
        got = TensorSpec.of(self.name, tensor)
        if got != self:
            raise TensorSpecError(
                f"tensor {self.name!r} is {got.dtype}{list(got.shape)}, "
                f"expected {self.dtype}{list(self.shape)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class StageSpec:
    """What one worker needs to know about its stage, and nothing about the others.

    A stage receives the frame ``receives`` (every tensor live at its first boundary), runs
    its program on ``inputs`` (a subset of ``receives``, in the program's argument order),
    which returns ``outputs`` in order, and sends on the frame ``sends``: every tensor live at
    its last boundary, each either one of its outputs or passed through from ``receives``.
    Layer ranges are half-open: ``[start, end)``.
    """

    index: int
    node: str
    start: int
    end: int
    receives: tuple[TensorSpec, ...]
    inputs: tuple[str, ...]
    outputs: tuple[TensorSpec, ...]
    sends: tuple[TensorSpec, ...]
    artifact_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "node": self.node,
            "start": self.start,
            "end": self.end,
            "receives": [t.to_dict() for t in self.receives],
            "inputs": list(self.inputs),
            "outputs": [t.to_dict() for t in self.outputs],
            "sends": [t.to_dict() for t in self.sends],
            "artifact_sha256": self.artifact_sha256,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSpec:
        return cls(
            index=int(data["index"]),
            node=str(data["node"]),
            start=int(data["start"]),
            end=int(data["end"]),
            receives=tuple(TensorSpec.from_dict(t) for t in data["receives"]),
            inputs=tuple(str(n) for n in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            sends=tuple(TensorSpec.from_dict(t) for t in data["sends"]),
            artifact_sha256=str(data["artifact_sha256"]),
        )

"""Reading tensors a user saved with ``torch.save`` (inputs to run, calibration inputs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from partition.errors import EdgesplitError


def read_tensor_file(path: str, what: str, hint: str) -> Any:
    """``torch.load`` of ``path`` with nothing but tensors and containers allowed.

    Raises
    ------
    EdgesplitError
        ``path`` is missing or unreadable; the message names it as ``what`` and ends with
        ``hint``.
    """
    if not Path(path).is_file():
        raise EdgesplitError(f"{what} '{path}' does not exist; {hint}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:
        raise EdgesplitError(
            f"cannot read {what} '{path}' as tensors ({type(err).__name__}); {hint}"
        ) from err

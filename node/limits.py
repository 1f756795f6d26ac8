"""Bounds on what a caller may ask of a node, checked before any work starts."""

from __future__ import annotations

from collections.abc import Iterable

from node.errors import LimitError


def check_within(call: str, bounds: Iterable[tuple[str, int, int, int]]) -> None:
    """Raise :class:`LimitError` naming the first ``(name, value, low, high)`` whose value is
    outside ``[low, high]``, for an option of ``call``."""
    for name, value, low, high in bounds:
        if not low <= value <= high:
            raise LimitError(
                f"{call} option {name} is {value}, but this node accepts {low} to {high}; "
                "ask for less"
            )

"""Dealing frames among a replicated stage's nodes in proportion to their shares."""

from __future__ import annotations

from collections.abc import Sequence


class Dealer:
    """Smooth weighted round robin over destinations ``0..len(shares)-1``: each deal adds
    every destination's share to its credit and picks the one with the most credit (the
    first on a tie), which then pays one deal back. Deterministic, and after ``n`` deals each
    destination has had within one deal of ``n * share`` (shares are normalized to sum 1).

    >>> dealer = Dealer([0.75, 0.25])
    >>> [dealer.deal() for _ in range(8)]
    [0, 0, 1, 0, 0, 0, 1, 0]
    """

    def __init__(self, shares: Sequence[float]) -> None:
        if not shares or any(not share > 0 for share in shares):
            raise ValueError(f"shares must be positive, and at least one: {list(shares)}")
        total = sum(shares)
        self.shares = tuple(share / total for share in shares)
        self._credit = [0.0] * len(shares)

    def deal(self) -> int:
        """The destination of the next item."""
        for k, share in enumerate(self.shares):
            self._credit[k] += share
        chosen = max(range(len(self._credit)), key=self._credit.__getitem__)
        self._credit[chosen] -= 1.0
        return chosen

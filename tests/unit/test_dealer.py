"""The dealer: smooth weighted round robin over a replicated stage's shares."""

from __future__ import annotations

import random

import pytest

from node.dealer import Dealer


@pytest.mark.parametrize("shares", [
    [1.0], [0.5, 0.5], [0.75, 0.25], [0.6, 0.3, 0.1], [0.01, 0.99], [1, 2, 3, 4, 5],
    *([random.Random(seed).random() + 1e-3 for _ in range(random.Random(-seed).randint(2, 6))]
      for seed in range(20)),
])
def test_after_n_deals_each_count_is_within_one_of_n_times_its_share(shares) -> None:
    dealer = Dealer(shares)
    total = sum(shares)
    counts = [0] * len(shares)
    for n in range(1, 501):
        counts[dealer.deal()] += 1
        for count, share in zip(counts, shares, strict=True):
            assert abs(count - n * share / total) < 1, (n, counts)


def test_dealing_is_deterministic_and_interleaved() -> None:
    first, second = Dealer([0.5, 0.25, 0.25]), Dealer([0.5, 0.25, 0.25])
    deals = [first.deal() for _ in range(8)]
    assert deals == [second.deal() for _ in range(8)]
    assert deals == [0, 1, 2, 0, 0, 1, 2, 0]


@pytest.mark.parametrize("shares", [[], [0.5, 0.0], [1.0, -0.5]])
def test_shares_must_be_positive(shares) -> None:
    with pytest.raises(ValueError, match="positive"):
        Dealer(shares)

"""``bench --check``'s comparison: exact plans within float rounding, compressed plans within
their recorded error budget."""

from __future__ import annotations

import torch

from coordinator.bench_check import matches


def test_an_exact_plan_must_match_to_float_rounding() -> None:
    reference = (torch.tensor([1.0, -2.0]), torch.tensor([3, 4]))
    assert matches((reference[0] + 1e-7, reference[1]), reference)
    assert not matches((reference[0] + 1e-3, reference[1]), reference)


def test_a_compressed_plan_must_match_within_its_budget() -> None:
    reference = (torch.tensor([10.0, -2.0]), torch.tensor([0.5]))
    near = (torch.tensor([10.05, -2.0]), torch.tensor([0.5]))  # off by 0.05 of max |ref| 10
    assert matches(near, reference, budget=0.01)
    assert not matches(near, reference, budget=0.001)
    assert not matches((torch.tensor([float("nan"), -2.0]), reference[1]), reference, 0.5)
    assert not matches((torch.tensor([10.0]), reference[1]), reference, 0.5)  # wrong shape

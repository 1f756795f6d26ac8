"""The layer order: always topological, never more boundary bytes than the program's order,
and the fewest possible while the down-set lattice is small (against every topological
order)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from partition import layer_order
from partition.layer_order import choose_order
from partition.value_flow import INPUT, ValueFlow


def random_flow(rng: np.random.Generator, layers: int) -> ValueFlow:
    """A random layer DAG listed in one topological order: each layer makes one or two
    values read by later layers or by the output, and the inputs are read anywhere."""
    nbytes, producers, consumers = [], [], []

    def value(made: int, first_reader: int) -> None:
        readers = {int(r) for r in rng.integers(first_reader, layers + 1, rng.integers(1, 3))}
        nbytes.append(int(rng.choice([0, 10, 100, 1000, 5000])))
        producers.append(made)
        consumers.append(frozenset(readers))

    for _ in range(rng.integers(1, 3)):
        value(INPUT, 0)
    for layer in range(layers):
        for _ in range(rng.integers(1, 3)):
            value(layer, layer + 1)
    return ValueFlow(layers, tuple(nbytes), tuple(producers), tuple(consumers))


def is_topological(flow: ValueFlow, order: tuple[int, ...]) -> bool:
    position = {layer: k for k, layer in enumerate(order)}
    return sorted(order) == list(range(flow.num_layers)) and all(
        position[a] < position[b] for a, b in flow.dag().edges
    )


def total(flow: ValueFlow, order) -> int:
    return int(flow.boundary_bytes(order).sum())


@pytest.mark.parametrize("seed", range(4))
def test_order_has_the_fewest_boundary_bytes_of_all_topological_orders(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        flow = random_flow(rng, int(rng.integers(1, 8)))
        order = choose_order(flow)
        assert is_topological(flow, order)
        fewest = min(total(flow, o) for o in nx.all_topological_sorts(flow.dag()))
        assert total(flow, order) == fewest
        assert total(flow, order) <= total(flow, None)


@pytest.mark.parametrize("seed", range(2))
def test_greedy_order_past_the_state_limit_is_topological_and_no_worse(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layer_order, "MAX_ORDER_STEPS", 3)
    rng = np.random.default_rng(seed)
    for _ in range(40):
        flow = random_flow(rng, int(rng.integers(1, 12)))
        order = choose_order(flow)
        assert is_topological(flow, order)
        assert total(flow, order) <= total(flow, None)


def test_past_the_state_limit_a_branch_runs_whole_fewest_output_bytes_per_layer_first(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Branches read the input (layer numbers in brackets) and meet at layer 6:
    A = [0] makes 1000 B, B = [1, 2, 3] makes 10 B at each layer, C = [4, 5] 100 B each."""
    monkeypatch.setattr(layer_order, "MAX_ORDER_STEPS", 3)
    made = {0: 1000, 1: 10, 2: 10, 3: 10, 4: 100, 5: 100, 6: 1}
    readers = {0: {6}, 1: {2}, 2: {3}, 3: {6}, 4: {5}, 5: {6}, 6: {7}}
    flow = ValueFlow(7, (50, *made.values()), (INPUT, *made),
                     (frozenset({0, 1, 4}), *map(frozenset, readers.values())))
    order = choose_order(flow)
    assert order == (1, 2, 3, 4, 5, 0, 6)
    assert total(flow, order) < total(flow, None)


def test_past_the_state_limit_a_branch_that_shrinks_late_still_goes_first(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Branch A = [1, 2] makes 1000 B then 1 B, branch B = [0] makes 50 B, both read the
    50 B input and meet at layer 3. Running B first (as listed) leaves fewer bytes live after
    one step, but finishing A first frees more over the whole block."""
    monkeypatch.setattr(layer_order, "MAX_ORDER_STEPS", 3)
    flow = ValueFlow(4, (50, 50, 1000, 1, 8), (INPUT, 0, 1, 2, 3),
                     tuple(map(frozenset, ({0, 1}, {3}, {2}, {3}, {4}))))
    assert choose_order(flow) == (1, 2, 0, 3)
    assert total(flow, (1, 2, 0, 3)) < total(flow, None)


def test_many_parallel_branches_run_smallest_output_first() -> None:
    """Forty branches read the input and feed the output: 2^40 down-sets, so the greedy
    order answers, and it keeps each branch's output live for as few boundaries as it can."""
    sizes = [1000 + 37 * ((7 * k) % 40) for k in range(40)]
    flow = ValueFlow(
        num_layers=40,
        nbytes=(64, *sizes),
        producers=(INPUT, *range(40)),
        consumers=(frozenset(range(40)), *[frozenset({40})] * 40),
    )
    order = choose_order(flow)
    assert list(order) == sorted(range(40), key=lambda k: sizes[k])
    assert total(flow, order) < total(flow, None)


def test_boundary_bytes_in_an_order_by_hand() -> None:
    # input (10 B) read by layers 0 and 1; layer 0 makes 100 B for the output, layer 1 1 B.
    flow = ValueFlow(2, (10, 100, 1), (INPUT, 0, 1),
                     (frozenset({0, 1}), frozenset({2}), frozenset({2})))
    assert flow.boundary_bytes().tolist() == [10, 110, 101]
    assert flow.boundary_bytes((1, 0)).tolist() == [10, 11, 101]
    assert choose_order(flow) == (1, 0)

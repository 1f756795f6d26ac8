"""Replicated stages as virtual nodes of the exact search.

A *replica group* is a set of nodes that run one stage together, requests dealt among them
(they are independent) in fixed shares proportional to each member's speed, 1 / the whole
model's time on it: a share does not depend on the layers the stage holds. To the search
of :mod:`partition.optimizer` a group is one more node, whose state-graph tables follow from
the single nodes' ones and whose use takes all its members' bits of the used-node set.

Busy times (what throughput sees): a group's stage keeps member ``m`` busy ``share_m ·
T_m(i, j)`` per request, so it costs the largest of those, and fits only where it fits every
member's memory. A hop from senders ``A`` (shares ``p``) to receivers ``B`` (shares ``q``)
sends ``p_a · q_b`` of the requests over the link ``a -> b``, so it costs the busiest pair,
``max p_a · q_b · hop[boundary, a, b]``. Latency (expected over the dealing): the stage
costs ``sum q_m T_m(i, j)`` and the hop ``sum p_a q_b (transfer_ab + delay_ab)``. A shared
medium is busy with what crosses it whichever pair sends it: the hop's airtime on it is
``sum p_a q_b airtime_ab``.

Groups cost search time and table space, so their size is capped by the exact search's
work budget (:func:`replica_groups`). The expansion is the same over the tables with link
encodings (:mod:`partition.choice_tables`: a member decodes and encodes what it handles, an
encoded hop has no link from a node to itself) but not with weight formats offered: the
members of a group run one artifact, so they would have to take one format together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from math import comb

import numpy as np

from partition.costs import CostModel

TABLE_LIMIT = 2e6
"""Largest number of entries in one table of the search with groups (16 MB of float64; the
search keeps several): at 8 nodes, groups of up to 4 nodes at 50 layers, pairs at 200."""


def replica_shares(cost: CostModel, nodes: Sequence[int]) -> tuple[float, ...]:
    """Each node's share of the requests when ``nodes`` run a stage together: proportional
    to its speed, 1 / its time for the whole model (equal among nodes that take no time).

    >>> import numpy as np
    >>> cost = CostModel(("a", "b"), np.array([[1.0, 2.0], [0.5, 1.0]]), np.zeros(3),
    ...                  np.zeros((3, 3)), np.ones(2), np.ones((2, 2)), np.zeros((2, 2)), 0, 0)
    >>> replica_shares(cost, (0, 1))
    (0.3333333333333333, 0.6666666666666666)
    """
    if len(nodes) == 1:
        return (1.0,)
    totals = np.asarray(cost.layer_seconds, dtype=float)[list(nodes)].sum(axis=1)
    # Nodes that take no time are infinitely fast: they take all the requests.
    speed = 1.0 / totals if (totals > 0).all() else (totals <= 0).astype(float)
    return tuple(float(s) for s in speed / speed.sum())


def group_work(nodes: int, layers: int, largest: int) -> int:
    """Stage edges the exact search relaxes with every group of up to ``largest`` nodes
    (a group of ``k`` nodes is in ``2^(N-k)`` node sets); ``largest = 1`` is the search
    without groups."""
    return sum(comb(nodes, k) * 2 ** (nodes - k) for k in range(1, largest + 1)) * (
        layers + 1) ** 2


def replica_groups(
    cost: CostModel, work_limit: float, states: int | None = None
) -> list[tuple[int, ...]]:
    """The groups the exact search considers: every set of two or more nodes that have
    memory, take time and store a stage alike (the same stage memory everywhere: the members
    run one artifact, so nodes with different ``quantize`` never share a stage), up to the
    largest size whose search stays within ``work_limit`` stage edges and whose tables within
    :data:`TABLE_LIMIT` entries (none if pairs do not); ``states``: the search's state
    indices (default: one per layer boundary; more with compression)."""
    n, states = cost.num_nodes, states or cost.num_layers + 1
    totals = np.asarray(cost.layer_seconds, dtype=float).sum(axis=1)
    memory = cost.node_stage_memory()
    alike: dict[bytes, list[int]] = {}
    for d in range(n):
        if cost.node_memory_bytes[d] > 0 and totals[d] > 0:
            alike.setdefault(np.ascontiguousarray(memory[d]).tobytes(), []).append(d)
    chosen: list[tuple[int, ...]] = []
    for size in range(2, max(map(len, alike.values()), default=0) + 1):
        more = [g for usable in alike.values() for g in combinations(usable, size)]
        virtual = n + len(chosen) + len(more)
        tables = max(virtual * states**2, states * virtual**2)
        if group_work(n, states - 1, size) > work_limit or tables > TABLE_LIMIT:
            break
        chosen += more
    return chosen


@dataclass(frozen=True)
class GroupTables:
    """The search's tables over virtual nodes (every single node, then each group):
    ``members[g]``; busy times ``stage[g, i, j]`` and ``hop[b, g, h]``;
    the latency side, ``mean_stage`` and ``mean_hop`` (expected compute and transfer) and
    ``mean_delay[g, h]`` (expected link latency); ``layer_floor[l]``, the least busy
    time any virtual node spends on layer ``l``; and with shared media, ``airtime[m, b, g,
    h]``, the expected airtime of a hop (each pair of members by its share of requests)."""

    members: tuple[tuple[int, ...], ...]
    stage: np.ndarray
    hop: np.ndarray
    mean_stage: np.ndarray
    mean_hop: np.ndarray
    mean_delay: np.ndarray
    layer_floor: np.ndarray
    airtime: np.ndarray | None = None


def group_tables(
    cost: CostModel, stage: np.ndarray, hop: np.ndarray, delay: np.ndarray,
    groups: Sequence[tuple[int, ...]], airtime: np.ndarray | None = None,
) -> GroupTables:
    """Expand the single nodes' ``stage[d, i, j]`` (``inf`` where it does not fit),
    ``hop[b, a, c]`` (busy time), ``delay[a, c]`` and ``airtime[m, b, a, c]`` (if media
    are shared) with ``groups`` (see the module docstring)."""
    members = tuple((d,) for d in range(cost.num_nodes)) + tuple(groups)
    shares = tuple(replica_shares(cost, g) for g in members)

    def over(table: np.ndarray, axis: int, reduce: Callable) -> np.ndarray:
        """``table`` with its node axis ``axis`` replaced by groups: ``reduce`` over the
        members of each group of share times value."""
        moved = np.moveaxis(table, axis, 0)
        out = []
        for g, p in zip(members, shares, strict=True):
            weights = np.reshape(p, (-1,) + (1,) * (moved.ndim - 1))
            out.append(reduce(weights * moved[list(g)], axis=0))
        return np.moveaxis(np.stack(out), 0, axis)

    seconds = np.asarray(cost.layer_seconds, dtype=float)
    return GroupTables(
        members=members,
        stage=over(stage, 0, np.max),
        hop=over(over(hop, 1, np.max), 2, np.max),
        mean_stage=over(stage, 0, np.sum),
        mean_hop=over(over(hop, 1, np.sum), 2, np.sum),
        mean_delay=over(over(delay, 0, np.sum), 1, np.sum),
        layer_floor=over(seconds, 0, np.max).min(axis=0),
        airtime=None if airtime is None else over(over(airtime, 2, np.sum), 3, np.sum),
    )

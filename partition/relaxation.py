"""The state graph with the used-node sets forgotten: cheap bounds for the optimizer.

A plan is a path over states (state index ``v``, node ``d``), where a state index is a layer
boundary (with compression also the error spent and the last encoding, see
:mod:`partition.choice_tables`). Forgetting which nodes a path already used (a node may come
back, but not twice in a row) leaves a graph small enough to solve by dynamic programming in
``O(V² N + V N²)``. Its path costs bound the real plans' from below, which gives the
optimizer's lower bound and lets :mod:`partition.milp` drop every stage or link that no plan
better than a known one can use.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Relaxed(NamedTuple):
    """Best relaxed partial plans from the source, ``(V, N)`` each: ``arrive[v, d]`` holds
    state ``v``'s tensors on ``d`` ready for its stage, ``done[v, d]`` has just run on ``d``
    the stage that ends at ``v``; ``best`` is the cheapest whole relaxed plan."""

    arrive: np.ndarray
    done: np.ndarray
    best: float


def relax(stage: np.ndarray, hop: np.ndarray, starts: np.ndarray, ends: np.ndarray,
          source: int, sink: int, combine: np.ufunc) -> Relaxed:
    """Relaxed partial plans over ``stage[d, v, v']`` and ``hop[v, a, c]`` (state indices in
    topological order), with costs combined by ``np.add`` (latency) or ``np.maximum``
    (bottleneck)."""
    n, states = stage.shape[0], stage.shape[1]
    moves = hop.copy()
    moves[:, np.arange(n), np.arange(n)] = np.inf
    arrive = np.full((states, n), np.inf)
    arrive[starts] = hop[starts, source]
    done = np.full((states, n), np.inf)
    for j in range(1, states):
        done[j] = combine(arrive[:j], stage[:, :j, j].T).min(axis=0)
        arrive[j] = np.minimum(arrive[j], combine(done[j][:, None], moves[j]).min(axis=0))
    best = float(combine(done[ends], hop[ends][:, :, sink]).min())
    return Relaxed(arrive, done, best)


def relax_backward(stage: np.ndarray, hop: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   source: int, sink: int, combine: np.ufunc) -> Relaxed:
    """The same to the sink: ``arrive[v, d]`` is the best rest of a plan whose stage ending
    at ``v`` ran on ``d``, ``done[v, d]`` the best rest starting with a stage at ``v`` on
    ``d`` (that stage included). Solved as :func:`relax` on the reversed graph."""
    last = stage.shape[1] - 1
    back = relax(stage[:, ::-1, ::-1].transpose(0, 2, 1), hop[::-1].transpose(0, 2, 1),
                 last - ends, last - starts, sink, source, combine)
    return Relaxed(back.arrive[::-1], back.done[::-1], back.best)

"""Choose the topological order of the layers, so that few bytes are live at its boundaries.

The candidate split points are the boundaries of one order, and each boundary carries every
tensor made before it and read after it. The order the program happens to list its ops in
can hide cheap cuts: an Inception block that runs its wide branch first keeps that branch's
output live while the other branches run. The bytes live at a boundary depend only on the
*set* of layers run before it (a down-set of the layer DAG), so an order is a path through
the lattice of down-sets, from the empty set to all layers, and the order with the smallest
sum of boundary bytes is the shortest path when each down-set costs its live bytes.

That lattice is small for chains and a few parallel branches, and exponential for many
independent layers (minimizing cut width over topological orders is NP-hard in general).
:func:`choose_order` builds it with networkx and takes ``nx.shortest_path`` while it has at
most :data:`MAX_ORDER_STEPS` edges (one per down-set and layer that can run next); past
that it takes the better of two greedy orders: run next the ready layer that leaves the
fewest bytes live, or finish each branch once started and start first the branch with the
fewest output bytes per layer (Smith's rule: while a branch runs, the outputs of the
branches finished before it stay live). Either way the result is compared with the
program's own order and kept only if its sum is smaller.
"""

from __future__ import annotations

from itertools import pairwise

import networkx as nx

from partition.value_flow import INPUT, ValueFlow

MAX_ORDER_STEPS = 50_000
"""Most edges of the down-set lattice the exact order search builds before going greedy."""


def choose_order(flow: ValueFlow) -> tuple[int, ...]:
    """A topological order of ``flow``'s layers whose boundary bytes sum to as little as
    the search finds, and never more than the order ``0..L-1`` (kept on ties)."""
    live = _Liveness(flow)
    exact = _shortest_order(live)
    found = [exact] if exact is not None else [_greedy_order(live), _branch_order(flow, live)]
    return min((tuple(range(flow.num_layers)), *found),
               key=lambda order: int(flow.boundary_bytes(order).sum()))


class _Liveness:
    """Bytes live after each down-set of layers (a bit mask), built up one layer at a time."""

    def __init__(self, flow: ValueFlow) -> None:
        count = flow.num_layers
        dag = flow.dag()
        self.count = count
        self.full = (1 << count) - 1
        self.preds = [sum(1 << p for p in dag.predecessors(k)) for k in range(count)]
        self.succs = [sorted(dag.successors(k)) for k in range(count)]
        self.made = [0] * count  # bytes a layer's outputs add
        self.reads: list[list[tuple[int, int]]] = [[] for _ in range(count)]  # (readers, bytes)
        self.start = 0  # bytes of the inputs someone reads
        for size, made, readers in zip(flow.nbytes, flow.producers, flow.consumers, strict=True):
            if not readers:
                continue
            if made == INPUT:
                self.start += size
            else:
                self.made[made] += size
            if count in readers:  # a model output stays live to the end
                continue
            mask = sum(1 << r for r in readers)
            for reader in readers:
                self.reads[reader].append((mask, size))

    def ready(self) -> list[int]:
        """The layers that read nothing but the model's inputs."""
        return [k for k in range(self.count) if not self.preds[k]]

    def step(self, done: int, live: int, layer: int) -> int:
        """Bytes live after running ``layer`` once the layers in ``done`` ran (``live``)."""
        after = done | 1 << layer
        freed = sum(size for mask, size in self.reads[layer] if not mask & ~after)
        return live + self.made[layer] - freed

    def newly_ready(self, done: int, layer: int) -> list[int]:
        """The layers that ``layer`` was the last input missing for."""
        after = done | 1 << layer
        return [s for s in self.succs[layer] if not self.preds[s] & ~after]


def _shortest_order(live: _Liveness) -> tuple[int, ...] | None:
    """The order with the fewest summed boundary bytes (shortest path through the down-set
    lattice), or ``None`` if the lattice has more than :data:`MAX_ORDER_STEPS` edges."""
    lattice = nx.DiGraph()
    level: dict[int, tuple[int, tuple[int, ...]]] = {0: (live.start, tuple(live.ready()))}
    steps = 0
    while level:
        following: dict[int, tuple[int, tuple[int, ...]]] = {}
        for done, (bytes_live, ready) in level.items():
            for layer in ready:
                after = done | 1 << layer
                steps += 1
                if steps > MAX_ORDER_STEPS:
                    return None
                if after not in following:
                    rest = tuple(sorted({*ready, *live.newly_ready(done, layer)} - {layer}))
                    following[after] = (live.step(done, bytes_live, layer), rest)
                # the last boundary is the same for every order: it costs nothing here
                cost = following[after][0] if after != live.full else 0
                lattice.add_edge(done, after, bytes=cost)
        level = following
    path = nx.shortest_path(lattice, 0, live.full, weight="bytes")
    return tuple((b ^ a).bit_length() - 1 for a, b in pairwise(path))


def _greedy_order(live: _Liveness) -> tuple[int, ...]:
    """Run next the ready layer that leaves the fewest bytes live (lowest index on ties)."""
    done, bytes_live, ready, order = 0, live.start, set(live.ready()), []
    while ready:
        layer = min(ready, key=lambda k: (live.step(done, bytes_live, k), k))
        bytes_live = live.step(done, bytes_live, layer)
        ready = (ready | set(live.newly_ready(done, layer))) - {layer}
        done |= 1 << layer
        order.append(layer)
    return tuple(order)


def _branch_order(flow: ValueFlow, live: _Liveness) -> tuple[int, ...]:
    """``nx.lexicographical_topological_sort`` keyed by branch: a *branch* is a maximal
    chain of layers each the only reader of the one before; branches with fewer output
    bytes per layer go first, and a branch once started runs to its end."""
    dag = flow.dag()
    key: dict[int, tuple[float, int, int]] = {}
    for head in nx.topological_sort(dag):
        if head in key:
            continue
        chain = [head]
        while dag.out_degree(chain[-1]) == 1:
            (following,) = dag.successors(chain[-1])
            if dag.in_degree(following) != 1:
                break
            chain.append(following)
        ratio = live.made[chain[-1]] / len(chain)
        for step, layer in enumerate(chain):
            key[layer] = (ratio, head, step)
    return tuple(nx.lexicographical_topological_sort(dag, key=key.__getitem__))

"""Every tensor between layers as plain indices: who makes it, who reads it, its bytes.

This is the part of a layer graph that the layer order and the min-cut baseline need, kept
free of torch so that both can be tested on made-up graphs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from partition.spec import TensorSpec

INPUT = -1  # producer of the model's own inputs


@dataclass(frozen=True)
class ValueFlow:
    """The tensors between ``num_layers`` layers.

    Value ``k`` is ``nbytes[k]`` bytes, made by layer ``producers[k]`` (:data:`INPUT`: a
    model input) and read by the layers ``consumers[k]`` (``num_layers`` stands for the
    model's output; an input nobody reads has no consumers and crosses boundary 0 only).
    """

    num_layers: int
    nbytes: tuple[int, ...]
    producers: tuple[int, ...]
    consumers: tuple[frozenset[int], ...]

    @classmethod
    def of(
        cls,
        num_layers: int,
        values: Mapping[str, TensorSpec],
        producer: Mapping[str, int],
        edges: Iterable[tuple[object, object, Sequence[TensorSpec]]],
    ) -> ValueFlow:
        """From a layer graph's parts: ``edges`` are ``(source, target, tensors)`` with the
        sources and targets of :class:`partition.layers.LayerGraph`'s ``graph``."""
        readers: dict[str, set[int]] = defaultdict(set)
        for _, target, tensors in edges:
            reader = target if isinstance(target, int) else num_layers
            for spec in tensors:
                readers[spec.name].add(reader)
        names = list(values)
        return cls(
            num_layers=num_layers,
            nbytes=tuple(values[n].nbytes for n in names),
            producers=tuple(producer[n] for n in names),
            consumers=tuple(frozenset(readers[n]) for n in names),
        )

    def dag(self) -> nx.DiGraph:
        """Layers ``0..L-1``, with an edge from each layer to every layer that reads it."""
        graph = nx.DiGraph()
        graph.add_nodes_from(range(self.num_layers))
        graph.add_edges_from(
            (made, read)
            for made, readers in zip(self.producers, self.consumers, strict=True)
            for read in readers
            if made != INPUT and read < self.num_layers
        )
        return graph

    def boundary_bytes(self, order: Sequence[int] | None = None) -> np.ndarray:
        """``(L+1,)`` bytes live at each boundary when the layers run in ``order`` (default
        ``0..L-1``): every value made before the boundary and read at or after it.

        >>> once = frozenset({0, 1}), frozenset({2}), frozenset({2})
        >>> flow = ValueFlow(2, (10, 100, 1), (INPUT, 0, 1), once)
        >>> flow.boundary_bytes().tolist(), flow.boundary_bytes((1, 0)).tolist()
        ([10, 110, 101], [10, 11, 101])
        """
        count = self.num_layers
        position = dict(enumerate(range(count))) if order is None else {
            layer: k for k, layer in enumerate(order)
        }
        position[INPUT], position[count] = -1, count
        change = np.zeros(count + 2, dtype=np.int64)
        for size, made, readers in zip(self.nbytes, self.producers, self.consumers, strict=True):
            last = max((position[r] for r in readers), default=0)
            change[position[made] + 1] += size
            change[last + 1] -= size
        return np.cumsum(change)[: count + 1]

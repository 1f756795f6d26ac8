"""Shared media in the cost model: how long each transfer keeps each medium busy.

A medium (see :class:`~partition.cluster.MediumSpec`) is one resource for every transfer
on it: a transfer between nodes ``a`` and ``b`` uses it ``uses[m, a, b]`` times (once per
end on it) and keeps it busy ``uses × bytes / bandwidth``, its *airtime*. A hop's transfer
time is the longer of its link's busy time and its airtime on every medium together; a
medium's busy time per request adds up the airtime of every hop of a plan, the source's
and the sink's included, so the throughput bottleneck is the busiest stage, link or medium.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from partition.cluster import ClusterSpec


@dataclass(frozen=True)
class Media:
    """The cluster's media as arrays: ``names`` and ``bytes_per_s`` ``(M,)``, and
    ``uses`` ``(M, N, N)``, how often a transfer from node ``a`` to ``b`` crosses medium
    ``m`` (0 on the diagonal: a node's transfer to itself moves nothing)."""

    names: tuple[str, ...]
    bytes_per_s: np.ndarray
    uses: np.ndarray

    @classmethod
    def of(cls, cluster: ClusterSpec) -> Media | None:
        """The arrays of ``cluster``'s media, ``None`` when it declares none."""
        if not cluster.media:
            return None
        names = cluster.names
        uses = np.array([[[medium.uses(a, b) for b in names] for a in names]
                         for medium in cluster.media], dtype=float)
        return cls(tuple(m.name for m in cluster.media),
                   np.array([m.bytes_per_s for m in cluster.media], dtype=float), uses)

    def airtime(self, nbytes: np.ndarray) -> np.ndarray:
        """``(M, V, N, N)``: how long moving ``nbytes[v]`` from ``a`` to ``c`` keeps each
        medium busy (0 where the hop does not use it, even for bytes that cannot cross: an
        encoding not offered is ``inf`` bytes)."""
        per_byte = (self.uses / self.bytes_per_s[:, None, None])[:, None]
        nbytes = np.asarray(nbytes, dtype=float)[None, :, None, None]
        with np.errstate(invalid="ignore"):
            return np.where(per_byte > 0, nbytes * per_byte, 0.0)

    def hop_airtime(self, nbytes: float, src: int, dst: int) -> np.ndarray:
        """``(M,)``: the airtime of one hop of ``nbytes`` from ``src`` to ``dst``."""
        return self.airtime(np.array([nbytes]))[:, 0, src, dst]

    def busy_seconds(self, hops: Sequence[int], nbytes: Sequence[float]) -> tuple[float, ...]:
        """Each medium's busy time per request of a plan whose tensors visit the nodes
        ``hops`` in turn (source first, sink last), ``nbytes[k]`` on hop ``k``."""
        total = sum((self.hop_airtime(b, src, dst) for b, (src, dst)
                     in zip(nbytes, pairwise(hops), strict=True)), np.zeros(len(self.names)))
        return tuple(float(t) for t in total)

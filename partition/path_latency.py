"""The median idle latency of a plan whose stages may be replicated.

A request's *path* takes one replica of each stage, chosen independently with the
replicas' shares (smooth weighted round robin deals them in those proportions over time),
so a path's probability is the product of its replicas' shares. Its idle latency is the
compute of its stages on the chosen nodes plus every hop between the chosen ends: the
transfer (bytes over bandwidth, at least the airtime on a shared medium) and the link's
latency, from the source to the first stage and from the last stage to the sink.

A plan's ``latency_s`` is the expectation over paths (what the optimizer minimizes); the
benchmarks measure a median, which a minority of slow paths (a slow replica's small share)
pulls up far less than the mean. :func:`median_path_latency` gives that median.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MAX_PATHS = 100_000
"""Most paths enumerated; past it the median is that of as many paths drawn at random."""
SEED = 0
"""Seed of the draw past :data:`MAX_PATHS` (the same plan always gets the same median)."""
HALF_TOLERANCE = 1e-9
"""How close to one half the weight below a latency counts as exactly one half."""


def median_path_latency(
    shares: Sequence[Sequence[float]],
    compute_s: Sequence[Sequence[float]],
    transfer_s: Sequence[np.ndarray],
    delay_s: Sequence[np.ndarray],
    *,
    max_paths: int = MAX_PATHS,
) -> float:
    """The weighted median of a request's idle latency over its paths.

    Stage ``k`` runs on replicas with ``shares[k]`` of the requests and compute times
    ``compute_s[k]``; hop ``k`` (``len(shares) + 1`` hops) takes ``transfer_s[k][a, b]`` plus
    ``delay_s[k][a, b]`` from sender ``a`` to receiver ``b`` (the source and the sink are
    the single sender of hop 0 and receiver of the last hop). A path's latency adds its
    compute, then its transfers, then its delays, so one path's equals ``evaluate``'s
    ``latency_s`` to the bit.

    The median is the smallest latency with at least half the weight at or below it, or
    where exactly half is (to :data:`HALF_TOLERANCE`), the midpoint between it and the next
    latency, as :func:`statistics.median` does for an even count. Past ``max_paths`` paths
    it is the median of ``max_paths`` paths drawn with their probabilities.

    One stage on a fast node (0.8 of the requests, 1 s) and a slow one (0.2, 9 s), free
    links: the mean is 2.6 s, the median 1 s; dealt half and half, the midpoint.

    >>> import numpy as np
    >>> free = [np.zeros((1, 2)), np.zeros((2, 1))]
    >>> median_path_latency([(0.8, 0.2)], [(1.0, 9.0)], free, free)
    1.0
    >>> median_path_latency([(0.5, 0.5)], [(1.0, 9.0)], free, free)
    5.0
    """
    counts = [len(p) for p in shares]
    if math.prod(counts) <= max_paths:
        choices = np.indices(counts).reshape(len(counts), -1)
        weights = np.prod([np.asarray(p, dtype=float)[c] for p, c in zip(shares, choices,
                                                                           strict=True)], axis=0)
    else:
        rng = np.random.default_rng(SEED)
        choices = np.array([rng.choice(len(p), size=max_paths, p=np.asarray(p) / np.sum(p))
                            for p in shares])
        weights = np.ones(max_paths)
    return _weighted_median(_path_latencies(choices, compute_s, transfer_s, delay_s), weights)


def _path_latencies(
    choices: np.ndarray, compute_s: Sequence[Sequence[float]],
    transfer_s: Sequence[np.ndarray], delay_s: Sequence[np.ndarray],
) -> np.ndarray:
    """Each path's latency; ``choices[k]`` holds each path's replica of stage ``k``."""
    ends = np.zeros((1, choices.shape[1]), dtype=int)
    at = np.concatenate([ends, choices, ends])  # the source, the stages, the sink
    compute = sum((np.asarray(t, dtype=float)[c] for t, c in zip(compute_s, choices,
                                                                 strict=True)), 0.0)
    transfer = sum((np.asarray(t)[at[k], at[k + 1]] for k, t in enumerate(transfer_s)), 0.0)
    delay = sum((np.asarray(t)[at[k], at[k + 1]] for k, t in enumerate(delay_s)), 0.0)
    return compute + transfer + delay


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The smallest value with at least half the weight at or below it; the midpoint to
    the next value of positive weight where exactly half is."""
    values, weights = values[weights > 0], weights[weights > 0]
    order = np.argsort(values, kind="stable")
    values, below = values[order], np.cumsum(weights[order])
    half = below[-1] / 2
    i = int(np.searchsorted(below, half * (1 - HALF_TOLERANCE)))
    if abs(below[i] - half) <= half * HALF_TOLERANCE and i + 1 < len(values):
        return float((values[i] + values[i + 1]) / 2)
    return float(values[i])

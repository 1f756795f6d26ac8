"""The median idle latency over a replicated plan's paths: by hand, against a brute force
over the paths, the draw past the enumeration limit, and in the plan file."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from test_optimizer import instances, random_cost, tiny_cost

from partition.costs import CostModel
from partition.optimizer import Span, evaluate
from partition.path_latency import median_path_latency


def camera_cost() -> CostModel:
    """Source and sink a; b runs layer 0 in 1 s, c in 4 s, a layer 1 in 0.5 s. a-b: 1000 B/s
    and 0.1 s, a-c: 500 B/s and 0.3 s; 1000 B go in, 500 B between the layers."""
    return CostModel(
        node_names=("a", "b", "c"),
        layer_seconds=np.array([[9.0, 0.5], [1.0, 9.0], [4.0, 9.0]]),
        boundary_bytes=np.array([1000.0, 500.0, 100.0]),
        stage_memory_bytes=np.triu(np.full((3, 3), 10.0), k=1),
        node_memory_bytes=np.array([10, 10, 10]),
        link_bytes_per_s=np.array([[np.inf, 1000.0, 500.0], [1000.0, np.inf, 1000.0],
                                   [500.0, 1000.0, np.inf]]),
        link_latency_s=np.array([[0.0, 0.1, 0.3], [0.1, 0.0, 0.1], [0.3, 0.1, 0.0]]),
        source=0,
        sink=0,
    )


def test_the_median_path_is_the_fast_replicas_by_hand() -> None:
    """Layer 0 dealt 0.8 to b and 0.2 to c, layer 1 on a (the sink: no link out)."""
    schedule = evaluate(camera_cost(), [Span(1, 0, 1, (1, 2), (0.8, 0.2)), Span(0, 1, 2)])
    # via b: 1 + 0.1 in, 1 on b, 0.5 + 0.1 to a, 0.5 on a = 3.2 s
    # via c: 2 + 0.3 in, 4 on c, 1 + 0.3 to a, 0.5 on a = 8.1 s
    assert schedule.latency_s == pytest.approx(0.8 * 3.2 + 0.2 * 8.1)
    assert schedule.latency_p50_s == pytest.approx(3.2)
    # Dealt half and half: the midpoint, as a median of an even count is.
    halves = evaluate(camera_cost(), [Span(1, 0, 1, (1, 2), (0.5, 0.5)), Span(0, 1, 2)])
    assert halves.latency_p50_s == pytest.approx((3.2 + 8.1) / 2)
    # Mostly on the slow node: its path is the median.
    slow = evaluate(camera_cost(), [Span(1, 0, 1, (1, 2), (0.3, 0.7)), Span(0, 1, 2)])
    assert slow.latency_p50_s == pytest.approx(8.1)


@pytest.mark.parametrize("seed", range(3))
def test_without_replicas_the_median_is_the_latency_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cost in instances(30, seed, media=seed == 2):
        cuts = rng.choice(range(1, cost.num_layers), replace=False,
                          size=min(cost.num_nodes, cost.num_layers) - 1)
        ranges = itertools.pairwise([0, *sorted(cuts.tolist()), cost.num_layers])
        spans = [Span(int(d), a, b) for d, (a, b) in
                 zip(rng.permutation(cost.num_nodes), ranges, strict=False)]
        schedule = evaluate(cost, spans)
        assert schedule.latency_p50_s == schedule.latency_s
    assert evaluate(tiny_cost(), [Span(0, 0, 2), Span(1, 2, 3)]).latency_p50_s == 6.1


def brute_force_paths(cost: CostModel, spans: list[Span]) -> list[tuple[float, float]]:
    """(probability, idle latency) of every path, priced from the raw arrays."""
    ends = [(cost.source,), *(s.replicas for s in spans), (cost.sink,)]
    shares = [(1.0,), *(s.dealt(cost) for s in spans), (1.0,)]
    boundaries = [0, *(s.end for s in spans)]
    paths = []
    for path in itertools.product(*(range(len(e)) for e in ends)):
        nodes = [e[r] for e, r in zip(ends, path, strict=True)]
        latency = math.fsum(float(cost.layer_seconds[d, s.start:s.end].sum())
                            for d, s in zip(nodes[1:-1], spans, strict=True))
        hops = zip(boundaries, itertools.pairwise(nodes), strict=True)
        latency += math.fsum(cost.boundary_bytes[b] / cost.link_bytes_per_s[a, c]
                             + cost.link_latency_s[a, c] for b, (a, c) in hops if a != c)
        paths.append((math.prod(p[r] for p, r in zip(shares, path, strict=True)), latency))
    return paths


@pytest.mark.parametrize("seed", range(4))
def test_the_median_and_mean_over_every_path(seed: int) -> None:
    """Random plans with replicated stages: the median is a path's latency with at least
    half the requests at or below it and at least half at or above it, and the mean over
    the paths is the plan's latency."""
    rng = np.random.default_rng(seed)
    for _ in range(25):
        nodes, layers = int(rng.integers(3, 7)), int(rng.integers(1, 4))
        cost = random_cost(rng, nodes, layers, tight=False)
        stages = int(rng.integers(1, min(nodes, layers) + 1))
        owner = rng.permutation(np.arange(nodes) % stages)  # every node in one stage
        cuts = sorted(rng.choice(range(1, layers), size=stages - 1, replace=False).tolist())
        spans = []
        for k, (a, b) in enumerate(itertools.pairwise([0, *cuts, layers])):
            group = tuple(int(d) for d in np.flatnonzero(owner == k))
            weights = rng.uniform(0.05, 1, len(group))
            spans.append(Span(group[0], a, b, group, tuple(weights / weights.sum())))
        schedule = evaluate(cost, spans)
        paths = brute_force_paths(cost, spans)
        assert math.fsum(p * t for p, t in paths) == pytest.approx(schedule.latency_s, rel=1e-9)
        median = schedule.latency_p50_s
        assert any(t == pytest.approx(median, rel=1e-9) for _, t in paths)
        assert math.fsum(p for p, t in paths if t <= median * (1 + 1e-9)) >= 0.5 - 1e-9
        assert math.fsum(p for p, t in paths if t >= median * (1 - 1e-9)) >= 0.5 - 1e-9


def test_past_the_limit_the_median_is_drawn() -> None:
    """Twelve stages of two replicas (4096 paths), the fast one dealt 98%: the all-fast path
    is 78% of the requests, so 1000 drawn paths find it the median too."""
    shares = [(0.98, 0.02)] * 12
    compute = [(1.0, 5.0)] * 12
    hops = [np.zeros((1, 2)), *[np.zeros((2, 2))] * 11, np.zeros((2, 1))]
    assert median_path_latency(shares, compute, hops, hops) == 12.0
    assert median_path_latency(shares, compute, hops, hops, max_paths=1000) == 12.0
    # Dealt evenly: 12 s plus 4 s for each slow stage, of which the median path has 6 ...
    even = [(0.5, 0.5)] * 12
    assert median_path_latency(even, compute, hops, hops) == 36.0
    # ... and the drawn median is within one slow stage of it.
    assert abs(median_path_latency(even, compute, hops, hops, max_paths=1000) - 36.0) <= 4.0


def test_a_replica_dealt_nothing_is_on_no_path() -> None:
    """Half the requests take 1 s, half 9 s, and the replica of 2 s is dealt none (as when
    another replica takes no time): the median is the midpoint of 1 and 9."""
    free = [np.zeros((1, 3)), np.zeros((3, 1))]
    assert median_path_latency([(0.5, 0.0, 0.5)], [(1.0, 2.0, 9.0)], free, free) == 5.0

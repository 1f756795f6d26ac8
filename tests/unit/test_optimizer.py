"""The optimizer against an independent brute force (with and without compression choices
and shared media), the pricing by hand, and the baselines."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partition import optimizer
from partition.baselines import baselines
from partition.costs import Compression, CostModel, LinkChoices, WeightChoices
from partition.errors import NoFeasiblePlanError, PlanningError
from partition.media import Media
from partition.milp import SolverLimits
from partition.optimizer import OptimizeResult, Span, evaluate, optimize
from partition.plan import Objective

RELATIVE = 1e-9


def random_cost(rng: np.random.Generator, nodes: int, layers: int, tight: bool) -> CostModel:
    """Heterogeneous nodes and links; with ``tight`` some stages fit no node and some
    instances fit not at all."""
    speed = rng.uniform(0.1, 1.0, nodes)
    base = rng.uniform(1e-4, 1e-2, layers)
    noise = rng.uniform(0.5, 2.0, (nodes, layers)) if rng.random() < 0.5 else 1.0
    seconds = base[None] / speed[:, None] * noise
    boundary = rng.choice([0.0, 1e3, 1e5, 1e6, 4e6], layers + 1) * rng.uniform(0.5, 1.5)
    params = rng.integers(0, 100, layers).astype(float)
    memory = np.zeros((layers + 1, layers + 1))
    for i in range(layers + 1):
        for j in range(i + 1, layers + 1):
            memory[i, j] = params[i:j].sum() + boundary[i] / 1e5 + boundary[j] / 1e5
    total = memory[0, layers]
    scale = rng.uniform(0.2, 0.9) if tight else rng.uniform(0.8, 1.5)
    node_memory = (rng.uniform(0.3, 1.0, nodes) * total * scale).astype(np.int64) + 1
    if rng.random() < 0.3:  # some nodes store weights quantized: memory differs by node
        memory = memory[None] * rng.choice([1.0, 0.5, 0.3], (nodes, 1, 1))
    bandwidth = rng.choice([1e6, 1e7, 1e8, 1e9], (nodes, nodes))
    bandwidth *= rng.uniform(0.5, 2, (nodes, nodes))
    latency = rng.uniform(0, 5e-3, (nodes, nodes))
    np.fill_diagonal(bandwidth, np.inf)
    np.fill_diagonal(latency, 0.0)
    return CostModel(
        node_names=tuple(f"n{d}" for d in range(nodes)),
        layer_seconds=seconds,
        boundary_bytes=boundary,
        stage_memory_bytes=memory,
        node_memory_bytes=node_memory,
        link_bytes_per_s=bandwidth,
        link_latency_s=latency,
        source=int(rng.integers(nodes)),
        sink=int(rng.integers(nodes)),
        layer_param_bytes=params,
    )


def random_media(rng: np.random.Generator, cost: CostModel) -> CostModel:
    """``cost`` with one or two shared media, each node on one of them or on none."""
    nodes, count = cost.num_nodes, int(rng.integers(1, 3))
    on = rng.integers(-1, count, nodes)  # -1: on no medium
    uses = np.array([[[0 if a == b else int(on[a] == m) + int(on[b] == m)
                       for b in range(nodes)] for a in range(nodes)] for m in range(count)])
    bandwidth = rng.choice([1e6, 1e7, 1e8], count) * rng.uniform(0.5, 2, count)
    return replace(cost, media=Media(tuple(f"m{m}" for m in range(count)), bandwidth, uses))


def airtimes(cost: CostModel, nbytes: float, a: int, b: int) -> list[float]:
    """Each medium's busy time moving ``nbytes`` from ``a`` to ``b`` (none without media)."""
    media = cost.media
    if media is None:
        return []
    return [nbytes * float(media.uses[m][a][b]) / float(media.bytes_per_s[m])
            if a != b and media.uses[m][a][b] else 0.0 for m in range(len(media.names))]


def brute_force(cost: CostModel) -> list[tuple[float, float]]:
    """(latency, bottleneck) of every plan that fits, priced from scratch."""
    layers, nodes = cost.num_layers, cost.num_nodes
    seconds = cost.layer_seconds.tolist()
    plans = []

    def hop(boundary: int, a: int, b: int) -> float:
        """The link's busy time (at least the hop's airtime on the media): a frame's latency
        delays it but keeps no link busy."""
        if a == b:
            return 0.0
        nbytes = cost.boundary_bytes[boundary]
        return max(nbytes / cost.link_bytes_per_s[a][b],
                   math.fsum(airtimes(cost, nbytes, a, b)))

    def delay(a: int, b: int) -> float:
        return 0.0 if a == b else cost.link_latency_s[a][b]

    for k in range(1, min(layers, nodes) + 1):
        for cuts in itertools.combinations(range(1, layers), k - 1):
            edges = (0, *cuts, layers)
            ranges = list(itertools.pairwise(edges))
            for assign in itertools.permutations(range(nodes), k):
                if any(cost.node_stage_memory()[d][a][b] > cost.node_memory_bytes[d]
                       for d, (a, b) in zip(assign, ranges, strict=True)):
                    continue
                costs, delays, air = [], [], []
                where = cost.source
                for d, (a, b) in zip(assign, ranges, strict=True):
                    costs.append(hop(a, where, d))
                    delays.append(delay(where, d))
                    air.append(airtimes(cost, cost.boundary_bytes[a], where, d))
                    costs.append(math.fsum(seconds[d][a:b]))
                    where = d
                costs.append(hop(layers, where, cost.sink))
                delays.append(delay(where, cost.sink))
                air.append(airtimes(cost, cost.boundary_bytes[layers], where, cost.sink))
                busy = [math.fsum(per_medium) for per_medium in zip(*air, strict=True)]
                plans.append((math.fsum(costs + delays), max(costs + busy)))
    return plans


def instances(count: int, seed: int, media: bool = False):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        nodes = int(rng.integers(2, 7))
        layers = int(rng.integers(1, 9 if nodes <= 4 else 7))
        cost = random_cost(rng, nodes, layers, tight=bool(rng.random() < 0.4))
        yield random_media(rng, cost) if media else cost


@pytest.mark.parametrize("seed, media", [*((seed, False) for seed in range(6)),
                                         *((seed, True) for seed in range(6, 9))])
def test_optimizer_matches_brute_force(seed: int, media: bool) -> None:
    for cost in instances(100 if not media else 40, seed, media):
        plans = brute_force(cost)
        if not plans:
            with pytest.raises(NoFeasiblePlanError, match="no plan fits"):
                optimize(cost, Objective.LATENCY)
            with pytest.raises(NoFeasiblePlanError, match="no plan fits"):
                optimize(cost, Objective.THROUGHPUT)
            continue
        fastest = min(latency for latency, _ in plans)
        result = optimize(cost, Objective.LATENCY)
        assert result.exact and result.schedule.fits
        assert result.schedule.latency_s == pytest.approx(fastest, rel=RELATIVE)
        assert result.lower_bound_s == pytest.approx(result.schedule.latency_s)

        narrowest = min(bottleneck for _, bottleneck in plans)
        tied = min(lat for lat, neck in plans if neck <= narrowest * (1 + RELATIVE))
        result = optimize(cost, Objective.THROUGHPUT, replicate=False)
        assert result.exact and result.schedule.fits
        assert result.schedule.bottleneck_s == pytest.approx(narrowest, rel=RELATIVE)
        assert result.schedule.latency_s == pytest.approx(tied, rel=RELATIVE)


def tiny_cost() -> CostModel:
    """Two nodes, three layers; node 1 is twice as fast, the link is 1000 B/s plus 0.5 s."""
    return CostModel(
        node_names=("a", "b"),
        layer_seconds=np.array([[1.0, 2.0, 3.0], [0.5, 1.0, 1.5]]),
        boundary_bytes=np.array([1000.0, 2000.0, 500.0, 100.0]),
        stage_memory_bytes=np.triu(np.full((4, 4), 10.0), k=1),
        node_memory_bytes=np.array([10, 10]),
        link_bytes_per_s=np.array([[np.inf, 1000.0], [1000.0, np.inf]]),
        link_latency_s=np.array([[0.0, 0.5], [0.5, 0.0]]),
        source=0,
        sink=0,
    )


def test_evaluate_by_hand() -> None:
    schedule = evaluate(tiny_cost(), [Span(0, 0, 2), Span(1, 2, 3)])
    # a runs layers 0-1 (3 s), ships 500 B (0.5 s busy, then 0.5 s latency), b runs layer
    # 2 (1.5 s), ships 100 B back (0.1 s busy, 0.5 s latency).
    assert schedule.stage_seconds == (3.0, 1.5)
    assert schedule.transfer_seconds == pytest.approx((0.0, 0.5, 0.1))
    assert schedule.delay_seconds == (0.0, 0.5, 0.5)
    assert schedule.latency_s == pytest.approx(6.1)
    assert schedule.bottleneck_s == 3.0
    assert schedule.throughput_per_s == pytest.approx(1 / 3)
    assert schedule.fits


@pytest.mark.parametrize("on_air, transfer, busy, bottleneck", [
    ((1, 1), (0.0, 4.0, 0.8), 4.8, 4.8),  # a -> access point -> b: twice the bytes
    ((0, 1), (0.0, 2.0, 0.4), 2.4, 3.0),  # a wired, b a station: once; a's stage is busiest
])
def test_evaluate_by_hand_with_a_shared_medium(
    on_air: tuple[int, int], transfer: tuple[float, ...], busy: float, bottleneck: float
) -> None:
    uses = np.array([[[0, on_air[0] + on_air[1]], [on_air[0] + on_air[1], 0]]])
    cost = replace(tiny_cost(), media=Media(("air",), np.array([250.0]), uses))
    schedule = evaluate(cost, [Span(0, 0, 2), Span(1, 2, 3)])
    # 500 B then 100 B at 250 B/s per use; each link alone would take 0.5 s and 0.1 s
    assert schedule.transfer_seconds == pytest.approx(transfer)
    assert schedule.medium_seconds == pytest.approx((busy,))
    assert schedule.bottleneck_s == pytest.approx(bottleneck)
    assert schedule.latency_s == pytest.approx(3.0 + 1.5 + sum(transfer) + 1.0)


def test_evaluate_single_node_off_source() -> None:
    schedule = evaluate(tiny_cost(), [Span(1, 0, 3)])
    assert schedule.transfer_seconds == pytest.approx((1.0, 0.1))
    assert schedule.latency_s == pytest.approx(1.0 + 0.5 + 3.0 + 0.1 + 0.5)
    assert schedule.bottleneck_s == 3.0


def test_latency_delays_a_request_but_keeps_no_link_busy() -> None:
    """Over a link of 10 s latency, a alone (6 s a request) is the fastest plan for one
    request, but a frame still crosses the link in its bytes over the bandwidth, so
    splitting over a and b keeps each busy at most 2.5 s a request."""
    cost = CostModel(**{**tiny_cost().__dict__, "link_latency_s": np.array([[0, 10.0],
                                                                           [10.0, 0]])})
    schedule = evaluate(cost, [Span(0, 0, 2), Span(1, 2, 3)])
    assert schedule.bottleneck_s == 3.0
    assert schedule.latency_s == pytest.approx(3.0 + 0.5 + 10.0 + 1.5 + 0.1 + 10.0)
    widest = optimize(cost, Objective.THROUGHPUT, replicate=False).schedule
    assert widest.spans == (Span(0, 0, 1), Span(1, 1, 3))
    assert widest.bottleneck_s == pytest.approx(2.5)  # b's compute; 2000 B take 2 s
    assert optimize(cost, Objective.LATENCY).schedule.spans == (Span(0, 0, 3),)


@pytest.mark.parametrize("spans, message", [
    ([], "at least one stage"),
    ([Span(0, 0, 2)], "end at layer 2"),
    ([Span(0, 0, 1), Span(1, 2, 3)], "does not continue"),
    ([Span(0, 0, 0), Span(1, 0, 3)], "does not continue"),
    ([Span(0, 0, 1), Span(0, 1, 3)], "more than one stage"),
    ([Span(2, 0, 3)], "names no node"),
])
def test_evaluate_rejects_bad_spans(spans: list[Span], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate(tiny_cost(), spans)


def test_evaluate_reports_memory() -> None:
    cost = tiny_cost()
    cost = CostModel(**{**cost.__dict__, "node_memory_bytes": np.array([5, 10])})
    assert not evaluate(cost, [Span(0, 0, 3)]).fits
    assert evaluate(cost, [Span(1, 0, 3)]).fits


def test_infeasible_names_the_closest_node() -> None:
    cost = tiny_cost()
    span = np.arange(4)[None, :] - np.arange(4)[:, None]
    memory = np.where(span > 0, span * 1024.0**3, 0.0)  # 1 GiB per layer
    cost = CostModel(**{**cost.__dict__, "stage_memory_bytes": memory,
                        "node_memory_bytes": np.array([1024**3 // 2, 3 * 1024**3 // 4])})
    # At least one stage holds two layers; it is least short on 'b'.
    for objective in Objective:
        with pytest.raises(NoFeasiblePlanError, match=(
            r"^no plan fits: the closest one still needs 2\.0 GiB for layers \[\d, \d\) "
            r"on 'b', which has 768\.0 MiB; add memory or nodes$"
        )):
            optimize(cost, objective)


EXACT_SOLVER = SolverLimits(time_limit_s=60.0, relative_gap=0.0)


def solver_answer(cost: CostModel, objective: Objective,
                  limits: SolverLimits = EXACT_SOLVER) -> OptimizeResult | None:
    """The forced solver path's result (``None``: it raised NoFeasiblePlanError), with the
    exact search switched off for the call."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimizer, "EXACT_WORK_LIMIT", 0)
        try:
            return optimize(cost, objective, limits)
        except NoFeasiblePlanError:
            return None


def check_same_answer(cost: CostModel, objective: Objective) -> None:
    """The solver finds a plan exactly when the exact search does, and one as good: the
    objective equal, the tie-break's latency too, the lower bound proven and met."""
    try:
        exact = optimize(cost, objective, replicate=False)
    except NoFeasiblePlanError:
        assert solver_answer(cost, objective) is None
        return
    solved = solver_answer(cost, objective)
    assert solved is not None and solved.schedule.fits
    want, got = objective.key(exact.schedule), objective.key(solved.schedule)
    assert got[0] == pytest.approx(want[0], rel=RELATIVE)
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    assert solved.exact
    assert solved.lower_bound_s == pytest.approx(want[0], rel=RELATIVE)
    if cost.compression is not None:
        check_admitted(cost, solved.schedule)


@pytest.mark.parametrize("objective", list(Objective))
@pytest.mark.parametrize("seed", range(3))
def test_solver_matches_the_exact_search(objective: Objective, seed: int) -> None:
    for cost in instances(60, 200 + seed):
        check_same_answer(cost, objective)


@pytest.mark.parametrize("objective", list(Objective))
def test_solver_past_the_exact_limit_with_media(objective: Objective) -> None:
    """Warm-started from the restricted searches instead of the exhaustive one."""
    for cost in instances(40, 210, media=True):
        check_same_answer(cost, objective)


@pytest.mark.parametrize("objective", list(Objective))
def test_solver_matches_the_exact_search_with_choices(objective: Objective) -> None:
    for cost in choice_instances(40, 300):
        check_same_answer(cost, objective)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nodes=st.integers(2, 6), layers=st.integers(1, 12),
       tight=st.booleans(), objective=st.sampled_from(list(Objective)))
def test_solver_matches_the_exact_search_anywhere(
    seed: int, nodes: int, layers: int, tight: bool, objective: Objective
) -> None:
    check_same_answer(random_cost(np.random.default_rng(seed), nodes, layers, tight), objective)


def only_one_order_fits() -> CostModel:
    """Source and sink 'a' holds nothing; only 'b' then 'c' fits ('c' is the fastest node
    and has the most memory, so the fixed orders put it before 'b')."""
    return CostModel(
        node_names=("a", "b", "c"),
        layer_seconds=np.array([[3.0, 3.0], [2.0, 2.0], [1.0, 1.0]]),
        boundary_bytes=np.full(3, 100.0),
        stage_memory_bytes=np.array([[0.0, 10.0, 30.0], [0.0, 0.0, 20.0], [0.0, 0.0, 0.0]]),
        node_memory_bytes=np.array([5, 10, 20]),
        link_bytes_per_s=np.where(np.eye(3), np.inf, 1e4),
        link_latency_s=np.where(np.eye(3), 0.0, 1e-3),
        source=0,
        sink=0,
    )


@pytest.mark.parametrize("objective", list(Objective))
def test_solver_finds_the_order_the_restricted_search_misses(
    objective: Objective, monkeypatch: pytest.MonkeyPatch
) -> None:
    cost = only_one_order_fits()
    monkeypatch.setattr(optimizer, "EXACT_WORK_LIMIT", 0)
    tables = optimizer._Tables.build(cost)
    spaces = optimizer._restricted_spaces(cost, cost.num_layers + 1)
    assert all(optimizer._best(cost, tables, objective, space) is None for space in spaces)
    result = optimize(cost, objective)
    assert result.schedule.spans == (Span(1, 0, 1), Span(2, 1, 2))
    assert result.exact and result.schedule.fits


@pytest.mark.parametrize("objective", list(Objective))
def test_solver_proves_no_plan_fits(objective: Objective, monkeypatch: pytest.MonkeyPatch) -> None:
    cost = only_one_order_fits()
    cost = CostModel(**{**cost.__dict__, "node_memory_bytes": np.array([5, 10, 19])})
    monkeypatch.setattr(optimizer, "EXACT_WORK_LIMIT", 0)
    with pytest.raises(NoFeasiblePlanError, match=(
        r"^no plan fits: the closest one found still needs 20 B for layers \[1, 2\) on 'c', "
        r"which has 19 B; add memory or nodes$"
    )):
        optimize(cost, objective)


def test_solver_out_of_time_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without time the restricted search's plan stands, not proven optimal; with neither a
    plan nor a proof, the error says the time ran out (not that no plan fits)."""
    monkeypatch.setattr(optimizer, "EXACT_WORK_LIMIT", 0)
    no_time = SolverLimits(time_limit_s=0.0)
    cost = next(c for c in instances(50, 11) if brute_force(c) and c.num_nodes >= 4)
    result = optimize(cost, Objective.THROUGHPUT, no_time)
    assert result.schedule.fits
    assert result.lower_bound_s <= result.schedule.bottleneck_s
    with pytest.raises(PlanningError, match="neither found a plan nor proved"):
        optimize(only_one_order_fits(), Objective.LATENCY, no_time)


def test_single_layer_and_single_node() -> None:
    rng = np.random.default_rng(5)
    cost = random_cost(rng, 1, 1, tight=False)
    cost = CostModel(**{**cost.__dict__, "node_memory_bytes": np.array([10**9])})
    for objective in Objective:
        result = optimize(cost, objective)
        assert result.schedule.spans == (Span(0, 0, 1),)


@pytest.mark.parametrize("objective", list(Objective))
def test_never_worse_than_a_fitting_baseline(objective: Objective) -> None:
    for cost in instances(80, 7):
        try:
            best = optimize(cost, objective).schedule
        except NoFeasiblePlanError:
            continue
        for baseline in baselines(cost, objective):
            schedule = baseline.schedule
            if schedule is None or not schedule.fits:
                continue
            if objective is Objective.LATENCY:
                assert best.latency_s <= schedule.latency_s * (1 + RELATIVE), baseline.name
            else:
                assert best.bottleneck_s <= schedule.bottleneck_s * (1 + RELATIVE), baseline.name


def random_compression(rng: np.random.Generator, cost: CostModel) -> CostModel:
    """``cost`` with one or two encodings per boundary (some withheld), maybe a weight
    format, codec times, errors, and a budget that is infinite, zero or finite."""
    layers, nodes = cost.num_layers, cost.num_nodes
    codes = int(rng.integers(1, 3))
    budget = float(rng.choice([np.inf, 0.0, 1.0, 1.0, 1.0]))
    nbytes = np.asarray(cost.boundary_bytes)[:, None] * rng.uniform(0.05, 0.9, (layers + 1, codes))
    nbytes[rng.random(nbytes.shape) < 0.15] = np.inf
    error = rng.uniform(0.0, 0.7, (layers + 1, codes)) * rng.choice([0.0, 1.0], (layers + 1, codes),
                                                                 p=[0.1, 0.9])
    links = LinkChoices(
        names=tuple(f"c{e}" for e in range(codes)), nbytes=nbytes,
        encode_s=rng.uniform(0, 3e-3, (layers + 1, codes)),
        decode_s=rng.uniform(0, 3e-3, (layers + 1, codes)),
        error=error, raw=bool(rng.random() < 0.8),
    )
    weights = None
    if rng.random() < 0.5:
        memory = cost.node_stage_memory().max(axis=0).astype(float)
        weights = WeightChoices(
            names=("q",),
            layer_seconds=np.asarray(cost.layer_seconds)[None] * rng.uniform(0.4, 1.3,
                                                                            (1, nodes, layers)),
            stage_memory_bytes=memory[None] * rng.uniform(0.2, 0.6),
            layer_error=rng.uniform(0.0, 0.4, (1, layers)),
        )
    compression = Compression(links, weights, budget, int(rng.integers(1, 6)))
    return CostModel(**{**cost.__dict__, "compression": compression})


def units(error: float, compression: Compression) -> int:
    """An error in budget units, rounded up (the discretization the search promises)."""
    if math.isinf(compression.max_error):
        return 0
    if compression.max_error == 0:
        return 0 if error == 0 else compression.budget_units + 1
    return math.ceil(error / (compression.max_error / compression.budget_units) * (1 - 1e-12))


def _pricers(cost: CostModel):
    """Functions pricing a link option and a stage option from the raw arrays."""
    links, weights = cost.compression.links, cost.compression.weights

    def link(b: int, e: int) -> tuple[float, float, float, float]:
        """bytes, encode, decode, error of boundary b in option e (0 raw)."""
        if e == 0:
            return float(cost.boundary_bytes[b]), 0.0, 0.0, 0.0
        return (links.nbytes[b][e - 1], links.encode_s[b][e - 1], links.decode_s[b][e - 1],
                links.error[b][e - 1])

    def stage(d: int, a: int, b: int, w: int) -> tuple[float, float, float]:
        """seconds, memory, error of layers [a, b) on d in format w (0 full precision)."""
        if w == 0:
            return math.fsum(cost.layer_seconds[d][a:b]), cost.node_stage_memory()[d][a][b], 0.0
        return (math.fsum(weights.layer_seconds[w - 1][d][a:b]),
                weights.stage_memory_bytes[w - 1][a][b],
                math.fsum(weights.layer_error[w - 1][a:b]))

    return link, stage


def brute_force_choices(cost: CostModel) -> list[tuple[float, float]]:
    """(latency, bottleneck) of every plan, encoding per link and weight format per stage
    that fits memory and the error budget, priced from scratch."""
    links, weights = cost.compression.links, cost.compression.weights
    layers, nodes = cost.num_layers, cost.num_nodes
    codes = 1 + len(links.names)
    kinds = 1 + (len(weights.names) if weights else 0)
    pricers = _pricers(cost)
    plans = []
    for k in range(1, min(layers, nodes) + 1):
        for cuts in itertools.combinations(range(1, layers), k - 1):
            edges = (0, *cuts, layers)
            ranges = list(itertools.pairwise(edges))
            for assign in itertools.permutations(range(nodes), k):
                chain = [cost.source, *assign, cost.sink]
                for encs in itertools.product(range(codes), repeat=k + 1):
                    for fmts in itertools.product(range(kinds), repeat=k):
                        priced = _price_choices(cost, chain, edges, ranges, encs, fmts, *pricers)
                        if priced is not None:
                            plans.append(priced)
    return plans


def _price_choices(cost, chain, edges, ranges, encs, fmts, link, stage):
    """(latency, bottleneck) of one plan with its choices, or None if it is not admitted."""
    compression = cost.compression
    spent = 0
    items, delays, air = [], [], []
    for h, (a, b) in enumerate(itertools.pairwise(chain)):
        boundary, e = edges[h], encs[h]
        if a == b:
            if e:
                return None
            items.append(0.0)
            continue
        if e == 0 and not compression.links.raw:
            return None
        nbytes, encode, decode, error = link(boundary, e)
        spent += units(error, compression)
        seconds = nbytes / cost.link_bytes_per_s[a][b]
        delays.append(cost.link_latency_s[a][b])
        seconds += (encode if boundary == 0 else 0.0) + (decode if boundary == cost.num_layers
                                                         else 0.0)
        air.append(airtimes(cost, nbytes, a, b))
        items.append(max(seconds, math.fsum(air[-1])))
    stages = []
    for k, ((a, b), d, w) in enumerate(zip(ranges, chain[1:-1], fmts, strict=True)):
        seconds, memory, error = stage(d, a, b, w)
        if memory > cost.node_memory_bytes[d]:
            return None
        spent += units(error, compression)
        stages.append(seconds + link(a, encs[k])[2] + link(b, encs[k + 1])[1])
    if spent > compression.budget_units and not math.isinf(compression.max_error):
        return None
    every = items + stages
    if not all(math.isfinite(x) for x in every):
        return None
    busy = [math.fsum(per_medium) for per_medium in zip(*air, strict=True)]
    return math.fsum(every + delays), max(every + busy)


def choice_instances(count: int, seed: int, media: bool = False):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        nodes = int(rng.integers(2, 5))
        layers = int(rng.integers(1, 5 if nodes <= 3 else 4))
        cost = random_compression(rng, random_cost(rng, nodes, layers,
                                                   tight=bool(rng.random() < 0.3)))
        yield random_media(rng, cost) if media else cost


@pytest.mark.parametrize("seed, media", [(100, False), (101, False), (102, False),
                                         (103, True), (104, True)])
def test_optimizer_with_choices_matches_brute_force(seed: int, media: bool) -> None:
    for cost in choice_instances(40 if not media else 20, seed, media):
        plans = brute_force_choices(cost)
        if not plans:
            for objective in Objective:
                with pytest.raises(NoFeasiblePlanError):
                    optimize(cost, objective)
            continue
        result = optimize(cost, Objective.LATENCY)
        assert result.exact and result.schedule.fits
        assert result.schedule.latency_s == pytest.approx(min(p[0] for p in plans), rel=RELATIVE)
        check_admitted(cost, result.schedule)

        narrowest = min(bottleneck for _, bottleneck in plans)
        tied = min(lat for lat, neck in plans if neck <= narrowest * (1 + RELATIVE))
        result = optimize(cost, Objective.THROUGHPUT, replicate=False)
        assert result.schedule.bottleneck_s == pytest.approx(narrowest, rel=RELATIVE)
        assert result.schedule.latency_s == pytest.approx(tied, rel=RELATIVE)
        check_admitted(cost, result.schedule)


def check_admitted(cost: CostModel, schedule) -> None:
    """The schedule's choices fit the budget when priced by the test's own rules; one path,
    so its median latency is its latency."""
    chain = [cost.source, *(s.node for s in schedule.spans), cost.sink]
    edges = [0, *(s.end for s in schedule.spans)]
    ranges = [(s.start, s.end) for s in schedule.spans]
    priced = _price_choices(cost, chain, edges, ranges, schedule.encodings, schedule.formats,
                            *_pricers(cost))
    assert priced is not None
    assert priced[0] == pytest.approx(schedule.latency_s, rel=RELATIVE)
    assert schedule.latency_p50_s == schedule.latency_s


@pytest.mark.parametrize("bandwidth, chosen", [(1e5, 1), (1e10, 0)])
def test_an_encoding_is_chosen_on_a_slow_link_only(bandwidth: float, chosen: int) -> None:
    """Source a, sink b: 1 MB must cross; halving it costs 1 ms each side."""
    cost = tiny_cost()
    links = LinkChoices(("half",), cost.boundary_bytes[:, None] * 1000 / 2,
                        np.full((4, 1), 1e-3), np.full((4, 1), 1e-3), np.full((4, 1), 0.01))
    cost = CostModel(**{**cost.__dict__, "boundary_bytes": cost.boundary_bytes * 1000,
                        "link_bytes_per_s": np.array([[np.inf, bandwidth], [bandwidth, np.inf]]),
                        "sink": 1, "compression": Compression(links, max_error=0.05)})
    for objective in Objective:
        schedule = optimize(cost, objective).schedule
        assert max(schedule.encodings) == chosen
        assert schedule.error_bound == pytest.approx(0.01 * sum(map(bool, schedule.encodings)))


def test_the_budget_limits_the_encodings_chosen() -> None:
    """Each encoded link costs 0.03; a budget of 0.05 admits one of the two links."""
    cost = tiny_cost()
    links = LinkChoices(("half",), cost.boundary_bytes[:, None] * 1000 / 2,
                        np.zeros((4, 1)), np.zeros((4, 1)), np.full((4, 1), 0.03))
    slow = np.array([[np.inf, 1e5], [1e5, np.inf]])
    cost = CostModel(**{**cost.__dict__, "boundary_bytes": cost.boundary_bytes * 1000,
                        "layer_seconds": np.array([[9.0, 9.0, 9.0], [0.5, 1.0, 1.5]]),
                        "link_bytes_per_s": slow,
                        "compression": Compression(links, max_error=0.05, budget_units=10)})
    schedule = optimize(cost, Objective.LATENCY).schedule
    assert [s.node for s in schedule.spans] == [1]  # a -> b -> a: two links
    assert sorted(schedule.encodings) == [0, 1]
    assert schedule.error_bound == pytest.approx(0.03)


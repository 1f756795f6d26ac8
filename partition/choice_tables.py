"""Compression as a dimension of the exact search: the state graph's tables with choices.

Without compression a state of :mod:`partition.optimizer` is (boundary ``b``, node, nodes
used). With a :class:`~partition.costs.Compression` the boundary index becomes a *state
index* ``v = (b, u, e)``: boundary ``b``'s activations, ``u`` error units spent so far and
the encoding ``e`` they crossed their last link in (0 = raw). The search itself is
unchanged; only its tables grow:

- a *stage* edge ``(i, u, e) -> (j, u', e')`` on node ``d`` runs layers ``[i, j)`` in the
  weight format ``w`` that is cheapest among those with ``u' = u + units(w, i, j) +
  units(j, e')``; it costs decoding boundary ``i`` from ``e`` (on ``d``, the receiver) plus
  the layers' compute in format ``w`` plus encoding boundary ``j`` into ``e'`` (on ``d``,
  the sender), and exists only if the stage fits ``d``'s memory in format ``w``;
- a *hop* edge moves ``(j, u, e)`` to another node: encoded bytes over the bandwidth, the
  time it keeps the link busy (the optimizer adds the link's latency where it prices a
  request's latency). The source, which runs no stage, encodes the model's input on the first
  link, and the sink decodes the output on the last, so those codec times count with the
  link. A hop from a node to itself moves nothing and only raw may take it.

The error budget: each option's error (measured alone) is rounded *up* to whole units of
``max_error / budget_units`` and a path may spend at most ``budget_units`` units, so the
summed error of every admitted plan is within ``max_error``. The search is exact over all
splits x nodes x encodings x weight formats whose rounded errors fit the budget; a plan
whose true sum fits only before rounding is not admitted. Stage edges only go to a later
boundary, so state indices in increasing order stay a topological order. Tables are dense,
``N x V x V`` with ``V = (L+1) x (budget_units+1) x (E+1)``: :func:`budget_units_that_fit`
says how fine a budget the size allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partition.costs import Compression, CostModel
from partition.errors import PlanningError

TABLE_LIMIT = 2e7
"""Largest ``N x V x V`` stage table built (160 MB of float64)."""


@dataclass(frozen=True)
class Options:
    """Every option of a cost model with raw and full precision as option 0.

    ``link_*`` are ``(L+1, E+1)``; ``layer_seconds`` ``(W+1, N, L)``; ``stage_memory``
    ``(W+1, N, L+1, L+1)`` (option 0 per node, as the cost model's); ``layer_error``
    ``(W+1, L)``.
    """

    encodings: tuple[str, ...]
    formats: tuple[str, ...]
    link_bytes: np.ndarray
    encode_s: np.ndarray
    decode_s: np.ndarray
    link_error: np.ndarray
    raw_on_links: bool
    layer_seconds: np.ndarray
    stage_memory: np.ndarray
    layer_error: np.ndarray

    @classmethod
    def of(cls, cost: CostModel) -> Options:
        compression = cost.compression or Compression()
        links, weights = compression.links, compression.weights
        raw = np.asarray(cost.boundary_bytes, dtype=float)[:, None]
        zero = np.zeros_like(raw)
        seconds = np.asarray(cost.layer_seconds, dtype=float)[None]
        memory = cost.node_stage_memory().astype(float)[None]
        offered = (np.broadcast_to(weights.stage_memory_bytes[:, None], (
            len(weights.names), *memory.shape[1:])) if weights else None)
        exact = np.zeros((1, cost.num_layers))
        return cls(
            encodings=("raw", *(links.names if links else ())),
            formats=("none", *(weights.names if weights else ())),
            link_bytes=np.hstack([raw, links.nbytes]) if links else raw,
            encode_s=np.hstack([zero, links.encode_s]) if links else zero,
            decode_s=np.hstack([zero, links.decode_s]) if links else zero,
            link_error=np.hstack([zero, links.error]) if links else zero,
            raw_on_links=links.raw if links else True,
            layer_seconds=np.concatenate([seconds, weights.layer_seconds]) if weights else seconds,
            stage_memory=np.concatenate([memory, offered]) if weights else memory,
            layer_error=np.vstack([exact, weights.layer_error]) if weights else exact,
        )

    def stage_error(self) -> np.ndarray:
        """``(W+1, L+1, L+1)``: summed error of a stage ``[i, j)`` in each format."""
        prefix = np.concatenate(
            [np.zeros((len(self.formats), 1)), np.cumsum(self.layer_error, axis=1)], axis=1
        )
        return np.maximum(prefix[:, None, :] - prefix[:, :, None], 0.0)


def error_units(error: np.ndarray, compression: Compression | None) -> np.ndarray:
    """``error`` in whole budget units, rounded up; ``budget_units + 1`` (more than any
    path may spend) where an option alone breaks the budget.

    >>> error_units(np.array([0.0, 0.01, 0.1, 0.11]), Compression(max_error=0.1, budget_units=10))
    array([ 0,  1, 10, 11])
    """
    if compression is None or math.isinf(compression.max_error):
        return np.zeros(np.shape(error), dtype=np.int64)
    over = compression.budget_units + 1
    if compression.max_error <= 0:
        return np.where(np.asarray(error) > 0, over, 0)
    unit = compression.max_error / compression.budget_units
    units = np.ceil(np.asarray(error, dtype=float) / unit * (1 - 1e-12))
    return np.minimum(units, over).astype(np.int64)


def budget_states(compression: Compression | None) -> int:
    """How many values the spent-units coordinate of a state takes."""
    if compression is None or math.isinf(compression.max_error):
        return 1
    return compression.budget_units + 1


def budget_units_that_fit(nodes: int, layers: int, encodings: int, wanted: int) -> int:
    """The finest budget (at most ``wanted`` units) whose tables stay within
    :data:`TABLE_LIMIT`, and 1 when none does (:func:`choice_tables` then refuses)."""
    for units in range(wanted, 1, -1):
        states = (layers + 1) * (units + 1) * encodings
        if nodes * states * states <= TABLE_LIMIT:
            return units
    return 1


@dataclass(frozen=True)
class StateIndex:
    """What each state index stands for, and where paths start and end.

    ``starts``: indices the model's input may take on the source's link (boundary 0, its
    encoding and the units that costs); ``ends``: indices at the last boundary.
    """

    layer_of: np.ndarray
    encoding_of: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def plain(cls, layers: int) -> StateIndex:
        """One index per boundary: no choices."""
        return cls(np.arange(layers + 1), np.zeros(layers + 1, dtype=np.int64),
                   np.array([0]), np.array([layers]))


@dataclass(frozen=True)
class ChoiceTables:
    """Edge costs over state indices: ``stage[d, v, v']``, ``hop[v, a, c]``, the weight
    format of each stage edge, each layer's fastest time, and the index map."""

    stage: np.ndarray
    hop: np.ndarray
    stage_format: np.ndarray
    layer_floor: np.ndarray
    index: StateIndex


def choice_tables(cost: CostModel) -> ChoiceTables:
    """Build the tables of the search with choices (see the module docstring).

    Raises
    ------
    PlanningError
        The tables would exceed :data:`TABLE_LIMIT`.
    """
    opts = Options.of(cost)
    n, layers = cost.num_nodes, cost.num_layers
    units, codes = budget_states(cost.compression), len(opts.encodings)
    states = (layers + 1) * units * codes
    if n * states * states > TABLE_LIMIT:
        raise PlanningError(
            f"choosing compression over {layers} layers and {n} nodes needs "
            f"{n * states * states:.3g} table entries (limit {TABLE_LIMIT:.0e}); use a "
            "coarser --granularity, fewer --budget-units or --compress none"
        )

    def at(b: np.ndarray | int, u: np.ndarray | int, e: int) -> np.ndarray:
        return (np.asarray(b) * units + u) * codes + e

    link_units = error_units(opts.link_error, cost.compression)
    stage_units = error_units(opts.stage_error(), cost.compression)
    stage = np.full((n, states, states), np.inf)
    stage_format = np.zeros((n, states, states), dtype=np.int8)
    bounds = np.arange(layers + 1)
    upper = np.triu(np.ones((layers + 1, layers + 1), dtype=bool), k=1)
    node_memory = np.asarray(cost.node_memory_bytes, dtype=float)[:, None, None]
    for w in range(len(opts.formats)):
        prefix = np.concatenate([np.zeros((n, 1)), np.cumsum(opts.layer_seconds[w], axis=1)], 1)
        fits = upper[None] & (opts.stage_memory[w] <= node_memory)
        compute = np.where(fits, prefix[:, None, :] - prefix[:, :, None], np.inf)
        for e_out in range(codes):
            spend = stage_units[w] + link_units[None, :, e_out]
            for e_in in range(codes):
                value = (compute + opts.decode_s[:, e_in][None, :, None]
                         + opts.encode_s[:, e_out][None, None, :])
                for u in range(units):
                    valid = upper & (u + spend < units)
                    rows = at(bounds, u, e_in)[:, None]
                    cols = np.where(valid, at(bounds[None, :], u + spend, e_out), 0)
                    current = stage[:, rows, cols]
                    better = valid[None] & (value < current)
                    stage[:, rows, cols] = np.where(better, value, current)
                    stage_format[:, rows, cols] = np.where(better, w, stage_format[:, rows, cols])
    return ChoiceTables(
        stage, _hop_table(cost, opts, units), stage_format,
        opts.layer_seconds.min(axis=(0, 1)), _state_index(layers, units, codes, link_units),
    )


def _hop_table(cost: CostModel, opts: Options, units: int) -> np.ndarray:
    """``hop[v, a, c]``: how long moving state ``v``'s tensors from node ``a`` to node ``c``
    keeps the link busy."""
    n, layers = cost.num_nodes, cost.num_layers
    with np.errstate(divide="ignore", invalid="ignore"):
        hop = opts.link_bytes[:, :, None, None] / cost.link_bytes_per_s[None, None]
    hop[0] += opts.encode_s[0][:, None, None]
    hop[layers] += opts.decode_s[layers][:, None, None]
    if not opts.raw_on_links:
        hop[:, 0] = np.inf
    hop[:, :, np.arange(n), np.arange(n)] = np.inf
    hop[:, 0, np.arange(n), np.arange(n)] = 0.0
    # (b, e) -> (b, u, e): the same for every number of units spent.
    return np.repeat(hop[:, None], units, axis=1).reshape(-1, n, n)


def _state_index(layers: int, units: int, codes: int, link_units: np.ndarray) -> StateIndex:
    states = np.arange((layers + 1) * units * codes)
    starts = [(k * codes + e) for e, k in enumerate(link_units[0]) if k < units]
    return StateIndex(
        layer_of=states // (units * codes),
        encoding_of=states % codes,
        starts=np.array(starts, dtype=np.int64),
        ends=states[layers * units * codes:],
    )

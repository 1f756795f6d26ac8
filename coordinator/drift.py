"""Drift: a stage running slower than when it was deployed, for a sustained while.

Each stage's node reports the median time of its recent requests (``Describe``). The first
median over a full window of requests after a stage is loaded is its baseline; a stage whose
median stays more than :data:`DRIFT_RATIO` above it for :data:`SUSTAIN_POLLS` polls has
drifted, by the ratio of the two (a node heating up, sharing its CPU, or slowed on purpose).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from node.client import WorkerHandle
from partition.errors import EdgesplitError
from partition.plan import Plan

log = logging.getLogger(__name__)

POLL_S = 1.0
"""Time between two polls of the stages' nodes."""
DRIFT_RATIO = 1.3
"""A stage this many times slower than its baseline is off the plan (the issue's 30%)."""
SUSTAIN_POLLS = 3
"""Consecutive polls a stage must be off before it counts as drifted."""
WINDOW_REQUESTS = 100
"""Requests a node's median is taken over (``node.pipeline.STATS_WINDOW``)."""


@dataclass
class _Baseline:
    served_at_load: int
    p50_s: float | None = None
    off_polls: int = 0


class DriftWatch:
    """Tracks each stage's median time against its baseline."""

    def __init__(self) -> None:
        self._baselines: dict[tuple[str, int, int], _Baseline] = {}

    async def poll(self, plan: Plan, handles: dict[str, WorkerHandle]) -> dict[str, float]:
        """The nodes of ``plan`` that drifted, each with how many times slower it runs."""
        drifted = {}
        for stage in plan.stages:
            try:
                info = await handles[stage.node].describe()
            except EdgesplitError:
                continue  # the health watch handles nodes that do not answer
            key = (stage.node, stage.start, stage.end)
            base = self._baselines.setdefault(key, _Baseline(info.requests_served))
            if info.requests_served < base.served_at_load + WINDOW_REQUESTS:
                continue  # the median still mixes in requests of an earlier stage
            if base.p50_s is None:
                base.p50_s = info.p50_stage_seconds
                continue
            ratio = info.p50_stage_seconds / base.p50_s if base.p50_s > 0 else 1.0
            off = ratio > DRIFT_RATIO or ratio * DRIFT_RATIO < 1
            base.off_polls = base.off_polls + 1 if off else 0
            if base.off_polls >= SUSTAIN_POLLS:
                drifted[stage.node] = ratio
        return drifted

    def forget(self, nodes: set[str]) -> None:
        """Start the baselines of ``nodes`` again (after a switch re-measured them)."""
        self._baselines = {k: v for k, v in self._baselines.items() if k[0] not in nodes}

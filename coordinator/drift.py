"""Drift: a stage or a link running slower than when it was deployed, for a sustained while.

Each stage's node (each replica) reports the median time of its recent requests and, per
outbound link (to each node of the next stage, or to the sink), the median time the link
was busy with each of its recent frames (its latency excluded), counted since
the stage was loaded and the link wired (``Describe``; a link is measured only on frames the
receiver took at once). The first medians over a full window are the baselines; a stage or
link whose median stays more than :data:`DRIFT_RATIO` off its baseline for
:data:`SUSTAIN_POLLS` polls has drifted, by the ratio of the two (a node heating up or
sharing its CPU, a Wi-Fi link losing signal). A link must also be off by
:data:`LINK_NOISE_S` per frame: on a fast link the time per frame is mostly scheduling
noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from coordinator.deploy import replicas
from node.client import WorkerHandle
from partition.errors import EdgesplitError
from partition.plan import Plan

log = logging.getLogger(__name__)

POLL_S = 1.0
"""Time between two polls of the stages' nodes."""
DRIFT_RATIO = 1.3
"""A stage or link this many times slower (or faster) than its baseline is off the plan."""
SUSTAIN_POLLS = 3
"""Consecutive polls a stage or link must be off before it counts as drifted."""
WINDOW = 100
"""Requests or frames a node's medians are taken over (``node.pipeline.STATS_WINDOW``)."""
LINK_NOISE_S = 0.002
"""A link's time per frame must change by more than this to count as off."""


@dataclass
class Drift:
    """What drifted: nodes, and links ``(from, to)``, each with how many times slower it
    runs than its baseline; ``bandwidth`` is each drifted link's measured bandwidth: the
    bytes of a frame over the time it kept the link busy (a link's latency delays a frame
    without keeping the link busy, so it is not in that time)."""

    nodes: dict[str, float] = field(default_factory=dict)
    links: dict[tuple[str, str], float] = field(default_factory=dict)
    bandwidth: dict[tuple[str, str], float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.nodes or self.links)

    def update(self, other: Drift) -> None:
        self.nodes.update(other.nodes)
        self.links.update(other.links)
        self.bandwidth.update(other.bandwidth)


@dataclass
class _Baseline:
    """One median's baseline and how many polls in a row it has been off."""

    noise_s: float
    seconds: float | None = None
    off_polls: int = 0

    def drift(self, count: int, seconds: float) -> float | None:
        """How many times slower than the baseline, once that is sustained; else ``None``."""
        if count < WINDOW:
            return None  # not a full window since the stage was loaded or the link wired
        if self.seconds is None:
            self.seconds = seconds
            return None
        ratio = seconds / self.seconds if self.seconds > 0 else 1.0
        off = (ratio > DRIFT_RATIO or ratio * DRIFT_RATIO < 1) and \
            abs(seconds - self.seconds) > self.noise_s
        self.off_polls = self.off_polls + 1 if off else 0
        return ratio if self.off_polls >= SUSTAIN_POLLS else None


class DriftWatch:
    """Tracks each stage's and each outbound link's median time against its baseline."""

    def __init__(self) -> None:
        self._baselines: dict[tuple[str, str, int, int], _Baseline] = {}

    async def poll(self, plan: Plan, handles: dict[str, WorkerHandle]) -> Drift:
        """The stages' nodes (every replica) and the links of ``plan`` (every pair link)
        that drifted."""
        found = Drift()
        for _, replica in replicas(plan):
            node = replica.node
            stage = next(s for s in plan.stages if node in s.nodes)
            try:
                info = await handles[node].describe()
            except EdgesplitError:
                continue  # the health watch handles nodes that do not answer
            base = self._baselines.setdefault((node, "", stage.start, stage.end),
                                              _Baseline(0.0))
            ratio = base.drift(info.requests_served, info.p50_stage_seconds)
            if ratio is not None:
                found.nodes[node] = ratio
            for link in info.outbound_links:
                dst = link.node or plan.sink
                if dst == node:
                    continue  # the results stay on the node: no link to measure
                base = self._baselines.setdefault((node, dst, stage.start, stage.end),
                                                  _Baseline(LINK_NOISE_S))
                ratio = base.drift(link.link_frames, link.link_p50_seconds)
                if ratio is not None:
                    found.links[node, dst] = ratio
                    # bytes as sent (encoded, if the link is) over the busy time per frame
                    found.bandwidth[node, dst] = link.link_bytes_per_s
        return found

    def forget(self, nodes: set[str]) -> None:
        """Start the baselines of ``nodes``' stages and outbound links again (after a
        switch re-measured them)."""
        self._baselines = {k: v for k, v in self._baselines.items() if k[0] not in nodes}

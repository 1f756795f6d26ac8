"""What a running plan's nodes and links measure against the plan, the input of re-planning
after drift (see :mod:`coordinator.drift`); plain data, so the runtime imports no planner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Measured:
    """``slowdown``: how many times slower than its profile each node computes;
    ``bandwidth``: each link ``(from, to)``'s measured bytes per second. What is not named
    runs as planned."""

    slowdown: Mapping[str, float] = field(default_factory=dict)
    bandwidth: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def key(self) -> tuple[object, ...]:
        """A hashable form (for caching plans made with it)."""
        return tuple(sorted(self.slowdown.items())), tuple(sorted(self.bandwidth.items()))

    def updated(self, slowdown: Mapping[str, float],
                bandwidth: Mapping[tuple[str, str], float]) -> Measured:
        """These figures with new measurements: slowdowns measured against the last
        figures multiply in, bandwidths replace."""
        return Measured(
            {**self.slowdown, **{n: self.slowdown.get(n, 1.0) * r for n, r in slowdown.items()}},
            {**self.bandwidth, **bandwidth},
        )


AS_PLANNED = Measured()

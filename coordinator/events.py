"""Failover events: one line each, in the coordinator's log, in memory and in an events file
that ``coordinator status --plan`` shows."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("coordinator.failover")


@dataclass
class Replan:
    """One switch of plan: when (seconds since the pipeline opened), why, the stages before
    and after (``node[start,end)``), and what it cost."""

    at_s: float
    cause: str
    old_stages: list[str]
    new_stages: list[str]
    recovery_s: float | None = None
    """From the failure (last answer of the lost node) to the first answer after the switch."""
    detection_s: float | None = None
    """From the lost node's last answer to the verdict."""
    pause_s: float = 0.0
    """How long no request could be sent (re-planning, loading, wiring)."""
    moved_bytes: int = 0
    replayed: int = 0
    predicted_gain: float | None = None
    """Predicted throughput of the new plan over the old one's, minus 1 (``None`` when the
    old plan had lost a node)."""
    failed_at: float = field(default=0.0, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("failed_at")
        return data


def stage_names(stages) -> list[str]:
    """``node[start,end)`` for each stage of a plan (``a+b[start,end)`` for a stage
    replicated on nodes ``a`` and ``b``)."""
    return [f"{'+'.join(s.nodes)}[{s.start},{s.end})" for s in stages]


def events_path_for(plan_path: str | Path) -> Path:
    """Where a pipeline on ``plan.json`` writes its events: ``plan.events.log`` beside it."""
    path = Path(plan_path)
    return path.with_name(path.stem + ".events.log")


class EventLog:
    """Records events: logged at WARNING (failures) or INFO, kept, and appended to ``path``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.lines: list[str] = []
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def record(self, message: str, *, warning: bool = False) -> None:
        log.log(logging.WARNING if warning else logging.INFO, "%s", message)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self.lines.append(line)
        if self.path is not None:
            try:
                with self.path.open("a") as out:
                    out.write(line + "\n")
            except OSError as err:
                log.warning("cannot write the events file %s: %s", self.path, err)

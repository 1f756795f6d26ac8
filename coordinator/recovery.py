"""The pipeline's re-planner: the plan's model loaded once, re-planning and stage export in
a worker thread, and each exported stage kept for the next switch.

Kept apart from :mod:`coordinator.pipeline`, which imports only the plan format: the
pipeline constructs this on first need.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

from coordinator.calibration import read_calibration
from partition.errors import EdgesplitError
from partition.measured import AS_PLANNED, Measured
from partition.optimizer import Schedule
from partition.plan import Plan, PlannedStage
from partition.planning import with_predictions
from partition.quantize import WeightFormat
from partition.replanning import Replanner
from partition.split import StageArtifact, export_stage, plan_model

_T = TypeVar("_T")

MAX_PLANS = 64
"""Plans kept for node sets and measured speeds seen before (the most recent)."""


class PlanRecovery:
    """Re-plans ``plan`` over the nodes left and exports the stages a new plan needs.

    Plans and exported stages are kept, and :meth:`prewarm` makes them ahead of time for
    the loss of each node, so that recovering from one is loading and wiring only. The work
    runs in one worker thread, one piece at a time: ``torch.export`` is not thread-safe.
    """

    def __init__(self, plan: Plan, model_path: str | None = None) -> None:
        self._plan = plan
        self._model_path = model_path
        self._replanner: Replanner | None = None
        self._lock = asyncio.Lock()
        self._artifacts: dict[tuple[int, int, WeightFormat], StageArtifact] = {}
        self._plans: dict[tuple[frozenset[str], object], Plan] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replan")

    async def _run(self, work: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    def close(self) -> None:
        """Take no more work and let the thread end (after the piece it is running)."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def prepare(self) -> Replanner:
        """Load the model and its layer graph (once); the pipeline calls this early."""
        async with self._lock:
            if self._replanner is None:
                self._replanner = await self._run(self._load)
        return self._replanner

    def _load(self) -> Replanner:
        model, layer_graph = plan_model(self._plan, self._model_path)
        return Replanner(self._plan, model, layer_graph,
                         lambda path: read_calibration(path, model))

    async def replan(
        self, usable: Collection[str], measured: Measured = AS_PLANNED
    ) -> Plan:
        """The best plan over ``usable`` nodes (``NoFeasiblePlanError`` if none fits)."""
        replanner = await self.prepare()
        key = (frozenset(usable), measured.key())
        if key not in self._plans:
            self._plans[key] = await self._run(replanner.replan, usable, measured)
        return self._plans[key]

    async def prewarm(
        self, plan: Plan, usable: Collection[str], measured: Measured = AS_PLANNED
    ) -> None:
        """Make the plan without each node that runs a stage of ``plan`` alone (losing a
        replica of a stage needs no new plan) and the plan over the whole cluster (where a
        returning node leads), and export their stages; forget the rest."""
        replanner = await self.prepare()
        candidates = [set(usable) - {s.node} for s in plan.stages if not s.replicated]
        candidates.append(set(replanner.cluster.names))
        needed = {_artifact_key(s) for s in plan.stages}
        for nodes in candidates:
            try:
                other = await self.replan(nodes, measured)
            except EdgesplitError:
                continue  # nothing to prepare: losing that node fails the requests
            for stage in other.stages:
                needed.add(_artifact_key(stage))
                await self.artifact(stage)
        self._artifacts = {k: v for k, v in self._artifacts.items() if k in needed}
        if len(self._plans) > MAX_PLANS:
            self._plans = dict(list(self._plans.items())[-MAX_PLANS:])

    async def price(self, plan: Plan, measured: Measured = AS_PLANNED) -> Schedule:
        """``plan``'s stages priced with the ``measured`` figures."""
        replanner = await self.prepare()
        return await self._run(replanner.price, plan, measured)

    async def repriced(self, plan: Plan, measured: Measured = AS_PLANNED) -> Plan:
        """``plan`` with the predictions :meth:`price` makes for it."""
        return with_predictions(plan, await self.price(plan, measured))

    async def artifact(self, stage: PlannedStage) -> StageArtifact:
        """The exported program of ``stage`` (exported once per layer range and weight
        format)."""
        replanner = await self.prepare()
        key = _artifact_key(stage)
        if key not in self._artifacts:
            self._artifacts[key] = await self._run(export_stage, stage, replanner.layer_graph)
        made = self._artifacts[key]
        return StageArtifact(replace(made.spec, index=stage.index, node=stage.node), made.data)


def _artifact_key(stage: PlannedStage) -> tuple[int, int, WeightFormat]:
    """What makes two stages' exported programs the same."""
    return stage.start, stage.end, stage.weights

"""Re-planning a running plan: over the nodes left after a failure, or with measured speeds.

The same objective, cluster spec, profiles and compression request as the first plan
(carried in ``plan.json``, see :mod:`partition.replan_inputs`); a node that is gone is given
no memory, so no stage fits on it, a node measured slower has its profile scaled by how much
slower it runs, and a link measured off its plan has the bandwidth its measured busy time
per frame implies. A compressed plan's re-plans choose encodings and weight formats
again within the same error budget, and each is measured end to end like the first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import replace

import numpy as np

from partition.cluster import ClusterSpec, LinkSpec
from partition.compression_choice import Inputs, calibration_inputs
from partition.compression_planning import MeasuredOffer, measure_offer
from partition.cost_builder import build_cost_model
from partition.costs import CostModel
from partition.errors import EdgesplitError, NoFeasiblePlanError, PlanningError
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.measured import AS_PLANNED, Measured
from partition.optimizer import Schedule, Span, evaluate
from partition.plan import Plan
from partition.planning import plan_from_schedule, search
from partition.profiler import Profile
from partition.replan_inputs import read_replan_inputs

log = logging.getLogger(__name__)


class Replanner:
    """Plans ``current``'s model again on part of its cluster or with measured figures.

    A compressed plan's candidates are measured once, on the first re-plan, on the inputs
    ``read_calibration`` reads from the plan's ``--calibration`` file; without a file, or
    if it can no longer be read (said in a warning), on random inputs as many as the first.
    """

    def __init__(
        self, current: Plan, model: LoadedModel, layer_graph: LayerGraph,
        read_calibration: Callable[[str], list[Inputs]] | None = None,
    ) -> None:
        if current.replan is None:
            raise PlanningError(
                "the plan carries no cluster spec and profiles to re-plan with; "
                "make it again with `coordinator plan`"
            )
        self.current = current
        self.model = model
        self.layer_graph = layer_graph
        inputs = read_replan_inputs(current.replan)
        self.cluster, self.profiles = inputs.cluster, inputs.profiles
        self.compression = inputs.compression
        self.replicate = inputs.replicate
        self._read_calibration = read_calibration
        self._offer: MeasuredOffer | None = None

    def cost(
        self, usable: Collection[str] | None = None, measured: Measured = AS_PLANNED
    ) -> tuple[ClusterSpec, CostModel]:
        """The cluster (nodes outside ``usable`` without memory, links at their measured
        bandwidth) and its cost model."""
        cluster = replace(
            self.cluster,
            nodes=tuple(
                node if usable is None or node.name in usable else replace(node, memory_bytes=0)
                for node in self.cluster.nodes
            ),
            links={**self.cluster.links, **{
                pair: LinkSpec(bandwidth, self.cluster.link(*pair).latency_s)
                for pair, bandwidth in measured.bandwidth.items()}},
        )
        profiles: dict[str, Profile] = {
            name: profile.scaled(1.0 / measured.slowdown[name]) if name in measured.slowdown
            else profile
            for name, profile in self.profiles.items()
        }
        return cluster, build_cost_model(self.layer_graph, cluster, profiles)

    def price(self, plan_: Plan, measured: Measured = AS_PLANNED) -> Schedule:
        """``plan_``'s stages, dealt in its shares, priced with the ``measured`` figures."""
        _, cost = self.cost(None, measured)
        spans = [Span(cost.node_names.index(s.node), s.start, s.end,
                      tuple(cost.node_names.index(n) for n in s.nodes),
                      tuple(r.share for r in s.replicas)) for s in plan_.stages]
        return evaluate(cost, spans)

    def replan(self, usable: Collection[str], measured: Measured = AS_PLANNED) -> Plan:
        """The best plan for the same objective using only the ``usable`` nodes.

        Raises
        ------
        NoFeasiblePlanError
            If no plan fits the nodes left; the message names them and the shortfall.
        """
        if not usable:
            raise NoFeasiblePlanError("no node is left to run the model on")
        cluster, cost = self.cost(usable, measured)
        offer = None if self.compression is None else self._measured_offer()
        try:
            with np.errstate(divide="ignore", invalid="ignore"):  # nodes without memory
                result, cost, accuracy = search(cost, self.layer_graph, cluster,
                                                self.current.objective, offer, self.replicate)
        except NoFeasiblePlanError as err:
            raise NoFeasiblePlanError(
                f"no plan fits the nodes left ({', '.join(sorted(usable))}): {err}"
            ) from err
        made = plan_from_schedule(
            self.model, self.layer_graph, cluster, cost, result.schedule,
            self.current.objective, exact=result.exact, lower_bound_s=result.lower_bound_s,
        )
        return replace(made, model_path=self.current.model_path, replan=self.current.replan,
                       addresses=self.current.addresses, accuracy=accuracy,
                       unreplicated=result.unreplicated)

    def _measured_offer(self) -> MeasuredOffer:
        """The compression request's candidates, measured alone (once)."""
        assert self.compression is not None
        if self._offer is None:
            inputs = self._calibration() or calibration_inputs(
                self.model, self.compression.calibration_count)
            self._offer = measure_offer(self.layer_graph,
                                        self.compression.request(self.layer_graph, inputs))
        return self._offer

    def _calibration(self) -> list[Inputs] | None:
        """The first plan's calibration inputs, if its file can be read again."""
        path = self.compression.calibration_file if self.compression else None
        if path is None or self._read_calibration is None:
            return None
        try:
            return self._read_calibration(path)
        except EdgesplitError as err:
            log.warning("re-plans measure compression on random inputs: %s", err)
            return None

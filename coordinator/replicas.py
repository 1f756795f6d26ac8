"""Failover within a replicated stage: the plan without the replicas that were lost."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from partition.plan import Plan


def without_replicas(plan: Plan, lost: Collection[str]) -> Plan | None:
    """``plan`` with the nodes ``lost`` taken out of the stages they replicate: each such
    stage's remaining nodes take its requests in proportion to their shares, and the hops
    keep only the links between nodes that remain. ``None`` if a stage would have no node
    left, or if a lost node is the source or the sink (a re-plan is needed then); ``plan``
    itself if no node of it was lost. The predictions (latency mean and median, bottleneck,
    stage times) stay ``plan``'s: the plan carries no per-replica times to price the new
    dealing with (the pipeline prices it afterwards where it can: ``PlanRecovery.repriced``).
    """
    lost = set(lost)
    if not lost & {n for s in plan.stages for n in s.nodes}:
        return plan
    if lost & {plan.source, plan.sink}:
        return None
    stages = []
    for stage in plan.stages:
        kept = [r for r in stage.replicas if r.node not in lost]
        if not kept:
            return None
        total = sum(r.share for r in kept)
        kept = [replace(r, share=r.share / total) for r in kept]
        stages.append(replace(stage, replicas=tuple(kept)))
    links = tuple(link for k in range(len(plan.stages) + 1) for link in plan.hop_links(k)
                  if link.src not in lost and link.dst not in lost)
    return replace(plan, stages=tuple(stages), links=links)

"""Replicated plans for tests, made from a planner's plan until the planner makes them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from partition.plan import Plan, Replica


def replicate(plan: Plan, k: int, shares: Sequence[tuple[str, float]]) -> Plan:
    """``plan`` with stage ``k`` run by the nodes of ``shares`` ((node, share) pairs; the
    first is the stage's ``node``), and each hop's links rebuilt: one per (sender, receiver)
    pair, each like the hop's first link of ``plan``."""
    replicas = tuple(Replica(node, plan.addresses[node], share) for node, share in shares)
    stages = list(plan.stages)
    stages[k] = replace(stages[k], replicas=replicas)
    made = replace(plan, stages=tuple(stages), links=())
    links = []
    for hop in range(len(stages) + 1):
        like = plan.hop_links(hop)[0]
        senders, receivers = made.hop_ends(hop)
        links += [replace(like, src=src, dst=dst) for src in senders for dst in receivers]
    return replace(made, links=tuple(links))

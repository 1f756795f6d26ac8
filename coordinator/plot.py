"""Draw a plan as a pipeline over time: each stage's compute and each hop's transfer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coordinator.deploy import hop_link  # noqa: E402
from node.dealer import Dealer  # noqa: E402
from partition.plan import Plan  # noqa: E402


def pipeline_timeline(plan: Plan, requests: int) -> list[tuple[str, int, float, float]]:
    """``(resource, request, start_s, end_s)`` for ``requests`` sent back to back.

    Resources are the links (``"src -> dst"``) and the stages' nodes (``"stage k on
    node"``); each is busy with one request at a time, as in the cost model: a link for its
    transfer time, after which its latency delays the request without keeping the link
    busy. Requests are dealt among a replicated stage's nodes as the runtime deals them; a
    replica takes the stage's busy time per request over its share (the planner gives each
    replica the share that evens out their busy times).
    """
    dealers = [Dealer([r.share for r in stage.replicas]) for stage in plan.stages]
    free_at: dict[str, float] = {}
    bars = []

    def occupy(name: str, request: int, ready: float, busy: float) -> float:
        start = max(ready, free_at.get(name, 0.0))
        free_at[name] = start + busy
        if busy > 0:
            bars.append((name, request, start, start + busy))
        return start + busy

    for request in range(requests):
        ready, sender = 0.0, plan.source
        for k, (stage, dealer) in enumerate(zip(plan.stages, dealers, strict=True)):
            replica = stage.replicas[dealer.deal()]
            link = hop_link(plan, k, sender, replica.node)
            if link.src != link.dst:
                ready = occupy(f"{link.src} -> {link.dst}", request, ready,
                               stage.transfer_in_s) + link.latency_s
            ready = occupy(f"stage {k} on {replica.node}", request, ready,
                           stage.compute_s / replica.share)
            sender = replica.node
        last = hop_link(plan, len(plan.stages), sender, plan.sink)
        if last.src != last.dst:
            occupy(f"{last.src} -> {last.dst}", request, ready,
                   plan.stages[-1].bytes_out / last.bytes_per_s)
    return bars


def plot_plan(plan: Plan, path: str | Path, requests: int = 4) -> Path:
    """Write a PNG of ``requests`` flowing through the plan's pipeline."""
    bars = pipeline_timeline(plan, requests)
    rows = list(dict.fromkeys(name for name, *_ in bars))
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    for name, request, start, end in bars:
        ax.barh(rows.index(name), (end - start) * 1e3, left=start * 1e3, height=0.6,
                color=colors(request % 10), edgecolor="black", linewidth=0.4)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(
        f"{len(plan.stages)}-stage plan ({plan.objective.value}): latency "
        f"{plan.latency_s * 1e3:.2f} ms, {plan.throughput_per_s:.1f} req/s; "
        f"colors are {requests} requests"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)

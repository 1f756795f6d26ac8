"""Draw a plan as a pipeline over time: each stage's compute and each hop's transfer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from partition.plan import Plan  # noqa: E402


def pipeline_timeline(plan: Plan, requests: int) -> list[tuple[str, int, float, float]]:
    """``(resource, request, start_s, end_s)`` for ``requests`` sent back to back.

    Resources are the hops (``"src -> dst"``) and the stages (``"stage k on node"``); each
    is busy with one request at a time, as in the cost model: a hop for its transfer time,
    after which its latency delays the request without keeping the hop busy. A replicated
    stage (``"stage k on a+b"``) and its hops are drawn as one resource busy for its busiest
    replica's or link's share of each request, and a hop's latency as its longest link's.
    """
    resources: list[tuple[str, float, float]] = []  # name, busy seconds, delay after
    for k, stage in enumerate(plan.stages):
        resources.append((_hop_name(plan, k), stage.transfer_in_s, _hop_delay(plan, k)))
        resources.append((f"stage {k} on {'+'.join(stage.nodes)}", stage.compute_s, 0.0))
    last, hop = plan.stages[-1], len(plan.stages)
    crossing = [(r.share, link) for r, link in zip(last.replicas, plan.hop_links(hop),
                                                   strict=True) if link.src != link.dst]
    if crossing:
        busy = max(share * last.bytes_out / link.bytes_per_s for share, link in crossing)
        resources.append((_hop_name(plan, hop), busy, _hop_delay(plan, hop)))

    bars = []
    free_at = [0.0] * len(resources)
    for request in range(requests):
        ready = 0.0
        for index, (name, busy, delay) in enumerate(resources):
            start = max(ready, free_at[index])
            free_at[index] = start + busy
            ready = start + busy + delay
            if busy > 0:
                bars.append((name, request, start, start + busy))
    return bars


def _hop_name(plan: Plan, k: int) -> str:
    senders, receivers = plan.hop_ends(k)
    return f"{'+'.join(senders)} -> {'+'.join(receivers)}"


def _hop_delay(plan: Plan, k: int) -> float:
    """The longest latency among hop ``k``'s links between two nodes (0 if none)."""
    return max((link.latency_s for link in plan.hop_links(k) if link.src != link.dst),
               default=0.0)


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

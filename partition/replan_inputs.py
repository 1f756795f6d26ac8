"""What re-planning needs, carried in ``plan.json``: the cluster spec and each node's profile.

Plain JSON data, written by :func:`replan_inputs` when a plan is made and read back by
:func:`read_replan_inputs` when a node is lost, so a running pipeline re-plans with the
same inputs as the first plan and no extra files.
"""

from __future__ import annotations

from typing import Any

from partition.cluster import ClusterSpec, LinkSpec, NodeSpec
from partition.errors import PlanFormatError
from partition.profiler import Profile
from partition.quantize import WeightFormat

VERSION = 1


def replan_inputs(cluster: ClusterSpec, profiles: dict[str, Profile]) -> dict[str, Any]:
    """``cluster`` and ``profiles`` (one per node) as JSON data."""
    return {
        "version": VERSION,
        "cluster": {
            "nodes": [
                {"name": n.name, "address": n.address, "memory_bytes": n.memory_bytes,
                 "threads": n.threads, "speed": n.speed,
                 "quantize": n.quantize.value if n.quantize else None}
                for n in cluster.nodes
            ],
            "default_link": _link(cluster.default_link) if cluster.default_link else None,
            "links": [{"from": a, "to": b, **_link(link)}
                      for (a, b), link in cluster.links.items()],
            "source": cluster.source,
            "sink": cluster.sink,
        },
        "profiles": {name: profile.to_dict() for name, profile in profiles.items()},
    }


def read_replan_inputs(data: dict[str, Any]) -> tuple[ClusterSpec, dict[str, Profile]]:
    """The cluster spec and profiles :func:`replan_inputs` wrote.

    Raises
    ------
    PlanFormatError
        If the data is malformed or of another version.
    """
    try:
        if data["version"] != VERSION:
            raise ValueError(f"version {data['version']!r}, expected {VERSION}")
        cluster = data["cluster"]
        default = cluster["default_link"]
        spec = ClusterSpec(
            nodes=tuple(
                NodeSpec(n["name"], n["address"], int(n["memory_bytes"]), n["threads"],
                         n["speed"], WeightFormat(n["quantize"]) if n.get("quantize") else None)
                for n in cluster["nodes"]
            ),
            default_link=LinkSpec(default["bytes_per_s"], default["latency_s"]) if default
            else None,
            links={(x["from"], x["to"]): LinkSpec(x["bytes_per_s"], x["latency_s"])
                   for x in cluster["links"]},
            source=cluster["source"],
            sink=cluster["sink"],
        )
        profiles = {name: Profile.from_dict(p, f"plan.json replan.profiles.{name}")
                    for name, p in data["profiles"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise PlanFormatError(
            f"plan.json: replan is malformed ({err!r}); plan again to re-plan after failures"
        ) from err
    return spec, profiles


def _link(link: LinkSpec) -> dict[str, float]:
    return {"bytes_per_s": link.bytes_per_s, "latency_s": link.latency_s}

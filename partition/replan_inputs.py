"""What re-planning needs, carried in ``plan.json``: the cluster spec (its shared media
included), each node's profile, whether stages may be replicated and, for a compressed plan,
what the planner was asked to
compress.

Plain JSON data, written by :func:`replan_inputs` when a plan is made and read back by
:func:`read_replan_inputs` when a node is lost, so a running pipeline re-plans with the
same inputs as the first plan (its compression choices included) and no extra files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from partition.cluster import ClusterSpec, LinkSpec, MediumSpec, NodeSpec
from partition.compression_choice import Inputs, weight_offer
from partition.compression_planning import CompressionRequest, CompressMode
from partition.errors import PlanFormatError
from partition.layers import LayerGraph
from partition.profiler import Profile
from partition.quantize import WeightFormat

VERSION = 1


@dataclass(frozen=True)
class CompressionSettings:
    """A compressed plan's request without its calibration inputs: the mode, the budget,
    where the inputs came from (a file, else ``calibration_count`` random ones) and, when
    weight formats were offered, each format's ``(N, L)`` layer seconds on the nodes."""

    mode: CompressMode
    max_error: float
    budget_units: int
    calibration_file: str | None
    calibration_count: int
    weight_seconds: dict[WeightFormat, np.ndarray]

    def request(self, layer_graph: LayerGraph, inputs: list[Inputs]) -> CompressionRequest:
        """The request again, on ``inputs`` (read from :attr:`calibration_file` or made)."""
        return CompressionRequest(
            self.mode, tuple(inputs), self.max_error, self.budget_units,
            weight_offer(layer_graph, self.weight_seconds) if self.weight_seconds else None,
            self.calibration_file,
        )


@dataclass(frozen=True)
class ReplanInputs:
    """What :func:`read_replan_inputs` reads back."""

    cluster: ClusterSpec
    profiles: dict[str, Profile]
    compression: CompressionSettings | None
    replicate: bool = True


def replan_inputs(
    cluster: ClusterSpec, profiles: dict[str, Profile],
    compression: CompressionRequest | None = None, replicate: bool = True,
) -> dict[str, Any]:
    """``cluster``, ``profiles`` (one per node), ``compression`` and whether stages may be
    replicated as JSON data."""
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
            "media": [{"name": m.name, "bytes_per_s": m.bytes_per_s, "nodes": list(m.nodes)}
                      for m in cluster.media],
        },
        "profiles": {name: profile.to_dict() for name, profile in profiles.items()},
        **({"compression": _compression(compression, cluster)} if compression else {}),
        **({} if replicate else {"replicate": False}),
    }


def read_replan_inputs(data: dict[str, Any]) -> ReplanInputs:
    """What :func:`replan_inputs` wrote.

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
            media=tuple(MediumSpec(m["name"], float(m["bytes_per_s"]), tuple(m["nodes"]))
                        for m in cluster.get("media", ())),
        )
        profiles = {name: Profile.from_dict(p, f"plan.json replan.profiles.{name}")
                    for name, p in data["profiles"].items()}
        compression = data.get("compression")
        settings = _read_compression(compression, spec) if compression is not None else None
    except (KeyError, TypeError, ValueError) as err:
        raise PlanFormatError(
            f"plan.json: replan is malformed ({err!r}); plan again to re-plan after failures"
        ) from err
    return ReplanInputs(spec, profiles, settings, bool(data.get("replicate", True)))


def _compression(request: CompressionRequest, cluster: ClusterSpec) -> dict[str, Any]:
    offer = request.weights
    return {
        "mode": request.mode.value,
        "max_error": request.max_error,
        "budget_units": request.budget_units,
        "calibration": {"file": request.calibration_file, "count": len(request.inputs)},
        "weights": {} if offer is None else {
            fmt.value: dict(zip(cluster.names, seconds.tolist(), strict=True))
            for fmt, seconds in zip(offer.formats, offer.layer_seconds, strict=True)
        },
    }


def _read_compression(data: dict[str, Any], cluster: ClusterSpec) -> CompressionSettings:
    calibration = data["calibration"]
    return CompressionSettings(
        CompressMode(data["mode"]), float(data["max_error"]), int(data["budget_units"]),
        calibration["file"], int(calibration["count"]),
        {WeightFormat(fmt): np.array([by_node[name] for name in cluster.names], dtype=float)
         for fmt, by_node in data["weights"].items()},
    )


def _link(link: LinkSpec) -> dict[str, float]:
    return {"bytes_per_s": link.bytes_per_s, "latency_s": link.latency_s}

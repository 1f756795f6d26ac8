"""Build a :class:`~partition.costs.CostModel` from a layer graph, profiles and a cluster."""

from __future__ import annotations

import numpy as np

from partition.cluster import ClusterSpec, cost_arrays
from partition.costs import CostModel
from partition.layers import LayerGraph
from partition.profiler import Profile
from partition.weights import program_weights


def node_profiles(
    cluster: ClusterSpec, local: Profile, measured: dict[str, Profile]
) -> dict[str, Profile]:
    """Each node's profile: measured on the node (or given as a file), else this machine's
    profile divided by the node's relative ``speed`` (1.0 when unset)."""
    return {
        node.name: measured.get(node.name) or local.scaled(node.speed or 1.0)
        for node in cluster.nodes
    }


def stage_memory_matrix(layer_graph: LayerGraph) -> np.ndarray:
    """``[i, j]``: memory of a stage of layers ``[i, j)``: its parameters (a tensor shared by
    two layers counted once per stage), its largest layer's peak activations, and the frames
    it receives and sends."""
    sizes = {name: t.nbytes for name, t in program_weights(layer_graph.program).items()}
    boundary = layer_graph.boundary_bytes()
    count = layer_graph.num_layers
    memory = np.zeros((count + 1, count + 1), dtype=np.int64)
    for start in range(count):
        params: set[str] = set()
        param_bytes = peak = 0
        for end in range(start + 1, count + 1):
            layer = layer_graph.layers[end - 1]
            for name in layer.params:
                if name not in params:
                    params.add(name)
                    param_bytes += sizes[name]
            peak = max(peak, layer.peak_activation_bytes)
            memory[start, end] = param_bytes + peak + boundary[start] + boundary[end]
    return memory


def build_cost_model(
    layer_graph: LayerGraph, cluster: ClusterSpec, profiles: dict[str, Profile]
) -> CostModel:
    """Price every layer on every node of ``cluster`` with ``profiles`` (one per node)."""
    arrays = cost_arrays(cluster)
    seconds = np.array(
        [[layer.median_s for layer in profiles[name].layers] for name in arrays.node_names]
    )
    return CostModel(
        node_names=arrays.node_names,
        layer_seconds=seconds,
        boundary_bytes=layer_graph.boundary_bytes(),
        stage_memory_bytes=stage_memory_matrix(layer_graph),
        node_memory_bytes=arrays.node_memory_bytes,
        link_bytes_per_s=arrays.link_bytes_per_s,
        link_latency_s=arrays.link_latency_s,
        source=arrays.source,
        sink=arrays.sink,
        layer_param_bytes=np.array([layer.param_bytes for layer in layer_graph.layers]),
    )

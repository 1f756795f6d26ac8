"""Build a :class:`~partition.costs.CostModel` from a layer graph, profiles and a cluster."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from partition.cluster import ClusterSpec, cost_arrays
from partition.costs import CostModel
from partition.layers import LayerGraph
from partition.media import Media
from partition.profiler import Profile
from partition.quantize import WeightFormat, dequantized_bytes, weight_bytes
from partition.queues import held_frames_bytes

STAGE_RUNTIME_BYTES = 32 * 1024**2
"""Resident memory a worker adds for any stage besides its weights, activations, frames and
program graph: the loader's and the first run's set-up (kernels, allocator arenas, which vary
from run to run by several MiB)."""

PROGRAM_BYTES_PER_OP = 56 * 1024
"""Resident memory of a loaded stage program per op of its graph (the fx nodes and their
metadata). With :data:`STAGE_RUNTIME_BYTES` it bounds what a worker added for each sample
model's whole-model stage at full queues: resnet 23-25 MiB, gpt2 25-26, mobilenet_v2 41-48,
skip_dag 9 (tests/cluster/test_stage_memory.py, four runs; x86-64 Linux, torch 2.13.0+cpu,
one thread, on a busy machine)."""


def node_profiles(
    cluster: ClusterSpec, local: Profile, measured: dict[str, Profile],
    quantized: Mapping[WeightFormat, Profile] | None = None,
) -> dict[str, Profile]:
    """Each node's profile: measured on the node (or given as a file), else this machine's
    profile divided by the node's relative ``speed`` (1.0 when unset); this machine's profile
    in the node's ``quantize`` format when ``quantized`` holds one."""
    quantized = quantized or {}
    return {
        node.name: measured.get(node.name)
        or quantized.get(node.quantize, local).scaled(node.speed or 1.0)
        for node in cluster.nodes
    }


def stage_memory_matrix(
    layer_graph: LayerGraph, fmt: WeightFormat = WeightFormat.NONE
) -> np.ndarray:
    """``[i, j]``: memory of a stage of layers ``[i, j)`` with its weights in ``fmt``: its
    parameters (a tensor shared by two layers counted once per stage), its largest layer's
    peak activations plus the float weight it rebuilds, and the frames its node's queues may
    hold in and out (:func:`partition.queues.held_frames_bytes`), plus what loading and
    running any program costs the worker (:data:`STAGE_RUNTIME_BYTES`,
    :data:`PROGRAM_BYTES_PER_OP` per op)."""
    sizes = weight_bytes(layer_graph, fmt)
    rebuilt = dequantized_bytes(layer_graph, fmt)
    boundary = layer_graph.boundary_bytes()
    count = layer_graph.num_layers
    memory = np.zeros((count + 1, count + 1), dtype=np.int64)
    for start in range(count):
        params: set[str] = set()
        param_bytes = peak = ops = 0
        for end in range(start + 1, count + 1):
            layer = layer_graph.layers[end - 1]
            for name in layer.params:
                if name not in params:
                    params.add(name)
                    param_bytes += sizes[name]
            peak = max(peak, layer.peak_activation_bytes + int(rebuilt[end - 1]))
            ops += len(layer.ops)
            frames = held_frames_bytes(int(boundary[start]), int(boundary[end]),
                                       last=end == count)
            program = STAGE_RUNTIME_BYTES + PROGRAM_BYTES_PER_OP * ops
            memory[start, end] = param_bytes + peak + frames + program
    return memory


def node_stage_memory(layer_graph: LayerGraph, cluster: ClusterSpec) -> np.ndarray:
    """Stage memory for the cost model: :func:`stage_memory_matrix` when every node keeps
    float weights, else ``(N, L+1, L+1)``, each node's with its own ``quantize`` format."""
    formats = [node.quantize or WeightFormat.NONE for node in cluster.nodes]
    if set(formats) == {WeightFormat.NONE}:
        return stage_memory_matrix(layer_graph)
    by_format = {fmt: stage_memory_matrix(layer_graph, fmt) for fmt in set(formats)}
    return np.stack([by_format[fmt] for fmt in formats])


def layer_seconds(cluster: ClusterSpec, profiles: Mapping[str, Profile]) -> np.ndarray:
    """``(N, L)``: each layer's median time on each node of ``cluster``, from its profile."""
    return np.array([[layer.median_s for layer in profiles[name].layers]
                     for name in cluster.names])


def build_cost_model(
    layer_graph: LayerGraph, cluster: ClusterSpec, profiles: dict[str, Profile]
) -> CostModel:
    """Price every layer on every node of ``cluster`` with ``profiles`` (one per node)."""
    arrays = cost_arrays(cluster)
    return CostModel(
        node_names=arrays.node_names,
        layer_seconds=layer_seconds(cluster, profiles),
        boundary_bytes=layer_graph.boundary_bytes(),
        stage_memory_bytes=node_stage_memory(layer_graph, cluster),
        node_memory_bytes=arrays.node_memory_bytes,
        link_bytes_per_s=arrays.link_bytes_per_s,
        link_latency_s=arrays.link_latency_s,
        source=arrays.source,
        sink=arrays.sink,
        layer_param_bytes=np.array([layer.param_bytes for layer in layer_graph.layers]),
        media=Media.of(cluster),
    )

"""The cost model the optimizer searches over: plain arrays, no torch, no I/O.

Layers are numbered ``0..L-1`` in one fixed topological order; boundary ``b`` is the cut
between layer ``b-1`` and layer ``b`` (boundary 0 is the model's input, boundary ``L`` its
output). A *stage* is a half-open layer range ``[start, end)`` on one node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Everything the optimizer needs to price a plan.

    Attributes
    ----------
    node_names : names of the cluster's nodes, index ``d`` is used everywhere below.
    layer_seconds : ``(N, L)`` compute time of layer ``l`` on node ``d``, in seconds.
    boundary_bytes : ``(L+1,)`` bytes that cross boundary ``b`` (every live tensor).
    stage_memory_bytes : ``(L+1, L+1)``; entry ``[i, j]`` (``i < j``) is the memory a stage
        of layers ``[i, j)`` needs: its parameters (shared ones counted once) plus its
        peak activations and its input and output frames. ``(N, L+1, L+1)`` when it
        differs by node (nodes that store weights quantized).
    node_memory_bytes : ``(N,)`` memory available on each node.
    link_bytes_per_s : ``(N, N)`` bandwidth from node ``a`` to node ``b``.
    link_latency_s : ``(N, N)`` one-way latency from ``a`` to ``b``.
    source, sink : indices of the nodes where inputs originate and results are needed.
    layer_param_bytes : optional ``(L,)`` parameter bytes of each layer (for the baselines).
    """

    node_names: tuple[str, ...]
    layer_seconds: np.ndarray
    boundary_bytes: np.ndarray
    stage_memory_bytes: np.ndarray
    node_memory_bytes: np.ndarray
    link_bytes_per_s: np.ndarray
    link_latency_s: np.ndarray
    source: int
    sink: int
    layer_param_bytes: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.layer_seconds.shape[1]

    @property
    def num_nodes(self) -> int:
        return self.layer_seconds.shape[0]

    def transfer_seconds(self, boundary: int, src: int, dst: int) -> float:
        """Time to move boundary ``boundary``'s tensors from ``src`` to ``dst`` (0 if same)."""
        if src == dst:
            return 0.0
        nbytes = float(self.boundary_bytes[boundary])
        bandwidth = float(self.link_bytes_per_s[src, dst])
        return nbytes / bandwidth + float(self.link_latency_s[src, dst])

    def stage_seconds(self, node: int, start: int, end: int) -> float:
        """Compute time of layers ``[start, end)`` on ``node``."""
        return float(self.layer_seconds[node, start:end].sum())

    def node_stage_memory(self) -> np.ndarray:
        """``(N, L+1, L+1)``: the memory of each stage on each node."""
        memory = np.asarray(self.stage_memory_bytes)
        if memory.ndim == 3:
            return memory
        return np.broadcast_to(memory, (self.num_nodes, *memory.shape))

    def stage_memory(self, node: int, start: int, end: int) -> int:
        """Memory of a stage of layers ``[start, end)`` on ``node``."""
        return int(self.node_stage_memory()[node, start, end])

    def stage_fits(self, node: int, start: int, end: int) -> bool:
        return self.stage_memory(node, start, end) <= int(self.node_memory_bytes[node])

"""The cost model the optimizer searches over: plain arrays, no torch, no I/O.

Layers are numbered ``0..L-1`` in one fixed topological order; boundary ``b`` is the cut
between layer ``b-1`` and layer ``b`` (boundary 0 is the model's input, boundary ``L`` its
output). A *stage* is a half-open layer range ``[start, end)`` on one node.

Compression is optional: :class:`LinkChoices` offers encodings at each boundary and
:class:`WeightChoices` weight formats for each stage, each with the output error it causes
alone; :class:`Compression` bundles them with the error budget (see
:mod:`partition.choice_tables` for how the search treats them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from partition.media import Media


@dataclass(frozen=True)
class LinkChoices:
    """Encodings offered at every boundary besides raw (raw is option 0 of a schedule's
    ``encodings``, these are options ``1..E``).

    Attributes
    ----------
    names : each encoding's name, as :class:`partition.plan.LinkEncoding` spells it.
    nbytes : ``(L+1, E)`` bytes boundary ``b`` takes on a link in encoding ``e``
        (``inf``: not offered at that boundary).
    encode_s, decode_s : ``(L+1, E)`` seconds to encode (on the sender) and decode (on the
        receiver) boundary ``b``'s tensors.
    error : ``(L+1, E)`` end-to-end output error of encoding only boundary ``b``.
    raw : whether raw may cross a link between two nodes (where a stage stays on the node
        that holds its input or must deliver its output, no link is used and raw always is).
    """

    names: tuple[str, ...]
    nbytes: np.ndarray
    encode_s: np.ndarray
    decode_s: np.ndarray
    error: np.ndarray
    raw: bool = True


@dataclass(frozen=True)
class WeightChoices:
    """Weight formats offered for every stage besides full precision (option 0 of a
    schedule's ``formats``; these are options ``1..W``).

    Attributes
    ----------
    names : each format's name.
    layer_seconds : ``(W, N, L)`` compute time of layer ``l`` on node ``d`` in format ``w``.
    stage_memory_bytes : ``(W, L+1, L+1)`` memory of a stage ``[i, j)`` in format ``w``.
    layer_error : ``(W, L)`` end-to-end output error of quantizing only layer ``l``.
    """

    names: tuple[str, ...]
    layer_seconds: np.ndarray
    stage_memory_bytes: np.ndarray
    layer_error: np.ndarray


@dataclass(frozen=True)
class Compression:
    """What the optimizer may compress, and the budget on the sum of the errors chosen.

    ``budget_units``: the budget is split into this many equal units and each option costs
    its error rounded up to whole units, so every admitted plan's summed error is within
    ``max_error``.
    """

    links: LinkChoices | None = None
    weights: WeightChoices | None = None
    max_error: float = float("inf")
    budget_units: int = 16


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
        peak activations and the frames its node's queues may hold in and out.
        ``(N, L+1, L+1)`` when it differs by node (nodes that store weights quantized).
    node_memory_bytes : ``(N,)`` memory each node has for its stage (its worker's own
        resident memory already taken off: :func:`partition.cluster.memory_for_stages`).
    link_bytes_per_s : ``(N, N)`` bandwidth from node ``a`` to node ``b``.
    link_latency_s : ``(N, N)`` one-way latency from ``a`` to ``b``.
    source, sink : indices of the nodes where inputs originate and results are needed.
    layer_param_bytes : optional ``(L,)`` parameter bytes of each layer (for the baselines).
    compression : optional encodings and weight formats the optimizer may choose, and the
        error budget; without it every link is raw and every weight full precision.
    media : optional shared media (:mod:`partition.media`); each is one resource for every
        transfer on it.
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
    compression: Compression | None = None
    media: Media | None = None

    @property
    def num_layers(self) -> int:
        return self.layer_seconds.shape[1]

    @property
    def num_nodes(self) -> int:
        return self.layer_seconds.shape[0]

    def node_stage_memory(self) -> np.ndarray:
        """``(N, L+1, L+1)``: the memory of each stage on each node."""
        memory = np.asarray(self.stage_memory_bytes)
        if memory.ndim == 3:
            return memory
        return np.broadcast_to(memory, (self.num_nodes, *memory.shape))

"""Weight quantization per stage: store a stage's large weights as int8 or packed int4.

Which path, and why: torchao's ``quantize_`` (0.18, torch 2.13 CPU) is not used. Its int8
weight-only stage exports with ``Int8Tensor`` weights that ``torch.export.save`` writes as
pickles (``use_pickle: true``) and a non-ATen op (``export.access_subclass_inner_tensor``),
so our archive reader refuses it, rightly: loading it would unpickle torchao's classes. Its
int4 weight-only configs need the CUDA ``mslk`` kernels or bfloat16 on this CPU build. And
``quantize_`` looks for ``nn.Linear`` modules, while a stage is an ATen graph (``linear``,
``conv2d``, GPT-2's ``addmm``).

So every format takes our own graph pass: on the stage's ``fx.GraphModule``, each eligible
float weight becomes int8 (or two int4 values per uint8) buffers plus float32 scales, and
plain ATen ops that rebuild the float weight are inserted just before its first use (an
embedding table instead looks up the quantized rows and rebuilds only those). The exported
stage is an ordinary archive of allowlisted ATen ops and raw tensors, loaded by
:func:`partition.archive.load_archive` like any other; the worker needs nothing new.

- ``int8``: symmetric, one scale per output channel: ``Δ = max|W| / 127``,
  ``W ≈ round(W / Δ) · Δ``.
- ``int4``: affine min/max in groups of :data:`INT4_GROUP` along the input dimension:
  ``Δ = (max − min) / 15``, ``W ≈ round((W − min) / Δ) · Δ + min``; two values per byte.

Eligible weights are floating tensors of two or more dimensions that every use takes as
the weight of ``linear``, a convolution (``conv1d/2d/3d``, ``convolution``), ``addmm``,
``mm`` or ``matmul`` (the second matrix, as GPT-2's ``Conv1D``), or the table of
``embedding``. Biases, norms and anything used otherwise stay float32. A stage keeps one
rebuilt float weight alive at a time (fx frees it after its last use).
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch
from torch import fx

from partition.layers import LayerGraph
from partition.modules import RangeModule, build_range_module
from partition.weights import program_weights, weight_inputs

INT4_GROUP = 32
"""int4 values that share one scale and minimum, along a weight's input dimension."""


class WeightUse(enum.Enum):
    """How a stage uses a weight it can store quantized."""

    OUT_FIRST = "out_first"
    """``(out, in, ...)``, the weight of ``linear`` or a convolution: rebuilt before use."""
    IN_FIRST = "in_first"
    """``(in, out)``, the second matrix of ``addmm``, ``mm``, ``matmul``: rebuilt before use."""
    TABLE = "table"
    """``(rows, dim)``, the table of ``embedding``: only the rows looked up are rebuilt."""


_aten = torch.ops.aten
_WEIGHT_USES: dict[tuple[object, int], WeightUse] = {  # (op, argument position) -> use
    (_aten.linear.default, 1): WeightUse.OUT_FIRST,
    (_aten.conv1d.default, 1): WeightUse.OUT_FIRST,
    (_aten.conv2d.default, 1): WeightUse.OUT_FIRST,
    (_aten.conv3d.default, 1): WeightUse.OUT_FIRST,
    (_aten.embedding.default, 0): WeightUse.TABLE,
    (_aten.addmm.default, 2): WeightUse.IN_FIRST,
    (_aten.mm.default, 1): WeightUse.IN_FIRST,
    (_aten.matmul.default, 1): WeightUse.IN_FIRST,
}


class WeightFormat(enum.Enum):
    """How a stage stores its large weights (see the module docstring)."""

    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"

    def stored_bytes(self, tensor: torch.Tensor, use: WeightUse = WeightUse.OUT_FIRST) -> int:
        """Bytes ``tensor`` takes in this format, scales included (a float weight's own
        size for ``NONE``)."""
        if self is WeightFormat.NONE:
            return tensor.nbytes
        channels, width = _matrix_shape(tensor.shape, use)
        if self is WeightFormat.INT8:
            return channels * width + channels * 4
        groups = math.ceil(width / INT4_GROUP)
        return channels * groups * (INT4_GROUP // 2 + 8)


def quantize_module(module: fx.GraphModule, fmt: WeightFormat) -> fx.GraphModule:
    """A copy of ``module`` (a stage's range module) with its eligible weights in ``fmt``.

    The copy runs eagerly (to measure its error) and exports to plain ATen ops; ``module``
    is left as it was. ``NONE`` returns ``module`` itself.
    """
    if fmt is WeightFormat.NONE:
        return module
    root = torch.nn.Module()
    for name, tensor in module.named_buffers():
        root.register_buffer(name, tensor)
    for name, param in module.named_parameters():
        root.register_parameter(name, param)
    graph = fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        tensor = getattr(module, node.target)
        use = eligible_use(node, tensor)
        if use is None:
            continue
        buffers = _quantize(tensor.detach(), fmt, use)
        delattr(root, node.target)
        for k, buffer in enumerate(buffers):
            root.register_buffer(f"{node.target}_q{k}", buffer)
        width = _matrix_shape(tensor.shape, use)[1]
        extra = (width,) if fmt is WeightFormat.INT4 else ()
        users = list(node.users) if use is WeightUse.TABLE else [
            min(node.users, key=_position(graph))
        ]
        for user in users:
            with graph.inserting_before(user):
                stored = [graph.get_attr(f"{node.target}_q{k}") for k in range(len(buffers))]
                if use is WeightUse.TABLE:
                    rows = graph.call_function(_LOOKUP[fmt], (*stored, user.args[1], *extra))
                    user.replace_all_uses_with(rows)
                    graph.erase_node(user)
                else:
                    rebuilt = graph.call_function(
                        _REBUILD[fmt], (*stored, tuple(tensor.shape), use is WeightUse.IN_FIRST)
                    )
                    node.replace_all_uses_with(rebuilt)
        graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(root, graph)


def quantized_range_module(
    layer_graph: LayerGraph, start: int, end: int, fmt: WeightFormat
) -> RangeModule:
    """Layers ``[start, end)`` with their weights in ``fmt``, runnable on named tensors.

    For measuring error: call the result on the same ``env`` as
    :func:`partition.modules.build_range_module`'s module and compare the outputs.
    """
    ranged = build_range_module(layer_graph, start, end)
    return RangeModule(quantize_module(ranged.module, fmt), start, end, ranged.inputs,
                       ranged.outputs)


def quantized_weights(program: torch.export.ExportedProgram) -> dict[str, WeightUse]:
    """The target names of ``program``'s weights a quantized format stores quantized, and
    how each is used."""
    tensors = program_weights(program)
    targets = weight_inputs(program)
    found = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in targets:
            use = eligible_use(node, tensors[targets[node.name]])
            if use is not None:
                found[targets[node.name]] = use
    return found


def weight_bytes(layer_graph: LayerGraph, fmt: WeightFormat) -> dict[str, int]:
    """Each weight of the layer graph's program by target name, and its bytes in ``fmt``
    (a weight that stays float keeps its float size)."""
    tensors = program_weights(layer_graph.program)
    sizes = {name: tensor.nbytes for name, tensor in tensors.items()}
    if fmt is not WeightFormat.NONE:
        for name, use in quantized_weights(layer_graph.program).items():
            sizes[name] = fmt.stored_bytes(tensors[name], use)
    return sizes


def layer_param_bytes(layer_graph: LayerGraph, fmt: WeightFormat) -> np.ndarray:
    """``(L,)`` parameter bytes of each layer with its weights in ``fmt`` (a weight shared
    by two layers counted in each)."""
    sizes = weight_bytes(layer_graph, fmt)
    return np.array([sum(sizes[name] for name in layer.params) for layer in layer_graph.layers],
                    dtype=np.int64)


def dequantized_bytes(layer_graph: LayerGraph, fmt: WeightFormat) -> np.ndarray:
    """``(L,)`` the largest float weight each layer rebuilds while it runs in ``fmt`` (0 for
    ``NONE``): memory a quantized stage needs on top of its activations."""
    if fmt is WeightFormat.NONE:
        return np.zeros(layer_graph.num_layers, dtype=np.int64)
    tensors = program_weights(layer_graph.program)
    rebuilt = {name for name, use in quantized_weights(layer_graph.program).items()
               if use is not WeightUse.TABLE}
    return np.array(
        [max((tensors[name].nbytes for name in layer.params if name in rebuilt), default=0)
         for layer in layer_graph.layers], dtype=np.int64,
    )


def eligible_use(node: fx.Node, tensor: torch.Tensor) -> WeightUse | None:
    """How every use of the weight ``node`` takes it, if all take it the same quantizable
    way; else ``None``."""
    if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and tensor.dim() >= 2 and node.users):
        return None
    uses = set()
    for user in node.users:
        positions = [k for k, arg in enumerate(user.args) if arg is node]
        if len(positions) != 1 or node in user.kwargs.values():
            return None
        use = _WEIGHT_USES.get((user.target, positions[0]))
        if use is None or (use is not WeightUse.OUT_FIRST and tensor.dim() != 2):
            return None
        uses.add(use)
    return uses.pop() if len(uses) == 1 else None


def _matrix_shape(shape: torch.Size, use: WeightUse) -> tuple[int, int]:
    """(channels, values per channel) of a weight of ``shape``: each channel one scale."""
    if use is WeightUse.IN_FIRST:
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def _quantize(weight: torch.Tensor, fmt: WeightFormat, use: WeightUse) -> tuple[torch.Tensor, ...]:
    """The buffers that store ``weight`` in ``fmt``, one row per channel."""
    matrix = weight.t() if use is WeightUse.IN_FIRST else weight.reshape(weight.shape[0], -1)
    matrix = matrix.float().contiguous()  # so are the buffers (a transposed one saves badly)
    if fmt is WeightFormat.INT8:
        scale = (matrix.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        return torch.round(matrix / scale).clamp(-127, 127).to(torch.int8), scale
    channels, width = matrix.shape
    groups = math.ceil(width / INT4_GROUP)
    padded = torch.nn.functional.pad(matrix, (0, groups * INT4_GROUP - width))
    grouped = padded.reshape(channels, groups, INT4_GROUP)
    low = grouped.amin(dim=2, keepdim=True)
    scale = ((grouped.amax(dim=2, keepdim=True) - low) / 15).clamp(min=1e-12)
    q = torch.round((grouped - low) / scale).clamp(0, 15).to(torch.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed.reshape(channels, -1), scale.reshape(channels, -1), low.reshape(channels, -1)


def _int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float rows ``(..., width)`` of int8 rows and their ``(..., 1)`` scales."""
    return q.to(torch.float32) * scale


def _int4_rows(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, width: int
) -> torch.Tensor:
    """Float rows ``(..., width)`` of packed int4 rows ``(..., groups * 16)`` and their
    ``(..., groups)`` scales and minimums."""
    values = torch.stack(
        (torch.bitwise_and(packed, 15), torch.bitwise_right_shift(packed, 4)), dim=-1
    ).reshape(*packed.shape[:-1], -1, INT4_GROUP)
    rows = torch.addcmul(low.unsqueeze(-1), values.to(torch.float32), scale.unsqueeze(-1))
    rows = rows.flatten(-2)
    return rows[..., :width] if width < rows.shape[-1] else rows  # the last group was padded


def _restore(rows: torch.Tensor, shape: tuple[int, ...], in_first: bool) -> torch.Tensor:
    return rows.t() if in_first else rows.reshape(shape)


def rebuild_int8(
    q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], in_first: bool
) -> torch.Tensor:
    """The float32 weight of an int8 one (traced into the stage as ATen ops)."""
    return _restore(_int8_rows(q, scale), shape, in_first)


def rebuild_int4(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, shape: tuple[int, ...],
    in_first: bool,
) -> torch.Tensor:
    """The float32 weight of a packed int4 one (traced into the stage as ATen ops)."""
    width = shape[0] if in_first else math.prod(shape[1:])
    return _restore(_int4_rows(packed, scale, low, width), shape, in_first)


def lookup_int8(q: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``embedding(ids)`` of an int8 table: the rows looked up, then rebuilt."""
    return _int8_rows(torch.nn.functional.embedding(ids, q),
                      torch.nn.functional.embedding(ids, scale))


def lookup_int4(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, ids: torch.Tensor, width: int
) -> torch.Tensor:
    """``embedding(ids)`` of a packed int4 table: the rows looked up, then rebuilt."""
    embed = torch.nn.functional.embedding
    return _int4_rows(embed(ids, packed), embed(ids, scale), embed(ids, low), width)


_REBUILD = {WeightFormat.INT8: rebuild_int8, WeightFormat.INT4: rebuild_int4}
_LOOKUP = {WeightFormat.INT8: lookup_int8, WeightFormat.INT4: lookup_int4}


def _position(graph: fx.Graph):
    order = {node: k for k, node in enumerate(graph.nodes)}
    return order.__getitem__

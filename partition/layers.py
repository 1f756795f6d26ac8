"""Group an exported ATen graph into layers and describe what crosses each layer boundary.

A *layer* is a run of consecutive ops (in the program's topological order) that belong to one
module at the chosen depth of ``nn_module_stack``. The layers are then numbered in the
topological order of the layer DAG that :mod:`partition.layer_order` chooses (few bytes live
at its boundaries), so layer ``k`` only reads values made by layers ``< k`` or by the model's
inputs, and the boundaries between layers are the candidate split points.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import fx

from partition.errors import ModelLoadError
from partition.layer_order import choose_order
from partition.spec import TensorSpec
from partition.value_flow import INPUT, ValueFlow
from partition.weights import program_weights, weight_inputs

AUTO = "auto"
MARKERS = "markers"  # one layer per span between pipe_split() markers
# A layer heavier than this share of the model's estimated work is refined one module deeper.
AUTO_MAX_SHARE = 1 / 12


@dataclass(frozen=True)
class Layer:
    """One layer: its module path, its ops (fx node names) and its weight in bytes."""

    index: int
    name: str
    ops: tuple[str, ...]
    params: tuple[str, ...]
    param_bytes: int
    output_bytes: int
    peak_activation_bytes: int


@dataclass
class LayerGraph:
    """The model as layers in one topological order (chosen by :mod:`partition.layer_order`),
    with every tensor between them.

    ``graph`` is an ``nx.DiGraph`` whose nodes are layer indices (attributes: ``name``,
    ``ops``, ``param_bytes``, ``output_bytes``) and whose edges carry ``tensors``: the
    :class:`TensorSpec` of each value made by one layer and read by the other. The model's
    inputs come from node ``"input"`` and its outputs go to node ``"output"``.
    """

    program: torch.export.ExportedProgram
    granularity: str
    layers: list[Layer]
    graph: nx.DiGraph
    values: dict[str, TensorSpec]
    producer: dict[str, int]
    last_use: dict[str, int]
    user_inputs: tuple[str, ...]
    user_outputs: tuple[str, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def boundary_tensors(self, boundary: int) -> tuple[TensorSpec, ...]:
        """Every tensor made before ``boundary`` and used at or after it (outputs included)."""
        return tuple(
            spec
            for name, spec in self.values.items()
            if self.producer[name] < boundary <= self.last_use[name]
        )

    def boundary_bytes(self) -> np.ndarray:
        """Bytes crossing each boundary ``0..L``."""
        return np.array(
            [sum(t.nbytes for t in self.boundary_tensors(b)) for b in range(self.num_layers + 1)],
            dtype=np.int64,
        )

    def value_flow(self) -> ValueFlow:
        """The tensors between the layers, by layer index (for the min-cut baseline)."""
        return ValueFlow.of(self.num_layers, self.values, self.producer,
                            self.graph.edges(data="tensors"))

    def fingerprint(self) -> str:
        """Names and op counts of the layers in order: two graphs with equal fingerprints split
        alike (a layer's name does not depend on the order, so this identifies the order)."""
        return ";".join(f"{layer.name}:{len(layer.ops)}" for layer in self.layers)


def build_layer_graph(
    program: torch.export.ExportedProgram, granularity: str | int = AUTO
) -> LayerGraph:
    """Group ``program``'s ops into layers.

    ``granularity`` is ``"auto"`` (start at the model's top-level modules and refine any
    layer heavier than ``AUTO_MAX_SHARE`` of the estimated work one module level deeper), a
    fixed depth in ``nn_module_stack`` (1 = the model's direct children), or ``"markers"``
    (one layer per span between ``pipe_split()`` markers, so only they are split points).
    A ``pipe_split()`` marker always ends a layer.
    """
    ops = [n for n in program.graph.nodes if n.op == "call_function"]
    if not ops:
        raise ModelLoadError("the exported program has no operations to split")
    stacks = {n.name: _module_path_stack(n) for n in ops}
    work = {n.name: _estimated_work(n) for n in ops}
    if granularity in (AUTO, MARKERS):
        depths = _auto_depths(ops, stacks, work)
    else:
        depth = int(granularity)
        if depth < 1:
            raise ModelLoadError(f"--granularity must be 'auto' or a depth >= 1, got {depth}")
        depths = {n.name: depth for n in ops}
    keys = {n.name: _key(stacks[n.name], depths[n.name]) for n in ops}
    if granularity == MARKERS:
        keys = _marker_segments(ops)
    layer_of, resolved = _runs(ops, keys)
    names = _layer_names(ops, resolved, layer_of)
    if granularity != MARKERS and not any(_is_marker(n) for n in ops):
        layer_of, names = _reordered(program, ops, layer_of, names)
    return _assemble(program, str(granularity), ops, names, layer_of)


def _layer_names(
    ops: list[fx.Node], resolved: dict[str, str], layer_of: dict[str, int]
) -> list[str]:
    """Each layer's name, numbered in program order: ``key``, then ``key#2``, ``key#3``...

    A layer keeps its name whatever order the layers then run in, so the sequence of names
    identifies the order (profiles and plans compare it).
    """
    first: dict[int, str] = {}
    for n in ops:
        first.setdefault(layer_of[n.name], resolved[n.name])
    names: list[str] = []
    seen: dict[str, int] = defaultdict(int)
    for index in range(len(first)):
        key = first[index]
        seen[key] += 1
        names.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return names


def _reordered(
    program: torch.export.ExportedProgram,
    ops: list[fx.Node],
    layer_of: dict[str, int],
    names: list[str],
) -> tuple[dict[str, int], list[str]]:
    """Renumber the layers in the order :func:`partition.layer_order.choose_order` picks.

    Models with ``pipe_split()`` markers keep their program order: the markers say where.
    """
    flow = _dataflow(program, ops, layer_of)
    count = flow.output_layer
    order = choose_order(
        ValueFlow.of(count, flow.values, flow.producer,
                     ((s, t, specs) for (s, t), specs in flow.edges.items()))
    )
    position = {layer: k for k, layer in enumerate(order)}
    return {op: position[layer] for op, layer in layer_of.items()}, [names[k] for k in order]


def _module_path_stack(node: fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    return tuple(path for path, _ in stack.values() if path)


def _key(stack: tuple[str, ...], depth: int) -> str:
    return stack[min(depth, len(stack)) - 1] if stack else ""


def _auto_depths(
    ops: list[fx.Node], stacks: dict[str, tuple[str, ...]], work: dict[str, float]
) -> dict[str, int]:
    depths = {n.name: 1 for n in ops}
    limit = AUTO_MAX_SHARE * sum(work.values())
    while True:
        totals: dict[str, float] = defaultdict(float)
        for n in ops:
            totals[_key(stacks[n.name], depths[n.name])] += work[n.name]
        refined = False
        for n in ops:
            stack = stacks[n.name]
            if totals[_key(stack, depths[n.name])] > limit and depths[n.name] < len(stack):
                depths[n.name] += 1
                refined = True
        if not refined:
            return depths


def _runs(ops: list[fx.Node], keys: dict[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """Index and key of the layer of each op: maximal runs of equal keys in graph order.

    Ops of the root module (key ``""``) join the next keyed op's layer; ``getitem`` and other
    ops that only unpack a tuple join their producer's layer.
    """
    resolved: dict[str, str] = {}
    pending: list[str] = []
    for n in ops:
        if keys[n.name]:
            for name in pending:
                resolved[name] = keys[n.name]
            pending.clear()
            resolved[n.name] = keys[n.name]
        else:
            pending.append(n.name)
    for name in pending:
        resolved[name] = resolved.get(ops[-1].name) or "model"

    layer_of: dict[str, int] = {}
    current, index = None, -1
    for n in ops:
        producer = _unpacked_producer(n)
        if producer is not None and producer.name in layer_of:
            layer_of[n.name] = layer_of[producer.name]
            continue
        if resolved[n.name] != current:
            current, index = resolved[n.name], index + 1
        layer_of[n.name] = index
        if _is_marker(n):
            current = None
    return layer_of, resolved


def _is_marker(node: fx.Node) -> bool:
    return "pipe_split" in str(node.target)


def _marker_segments(ops: list[fx.Node]) -> dict[str, str]:
    if not any(_is_marker(n) for n in ops):
        raise ModelLoadError(
            "--split-at markers needs pipe_split() calls in the model's forward, and it has none"
        )
    keys, segment = {}, 0
    for n in ops:
        keys[n.name] = f"segment{segment}"
        segment += _is_marker(n)
    return keys


def _unpacked_producer(node: fx.Node) -> fx.Node | None:
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _assemble(
    program: torch.export.ExportedProgram,
    granularity: str,
    ops: list[fx.Node],
    names: list[str],
    layer_of: dict[str, int],
) -> LayerGraph:
    signature = program.graph_signature
    flow = _dataflow(program, ops, layer_of)
    layers = _layers(ops, names, layer_of, flow, program_weights(program))
    return LayerGraph(
        program=program,
        granularity=granularity,
        layers=layers,
        graph=_digraph(layers, flow.edges),
        values=flow.values,
        producer=flow.producer,
        last_use=flow.last_use,
        user_inputs=tuple(signature.user_inputs),
        user_outputs=tuple(signature.user_outputs),
    )


@dataclass
class _Dataflow:
    """Who makes and who last reads each value, the tensors on each edge, each layer's weights.

    Consumer ``output_layer`` stands for the model's outputs, "used" after the last layer.
    """

    weight_inputs: dict[str, str]
    producer: dict[str, int]
    output_layer: int
    values: dict[str, TensorSpec] = field(default_factory=dict)
    last_use: dict[str, int] = field(default_factory=dict)
    edges: defaultdict[tuple[object, object], list[TensorSpec]] = field(
        default_factory=lambda: defaultdict(list)
    )
    params_of: defaultdict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    def use(self, value: fx.Node, consumer: int) -> None:
        """Record that layer ``consumer`` reads ``value``."""
        if value.name in self.weight_inputs:
            self.params_of[consumer].add(self.weight_inputs[value.name])
            return
        origin = self.producer[value.name]
        if origin == consumer:
            return
        spec = self.values.setdefault(value.name, _tensor_spec(value))
        self.last_use[value.name] = max(self.last_use.get(value.name, consumer), consumer)
        source = "input" if origin == INPUT else origin
        target = "output" if consumer == self.output_layer else consumer
        if spec not in self.edges[(source, target)]:
            self.edges[(source, target)].append(spec)


def _dataflow(
    program: torch.export.ExportedProgram, ops: list[fx.Node], layer_of: dict[str, int]
) -> _Dataflow:
    signature = program.graph_signature
    producer = {name: INPUT for name in signature.user_inputs} | layer_of
    flow = _Dataflow(weight_inputs(program), producer, output_layer=max(layer_of.values()) + 1)
    by_name = {n.name: n for n in program.graph.nodes}
    for n in ops:
        for value in n.all_input_nodes:
            flow.use(value, layer_of[n.name])
    for name in signature.user_outputs:
        if name in by_name:
            flow.use(by_name[name], flow.output_layer)
    for name in signature.user_inputs:
        if name not in flow.values:  # an input no op reads still arrives as a tensor
            flow.values[name] = _tensor_spec(by_name[name])
            flow.last_use[name] = 0
    return flow


def _layers(
    ops: list[fx.Node],
    names: list[str],
    layer_of: dict[str, int],
    flow: _Dataflow,
    weights: dict[str, torch.Tensor],
) -> list[Layer]:
    grouped: dict[int, list[fx.Node]] = defaultdict(list)
    for n in ops:
        grouped[layer_of[n.name]].append(n)
    layers: list[Layer] = []
    for index in range(flow.output_layer):
        members = grouped[index]
        params = tuple(sorted(flow.params_of[index]))
        layers.append(
            Layer(
                index=index,
                name=names[index],
                ops=tuple(n.name for n in members),
                params=params,
                param_bytes=sum(weights[p].nbytes for p in params),
                output_bytes=sum(
                    v.nbytes for k, v in flow.values.items() if flow.producer[k] == index
                ),
                peak_activation_bytes=_peak_activation_bytes(members),
            )
        )
    return layers


def _digraph(
    layers: list[Layer], edges: dict[tuple[object, object], list[TensorSpec]]
) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node("input")
    for layer in layers:
        graph.add_node(
            layer.index,
            name=layer.name,
            ops=layer.ops,
            param_bytes=layer.param_bytes,
            output_bytes=layer.output_bytes,
        )
    graph.add_node("output")
    for (source, target), tensors in edges.items():
        graph.add_edge(source, target, tensors=tuple(tensors), bytes=sum(t.nbytes for t in tensors))
    return graph


def _tensor_spec(value: fx.Node) -> TensorSpec:
    meta = value.meta.get("val")
    if not isinstance(meta, torch.Tensor):
        raise ModelLoadError(
            f"value {value.name!r} crosses a layer boundary but is a {type(meta).__name__}, "
            "not a tensor; try another --granularity"
        )
    return TensorSpec.of(value.name, meta)


def _value_bytes(node: fx.Node) -> int:
    meta = node.meta.get("val")
    if isinstance(meta, torch.Tensor):
        return meta.nbytes
    if isinstance(meta, list | tuple):
        return sum(m.nbytes for m in meta if isinstance(m, torch.Tensor))
    return 0


def _peak_activation_bytes(members: list[fx.Node]) -> int:
    """Largest total of live values while the layer's ops run in order (static liveness)."""
    position = {n.name: i for i, n in enumerate(members)}
    free_after: dict[int, list[fx.Node]] = defaultdict(list)
    for n in members:
        uses = [position[u.name] for u in n.users if u.name in position]
        last = max(uses) if uses and len(uses) == len(n.users) else len(members)
        free_after[last].append(n)
    live = peak = 0
    for i, n in enumerate(members):
        live += _value_bytes(n)
        peak = max(peak, live)
        live -= sum(_value_bytes(done) for done in free_after[i])
    return peak


_MATMUL_OPS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm"}


def _estimated_work(node: fx.Node) -> float:
    """Rough FLOP count of one op, used only to choose the grouping depth."""
    out = _value_bytes(node) / 4 or 1.0
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if name in _MATMUL_OPS or name.startswith("conv") or "attention" in name:
        first = node.args[0] if node.args else None
        weight = node.args[1] if len(node.args) > 1 else None
        if isinstance(weight, fx.Node) and isinstance(weight.meta.get("val"), torch.Tensor):
            w = weight.meta["val"]
            if name.startswith("conv"):
                return 2.0 * out * (w.numel() / max(w.shape[0], 1))
            return 2.0 * out * w.shape[-1 if name != "linear" else 1]
        if isinstance(first, fx.Node) and isinstance(first.meta.get("val"), torch.Tensor):
            return 2.0 * out * first.meta["val"].shape[-1]
    return out

"""Build a runnable ``fx.GraphModule`` for any contiguous range of layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from partition.layers import LayerGraph
from partition.weights import program_weights, weight_inputs


@dataclass(frozen=True)
class RangeModule:
    """Layers ``[start, end)`` as one module: positional ``inputs`` in, ``outputs`` out.

    ``outputs`` are the values made in the range that are live at boundary ``end``.
    """

    module: fx.GraphModule
    start: int
    end: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    def __call__(self, env: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on the named tensors in ``env``; return the named outputs."""
        results = self.module.forward(*[env[name] for name in self.inputs])
        return dict(zip(self.outputs, results, strict=True))


def build_range_module(layer_graph: LayerGraph, start: int, end: int) -> RangeModule:
    """Copy the ops of layers ``[start, end)`` into a new graph with their own weights."""
    program = layer_graph.program
    state_targets = weight_inputs(program)
    state = program_weights(program)
    member_names = {op for layer in layer_graph.layers[start:end] for op in layer.ops}
    members = [n for n in program.graph.nodes if n.name in member_names]

    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[str] = []

    def lookup(value: fx.Node) -> fx.Node:
        if value in env:
            return env[value]
        if value.name in state_targets:
            attr = "w_" + state_targets[value.name].replace(".", "_")
            if not hasattr(root, attr):
                tensor = state[state_targets[value.name]]
                if isinstance(tensor, torch.nn.Parameter):
                    root.register_parameter(attr, torch.nn.Parameter(tensor.detach(), False))
                else:
                    root.register_buffer(attr, tensor)
            env[value] = graph.get_attr(attr)
        else:
            env[value] = graph.placeholder(value.name)
            env[value].meta = dict(value.meta)
            inputs.append(value.name)
        return env[value]

    for node in members:
        for value in node.all_input_nodes:
            lookup(value)
        env[node] = graph.node_copy(node, lookup)
    outputs = tuple(
        t.name for t in layer_graph.boundary_tensors(end) if layer_graph.producer[t.name] >= start
    )
    by_name = {n.name: n for n in members}
    graph.output(tuple(env[by_name[name]] for name in outputs))
    graph.eliminate_dead_code()
    module = fx.GraphModule(root, graph)
    return RangeModule(module, start, end, tuple(inputs), outputs)

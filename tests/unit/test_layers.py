"""The layer graph: every op in one layer, layers reproduce the model, boundaries are honest."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import model_zoo
import networkx as nx
import numpy as np
import pytest
import torch
from model_zoo import ExportedSample

from coordinator.samples import SAMPLES
from partition.cost_builder import PROGRAM_BYTES_PER_OP, STAGE_RUNTIME_BYTES, stage_memory_matrix
from partition.layers import MARKERS, LayerGraph, build_layer_graph
from partition.modules import build_range_module
from partition.queues import held_frames_bytes
from partition.spec import dtype_name

GRANULARITIES = ("auto", 2)
CASES = [(name, g) for name in SAMPLES for g in GRANULARITIES]


@dataclass(frozen=True)
class ChainRun:
    """The layers run one after another, with what each one really made and read."""

    sample: ExportedSample
    layer_graph: LayerGraph
    env: dict[str, torch.Tensor]
    made_by: dict[str, int]  # value -> layer that made it (-1: a model input)
    read_by: dict[str, set[int]]  # value -> layers that read it

    def crossing(self, boundary: int) -> dict[str, torch.Tensor]:
        """The tensors really made before ``boundary`` and needed at or after it."""
        outputs = set(self.layer_graph.user_outputs)
        return {
            name: self.env[name]
            for name, maker in self.made_by.items()
            if maker < boundary
            and (any(r >= boundary for r in self.read_by[name]) or name in outputs)
        }


def run_chain(sample: ExportedSample, layer_graph: LayerGraph) -> ChainRun:
    env = dict(zip(layer_graph.user_inputs, sample.inputs, strict=True))
    made_by = dict.fromkeys(layer_graph.user_inputs, -1)
    read_by: dict[str, set[int]] = defaultdict(set)
    with torch.no_grad():
        for index in range(layer_graph.num_layers):
            layer = build_range_module(layer_graph, index, index + 1)
            for name in layer.inputs:
                read_by[name].add(index)
            produced = layer(env)
            assert not set(produced) & set(env), f"layer {index} remade a value"
            made_by.update(dict.fromkeys(produced, index))
            env.update(produced)
    return ChainRun(sample, layer_graph, env, made_by, read_by)


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{g}" for n, g in CASES])
def model_chain(request: pytest.FixtureRequest, sample_exported) -> ChainRun:
    name, granularity = request.param
    sample = sample_exported(name)
    return run_chain(sample, build_layer_graph(sample.model.program, granularity))


def test_every_op_is_in_exactly_one_layer(model_chain: ChainRun) -> None:
    lg = model_chain.layer_graph
    ops = [n.name for n in lg.program.graph.nodes if n.op == "call_function"]
    placed = Counter(op for layer in lg.layers for op in layer.ops)
    assert set(placed) == set(ops)
    assert max(placed.values()) == 1
    assert all(layer.ops for layer in lg.layers)
    assert [layer.index for layer in lg.layers] == list(range(lg.num_layers))
    assert len({layer.name for layer in lg.layers}) == lg.num_layers


def test_names_number_a_module_s_layers_in_program_order(model_chain: ChainRun) -> None:
    """A layer's name does not depend on the order the layers run in, so the names in order
    (the profile cache's fingerprint, the plan's layer list) identify that order."""
    lg = model_chain.layer_graph
    position = {n.name: k for k, n in enumerate(lg.program.graph.nodes)}
    by_key: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for layer in lg.layers:
        by_key[layer.name.split("#")[0]].append((position[layer.ops[0]], layer.name))
    for key, layers in by_key.items():
        names = [name for _, name in sorted(layers)]
        assert names == [key, *(f"{key}#{k}" for k in range(2, len(names) + 1))]


def test_layers_in_order_reproduce_the_model(model_chain: ChainRun) -> None:
    lg = model_chain.layer_graph
    assert lg.num_layers >= 3
    got = [model_chain.env[name] for name in lg.user_outputs]
    assert len(got) == len(model_chain.sample.expected)
    for g, want in zip(got, model_chain.sample.expected, strict=True):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)


def test_boundary_bytes_are_the_tensors_that_really_cross(model_chain: ChainRun) -> None:
    lg = model_chain.layer_graph
    planned = lg.boundary_bytes()
    assert planned.shape == (lg.num_layers + 1,)
    for boundary in range(lg.num_layers + 1):
        real = model_chain.crossing(boundary)
        assert {t.name for t in lg.boundary_tensors(boundary)} == set(real), boundary
        real_bytes = sum(t.numel() * t.element_size() for t in real.values())
        assert planned[boundary] == real_bytes, boundary
    assert (lg.value_flow().boundary_bytes() == planned).all()
    assert planned[0] == sum(t.numel() * t.element_size() for t in model_chain.sample.inputs)
    assert planned[-1] == sum(t.numel() * t.element_size() for t in model_chain.sample.expected)


def test_graph_is_a_forward_dag_whose_edges_carry_the_tensors(model_chain: ChainRun) -> None:
    lg = model_chain.layer_graph
    graph = lg.graph
    assert nx.is_directed_acyclic_graph(graph)
    assert set(graph.nodes) == {"input", "output", *range(lg.num_layers)}
    order = {"input": -1, "output": lg.num_layers, **{i: i for i in range(lg.num_layers)}}
    real_edges = set()
    for name, maker in model_chain.made_by.items():
        for reader in model_chain.read_by[name]:
            if reader != maker:
                real_edges.add(("input" if maker == -1 else maker, reader))
        if name in lg.user_outputs:
            real_edges.add(("input" if maker == -1 else maker, "output"))
    assert set(graph.edges) == real_edges
    for source, target, data in graph.edges(data=True):
        assert order[source] < order[target]
        assert data["tensors"]
        assert data["bytes"] == sum(t.nbytes for t in data["tensors"])
        for spec in data["tensors"]:
            assert model_chain.made_by[spec.name] == order[source]
            real = model_chain.env[spec.name]
            assert (spec.dtype, spec.shape) == (dtype_name(real.dtype), tuple(real.shape))
    for index, layer in enumerate(lg.layers):
        assert graph.nodes[index]["param_bytes"] == layer.param_bytes
        assert graph.nodes[index]["ops"] == layer.ops


def test_skip_dag_stem_output_crosses_at_least_three_boundaries(sample_exported) -> None:
    lg = build_layer_graph(sample_exported("skip_dag").model.program)
    (stem,) = [layer for layer in lg.layers if layer.name == "stem"]
    (head,) = [layer for layer in lg.layers if layer.name == "head"]
    skips = [name for name, maker in lg.producer.items()
             if maker == stem.index and lg.last_use.get(name) == head.index]
    assert len(skips) == 1
    crossed = [b for b in range(lg.num_layers + 1)
               if skips[0] in {t.name for t in lg.boundary_tensors(b)}]
    assert len(crossed) >= 3
    assert crossed == list(range(stem.index + 1, head.index + 1))


def test_bert_attention_mask_rides_to_its_last_use(sample_exported) -> None:
    sample = sample_exported("bert")
    lg = build_layer_graph(sample.model.program)
    chain = run_chain(sample, lg)
    mask_input = lg.user_inputs[1]
    last_read = max(chain.read_by[mask_input])
    for boundary in range(lg.num_layers + 1):
        names = {t.name for t in lg.boundary_tensors(boundary)}
        assert (mask_input in names) == (boundary <= last_read), boundary
    # The mask as attention uses it (a bool tensor made early) is read by the last
    # attention layer, so it crosses every boundary up to there.
    attention = [layer.index for layer in lg.layers if layer.name.endswith("attention.self")]
    assert len(attention) == 4
    late = [name for name, readers in chain.read_by.items()
            if attention[-1] in readers and chain.env[name].dtype == torch.bool]
    assert len(late) == 1
    made = chain.made_by[late[0]]
    assert made < attention[0]
    for boundary in range(made + 1, attention[-1] + 1):
        assert late[0] in {t.name for t in lg.boundary_tensors(boundary)}, boundary
    assert late[0] not in {t.name for t in lg.boundary_tensors(attention[-1] + 1)}


@pytest.fixture(scope="module")
def model_tied_gpt2() -> LayerGraph:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=32,
                        use_cache=False, tie_word_embeddings=True, bos_token_id=0,
                        eos_token_id=0)
    module = GPT2LMHeadModel(config).eval()
    assert module.lm_head.weight is module.transformer.wte.weight
    with torch.no_grad():
        program = torch.export.export(module, (torch.randint(0, 256, (1, 16)),))
    return build_layer_graph(program)


def test_tied_weight_is_in_both_layers_and_counted_once_per_stage(
    model_tied_gpt2: LayerGraph,
) -> None:
    lg = model_tied_gpt2
    (embed,) = [layer for layer in lg.layers if layer.name.endswith("wte")]
    (head,) = [layer for layer in lg.layers if layer.name == "lm_head"]
    shared = set(embed.params) & set(head.params)
    assert len(shared) == 1
    (name,) = shared
    state = lg.program.state_dict
    shared_bytes = state[name].numel() * state[name].element_size()
    assert tuple(state[name].shape) == (256, 64)

    memory = stage_memory_matrix(lg)
    boundary = lg.boundary_bytes()
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}

    def params_in(start: int, end: int) -> int:
        """The stage's memory less what is not its weights: peak, frames, program."""
        layers = lg.layers[start:end]
        peak = max(layer.peak_activation_bytes for layer in layers)
        frames = held_frames_bytes(int(boundary[start]), int(boundary[end]), last=end == whole)
        program = STAGE_RUNTIME_BYTES + PROGRAM_BYTES_PER_OP * sum(len(x.ops) for x in layers)
        return int(memory[start, end] - peak - frames - program)

    whole = lg.num_layers
    unique = sum(sizes[p] for p in {p for layer in lg.layers for p in layer.params})
    assert params_in(0, whole) == unique
    assert params_in(0, whole) == sum(layer.param_bytes for layer in lg.layers) - shared_bytes
    cut = head.index  # embedding in the first stage, the head alone in the second
    assert embed.index < cut
    first = sum(sizes[p] for p in {p for layer in lg.layers[:cut] for p in layer.params})
    assert params_in(0, cut) == first
    assert params_in(cut, whole) == head.param_bytes
    assert params_in(0, cut) >= shared_bytes and params_in(cut, whole) >= shared_bytes
    assert params_in(0, cut) + params_in(cut, whole) == unique + shared_bytes


@pytest.fixture(scope="module")
def model_pipe_split() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], object]:
    torch.manual_seed(0)
    module = model_zoo.PipeSplit().eval()
    inputs = (torch.randn(2, 16),)
    with torch.no_grad():
        program = torch.export.export(module, inputs)
    return module, inputs, program


def _block_of(lg: LayerGraph, op: str) -> str | None:
    """The top-level block an op belongs to (None for the markers and root ops)."""
    node = next(n for n in lg.program.graph.nodes if n.name == op)
    stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    return stack[0].split(".")[0] if stack else None


def _marker_boundaries(lg: LayerGraph) -> list[int]:
    """The boundaries right after each pipe_split() call, checking each call ends its layer."""
    targets = {n.name: str(n.target) for n in lg.program.graph.nodes}
    boundaries = []
    for layer in lg.layers:
        calls = [i for i, op in enumerate(layer.ops) if "pipe_split" in targets[op]]
        assert calls in ([], [len(layer.ops) - 1])
        boundaries += [layer.index + 1] * len(calls)
    return boundaries


@pytest.mark.parametrize("granularity", ["auto", 2, MARKERS])
def test_pipe_split_markers_are_boundaries(granularity: str | int, model_pipe_split) -> None:
    module, inputs, program = model_pipe_split
    lg = build_layer_graph(program, granularity)
    markers = _marker_boundaries(lg)
    assert len(markers) == 2
    if granularity == MARKERS:
        assert lg.num_layers == len(markers) + 1
        assert markers == [1, 2]
    # Each stretch between markers holds the ops of exactly one block, in order.
    edges = [0, *markers, lg.num_layers]
    spans = list(zip(edges, edges[1:], strict=False))
    for expected, (start, end) in zip(["block1", "block2", "block3"], spans, strict=True):
        blocks = {_block_of(lg, op) for layer in lg.layers[start:end] for op in layer.ops}
        assert blocks - {None} == {expected}
    env = dict(zip(lg.user_inputs, inputs, strict=True))
    with torch.no_grad():
        for index in range(lg.num_layers):
            env.update(build_range_module(lg, index, index + 1)(env))
        want = module(*inputs)
    torch.testing.assert_close(env[lg.user_outputs[0]], want, atol=1e-5, rtol=0)


def test_markers_granularity_refuses_a_model_without_markers(sample_exported) -> None:
    from partition.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="pipe_split"):
        build_layer_graph(sample_exported("skip_dag").model.program, MARKERS)


def test_granularity_depth_must_be_positive(sample_exported) -> None:
    from partition.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="granularity"):
        build_layer_graph(sample_exported("skip_dag").model.program, 0)


def test_finer_depth_never_merges_layers(sample_exported) -> None:
    program = sample_exported("resnet").model.program
    coarse, fine = build_layer_graph(program, 1), build_layer_graph(program, 3)
    assert fine.num_layers > coarse.num_layers
    # Every fine layer lies inside one coarse layer.
    coarse_of = {op: layer.index for layer in coarse.layers for op in layer.ops}
    for layer in fine.layers:
        assert len({coarse_of[op] for op in layer.ops}) == 1
    assert np.all(np.diff([coarse_of[layer.ops[0]] for layer in fine.layers]) >= 0)

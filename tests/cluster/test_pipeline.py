"""Six sample models split into three stages on a simulated cluster of three real workers
(the session's ``three_workers``).

Every request's outputs must equal the single-process model's, one at a time and with 50
different requests in flight; bad inputs are refused before anything is sent.
"""

from __future__ import annotations

import pytest
import torch
from cluster_helpers import Split

import node.client
from coordinator.deploy import deploy
from coordinator.pipeline import Pipeline
from partition.errors import TensorSpecError
from partition.spec import TensorSpec, dtype_from_name

MODELS = ("resnet", "mobilenet_v2", "gpt2", "bert", "vit", "skip_dag")
CONCURRENT_REQUESTS = 50
ATOL = 1e-5


def vocab_size(module: torch.nn.Module) -> int:
    """Rows of the model's first embedding table: its token vocabulary."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Embedding):
            return sub.num_embeddings
    raise AssertionError(f"{type(module).__name__} has no embedding table")


def make_inputs(specs: tuple[TensorSpec, ...], module: torch.nn.Module, seed: int) -> dict:
    """Inputs valid for the model: normal floats, token ids in ``[0, vocab)``, and attention
    masks of ones followed by a random number of zeros."""
    generator = torch.Generator().manual_seed(1000 + seed)
    inputs = {}
    for spec in specs:
        dtype = dtype_from_name(spec.dtype)
        if dtype.is_floating_point:
            inputs[spec.name] = torch.randn(spec.shape, generator=generator).to(dtype)
        elif "mask" in spec.name:
            *batch, seq = spec.shape
            keep = int(torch.randint(1, seq + 1, (), generator=generator))
            mask = torch.zeros(spec.shape, dtype=dtype)
            mask[..., :keep] = 1
            inputs[spec.name] = mask
        else:
            high = vocab_size(module)
            inputs[spec.name] = torch.randint(0, high, spec.shape, generator=generator).to(dtype)
    return inputs


def assert_outputs_equal(
    got: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], what: str
) -> None:
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, expected {len(expected)}"
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: output {k} {a.shape}/{b.shape}"
        assert torch.allclose(a, b, atol=ATOL), (
            f"{what}: output {k} differs by up to {(a - b).abs().max().item():.2e}"
        )


async def deployed(parts: Split) -> None:
    await deploy(parts.plan, parts.artifacts, emulate_links=False)


@pytest.mark.parametrize("name", MODELS)
async def test_three_stage_pipeline_matches_the_single_process_model(
    name: str, three_stages
) -> None:
    parts = three_stages(name)
    plan = parts.plan
    assert [s.node for s in plan.stages] == ["node-0", "node-1", "node-2"]
    count = parts.layer_graph.num_layers
    assert [(s.start, s.end) for s in plan.stages] == [
        (0, count // 3), (count // 3, 2 * count // 3), (2 * count // 3, count)
    ]
    await deployed(parts)

    # A window as large as the batch: all 50 requests are in flight at once, so the nodes'
    # bounded queues push back on the sender.
    async with await Pipeline.connect(plan, window=CONCURRENT_REQUESTS) as pipeline:
        # (a) the sample's own inputs, against the eager module's outputs
        one = await pipeline.infer(parts.sample.inputs)
        assert_outputs_equal(one, parts.sample.expected, f"{name} example request")

        # (b) 50 different requests in flight, each against its own single-process outputs
        batch = [make_inputs(plan.inputs, parts.sample.module, seed) for seed in range(
            CONCURRENT_REQUESTS)]
        answers = await pipeline.map(batch)

    assert len(answers) == CONCURRENT_REQUESTS
    for seed, (inputs, got) in enumerate(zip(batch, answers, strict=True)):
        expected = parts.reference(*(inputs[spec.name] for spec in plan.inputs))
        assert_outputs_equal(got, expected, f"{name} request {seed}")
    # The requests differ, so must their answers: nobody got someone else's outputs.
    assert not torch.equal(answers[0][0], answers[1][0])


async def test_skip_connection_crosses_the_middle_stage(three_stages) -> None:
    parts = three_stages("skip_dag")
    graph = parts.layer_graph
    [stem] = [i for i, layer in enumerate(graph.layers) if layer.name == "stem"]
    [skip] = [name for name, layer in graph.producer.items() if layer == stem]
    assert graph.last_use[skip] == graph.num_layers - 1  # read by the head's add

    first, middle, last = parts.artifacts
    assert skip in {t.name for t in first.spec.outputs} | {t.name for t in first.spec.sends}
    assert skip in {t.name for t in middle.spec.receives}
    assert skip in {t.name for t in middle.spec.sends}
    assert skip not in {t.name for t in middle.spec.outputs}  # passed through, not produced
    assert skip not in middle.spec.inputs
    assert skip in {t.name for t in last.spec.receives}
    # The plan prices the skip tensor on both hops it rides.
    assert skip in {t.name for t in parts.plan.stages[1].receives}
    assert skip in {t.name for t in parts.plan.stages[1].sends}


@pytest.fixture
def frames_sent(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Request ids of every frame any pipeline sends during the test."""
    sent: list[int] = []
    original = node.client._GrpcFrameSender.send

    async def spy(self, request_id, tensors):
        sent.append(request_id)
        await original(self, request_id, tensors)

    monkeypatch.setattr(node.client._GrpcFrameSender, "send", spy)
    return sent


async def test_bad_inputs_are_refused_before_sending(three_stages, frames_sent) -> None:
    parts = three_stages("bert")
    plan = parts.plan
    await deployed(parts)
    ids, mask = parts.sample.inputs
    signature = "input_ids: int64[1, 32], attention_mask: int64[1, 32]"
    assert [(s.name, s.dtype, s.shape) for s in plan.inputs] == [
        ("input_ids", "int64", (1, 32)), ("attention_mask", "int64", (1, 32))
    ]
    bad = {
        "wrong shape": (ids[:, :16], mask[:, :16]),
        "wrong dtype": (ids.float(), mask),
        "missing input": (ids,),
        "missing input by name": {"input_ids": ids},
        "misnamed input": {"input_ids": ids, "mask": mask},
    }
    async with await Pipeline.connect(plan) as pipeline:
        for kind, inputs in bad.items():
            with pytest.raises(TensorSpecError) as caught:
                await pipeline.infer(inputs)
            assert signature in str(caught.value), f"{kind}: {caught.value}"
        assert frames_sent == [], "a refused request was sent"

        good = await pipeline.infer((ids, mask))
        assert_outputs_equal(good, parts.sample.expected, "bert after refused requests")
        assert len(frames_sent) == 1

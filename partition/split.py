"""Turn a plan into one ``torch.export`` artifact per stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from partition.artifact import program_to_bytes, sha256
from partition.errors import ExportError, ModelLoadError, ModelMismatchError
from partition.layers import LayerGraph, build_layer_graph
from partition.loader import LoadedModel, example_tensor, load_model
from partition.modules import build_range_module
from partition.plan import Plan, PlannedStage
from partition.quantize import quantize_module
from partition.spec import StageSpec


@dataclass(frozen=True)
class StageArtifact:
    """A stage's spec and its serialized program."""

    spec: StageSpec
    data: bytes


def stage_artifacts(plan: Plan, model_path: str | None = None) -> list[StageArtifact]:
    """Load the plan's model (``model_path`` if it moved) and export every stage.

    Raises
    ------
    ModelLoadError, ModelMismatchError
        As :func:`plan_layer_graph`.
    ExportError
        If torch.export cannot re-export a stage's ops.
    """
    return split(plan, plan_layer_graph(plan, model_path))


def plan_layer_graph(plan: Plan, model_path: str | None = None) -> LayerGraph:
    """The plan's model (``model_path`` if it moved) grouped into the plan's layers (see
    :func:`plan_model`)."""
    return plan_model(plan, model_path)[1]


def plan_model(plan: Plan, model_path: str | None = None) -> tuple[LoadedModel, LayerGraph]:
    """The plan's model (``model_path`` if it moved), and the model grouped into the plan's
    layers.

    Raises
    ------
    ModelLoadError
        If the model file is missing or cannot be loaded.
    ModelMismatchError
        If the model file or its layers differ from the ones the plan was made for.
    """
    path = model_path or plan.model_path
    if not Path(path).is_file():
        raise ModelLoadError(
            f"the plan's model file '{path}' does not exist here; pass it with --model PATH"
        )
    model = load_model(path)
    if model.sha256 != plan.model_sha256:
        raise ModelMismatchError(
            f"'{path}' is not the model this plan was made for (its SHA-256 differs); "
            "pass the right file with --model, or plan again"
        )
    layer_graph = build_layer_graph(model.program, plan.granularity)
    if tuple(layer.name for layer in layer_graph.layers) != plan.layer_names:
        raise ModelMismatchError(
            "the model's layers differ from the plan's (another torch version?); plan again"
        )
    return model, layer_graph


def split(plan: Plan, layer_graph: LayerGraph) -> list[StageArtifact]:
    """Export each stage of ``plan``; chaining them reproduces the whole model.

    Raises
    ------
    ExportError
        If torch.export cannot re-export a stage's ops.
    """
    return [export_stage(stage, layer_graph) for stage in plan.stages]


def export_stage(stage: PlannedStage, layer_graph: LayerGraph) -> StageArtifact:
    """Re-export layers ``[stage.start, stage.end)`` as a standalone program, its weights
    stored as ``stage.weights`` says (see :mod:`partition.quantize`)."""
    ranged = build_range_module(layer_graph, stage.start, stage.end)
    module = quantize_module(ranged.module, stage.weights)
    received = {t.name: t for t in stage.receives}
    examples = tuple(example_tensor(received[name]) for name in ranged.inputs)
    try:
        with torch.no_grad():
            program = torch.export.export(module, examples)
    except Exception as err:
        raise ExportError(
            f"stage {stage.index} (layers {stage.first_layer}..{stage.last_layer}) could not be "
            f"exported ({type(err).__name__}: {str(err).strip().splitlines()[0]}); "
            "try another --granularity"
        ) from err
    data = program_to_bytes(program)
    spec = StageSpec(
        index=stage.index,
        node=stage.node,
        start=stage.start,
        end=stage.end,
        receives=stage.receives,
        inputs=ranged.inputs,
        outputs=tuple(layer_graph.values[name] for name in ranged.outputs),
        sends=stage.sends,
        artifact_sha256=sha256(data),
    )
    return StageArtifact(spec, data)

"""Turn a plan into one ``torch.export`` artifact per stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from partition.artifact import program_to_bytes, sha256
from partition.errors import ExportError
from partition.layers import LayerGraph
from partition.loader import example_tensor
from partition.modules import build_range_module
from partition.plan import Plan, PlannedStage
from partition.spec import StageSpec


@dataclass(frozen=True)
class StageArtifact:
    """A stage's spec and its serialized program."""

    spec: StageSpec
    data: bytes


def split(plan: Plan, layer_graph: LayerGraph) -> list[StageArtifact]:
    """Export each stage of ``plan``; chaining them reproduces the whole model.

    Raises
    ------
    ExportError
        If torch.export cannot re-export a stage's ops.
    """
    return [export_stage(stage, layer_graph) for stage in plan.stages]


def export_stage(stage: PlannedStage, layer_graph: LayerGraph) -> StageArtifact:
    """Re-export layers ``[stage.start, stage.end)`` as a standalone program."""
    ranged = build_range_module(layer_graph, stage.start, stage.end)
    received = {t.name: t for t in stage.receives}
    examples = tuple(example_tensor(received[name]) for name in ranged.inputs)
    try:
        with torch.no_grad():
            program = torch.export.export(ranged.module, examples)
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

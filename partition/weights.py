"""An exported program's weights: its parameters, buffers and lifted tensor constants."""

from __future__ import annotations

import torch


def program_weights(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every weight of ``program`` by its target name (``"layer1.0.conv1.weight"``)."""
    return {**program.state_dict, **program.constants}


def weight_inputs(program: torch.export.ExportedProgram) -> dict[str, str]:
    """The target name of each graph input that carries a weight, by the input's node name."""
    signature = program.graph_signature
    return {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }

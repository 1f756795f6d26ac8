"""Stage artifacts: a ``torch.export`` program serialized to bytes, loaded without pickle."""

from __future__ import annotations

import hashlib
import io

import torch
from torch.export.graph_signature import InputKind, OutputKind

from partition.archive import load_archive
from partition.spec import StageSpec
from partition.weights import program_weights


def sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def program_to_bytes(program: torch.export.ExportedProgram) -> bytes:
    """Serialize an exported program (``torch.export.save``) to bytes."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


class ProgramRunner:
    """Call an exported program's graph directly with its weights bound.

    Lighter than ``ExportedProgram.module()``, whose input guards and pytree handling run on
    every call; callers check tensors against the stage's signature themselves.
    Called with the user inputs positionally, returns the user outputs as a tuple.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        signature = program.graph_signature
        state = program_weights(program)
        self._bound = [
            None if spec.kind == InputKind.USER_INPUT else state[spec.target]
            for spec in signature.input_specs
        ]
        self._user_outputs = [
            i for i, spec in enumerate(signature.output_specs)
            if spec.kind == OutputKind.USER_OUTPUT
        ]
        self._graph = program.graph_module

    def to(self, device: torch.device) -> ProgramRunner:
        """Move the bound weights to ``device`` (in place); returns ``self``."""
        self._bound = [None if t is None else t.to(device) for t in self._bound]
        return self

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        supplied = iter(inputs)
        args = [next(supplied) if bound is None else bound for bound in self._bound]
        outputs = self._graph(*args)
        return tuple(outputs[i] for i in self._user_outputs)


def load_program(data: bytes) -> ProgramRunner:
    """Load a stage artifact into a callable; the archive's graph is JSON, not pickle.

    Raises
    ------
    ModelLoadError
        If ``data`` is not a ``torch.export`` archive, or loading it would run pickled code.
    """
    return ProgramRunner(load_archive(data, "the stage artifact"))


def run_stage(
    program: ProgramRunner, spec: StageSpec, frame: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run ``program`` on the received ``frame`` and return the frame to send on.

    Tensors in ``spec.sends`` that the program does not produce are passed through from
    ``frame`` untouched (skip connections and late model inputs ride along this way).
    """
    with torch.no_grad():
        results = program(*(frame[name] for name in spec.inputs))
    produced = {out.name: value for out, value in zip(spec.outputs, results, strict=True)}
    return {t.name: produced[t.name] if t.name in produced else frame[t.name] for t in spec.sends}

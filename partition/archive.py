"""Reading ``torch.export`` archives: model files and stage artifacts alike.

``torch.export.load`` unpickles weights, constants, custom objects and example inputs that
an archive asks it to, imports modules an archive names and evaluates its shape expressions
as Python, so no archive is handed to it. :func:`load_archive` reads the zip itself,
admitting only the entries and values ``torch.export.save`` writes for a plain model
(:mod:`partition.archive_entries`, :mod:`partition.archive_graph`), and gives torch only the
checked program JSON and tensors it built.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

from partition.archive_entries import read_entries
from partition.archive_graph import check_program, uses_marker_op
from partition.errors import ModelLoadError


def load_archive(data: bytes, origin: str) -> torch.export.ExportedProgram:
    """Load a ``torch.export`` archive without running code from it; ``origin`` names it.

    Registers the ``pipe_split()`` op and the pytree output types (a ``transformers``
    ModelOutput) the archive needs, and turns torch's failure into one sentence.

    Raises
    ------
    ModelLoadError
        If ``data`` is not a ``torch.export`` archive of known entries, or is damaged.
    """
    entries = read_entries(data, origin)
    check_program(entries.program, origin)
    if uses_marker_op(entries.program):
        _register_marker_op()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            serialized = _dict_to_dataclass(schema.ExportedProgram, entries.program)
            return ExportedProgramDeserializer().deserialize(
                serialized, entries.state_dict, entries.constants, entries.example_inputs
            )
    except Exception as err:
        raise ModelLoadError(
            f"{origin} is a damaged torch.export archive ({type(err).__name__}); save it again"
        ) from err


def _register_marker_op() -> None:
    """Register ``pippy::_pipe_split``, the op of ``pipe_split()`` markers.

    It exists only once ``torch.distributed.pipelining`` is imported (about 2 s), so import
    it only for archives that call it.
    """
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.pipelining")

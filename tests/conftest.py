"""Fixtures shared by every test: a private profile cache, and the sample models built and
exported once per session.

Names are prefixed (``sample_``, ``model_``) so that package-level conftests can add their
own fixtures without clashing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from coordinator.samples import SAMPLES, SampleBuilder, build_sample
from partition.loader import export_module, load_model

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # so torch.load finds the classes in tests/model_zoo.py
    sys.path.insert(0, str(TESTS_DIR))

from model_zoo import ExportedSample, Mlp  # noqa: E402


def model_outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple:
    """The eager module's outputs as a flat tuple of tensors (a ``ModelOutput`` flattened)."""
    with torch.no_grad():
        return tuple(pytree.tree_leaves(module(*inputs)))


def model_export(
    builder: SampleBuilder, name: str, directory: Path
) -> ExportedSample:
    """Build ``builder``'s model, export it, save the archive and load it with ``load_model``."""
    module, inputs = build_sample(builder)
    expected = model_outputs(module, inputs)
    program = export_module(module, inputs, origin=name)
    path = directory / f"{name}.pt2"
    torch.export.save(program, path)
    model = load_model(path)
    if len(model.program.graph_signature.user_outputs) != len(expected):
        raise AssertionError(f"{name}: the program's outputs do not match the eager outputs")
    return ExportedSample(name, module, inputs, expected, path, model)


@pytest.fixture(scope="session", autouse=True)
def sample_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``$EDGESPLIT_CACHE`` at a temporary directory for the whole session, so no test
    writes to the user's cache."""
    path = tmp_path_factory.mktemp("edgesplit-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("EDGESPLIT_CACHE", str(path))
    yield path
    patch.undo()


@pytest.fixture(scope="session")
def sample_exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], ExportedSample]:
    """``sample_exported(name)``: the sample model ``name`` of ``coordinator.samples.SAMPLES``,
    exported and loaded once per session."""
    directory = tmp_path_factory.mktemp("samples")
    built: dict[str, ExportedSample] = {}

    def get(name: str) -> ExportedSample:
        if name not in built:
            built[name] = model_export(SAMPLES[name], name, directory)
        return built[name]

    return get


@pytest.fixture(scope="session")
def sample_mlp(tmp_path_factory: pytest.TempPathFactory) -> ExportedSample:
    """A Linear-heavy model (:class:`model_zoo.Mlp`: 4 MiB of float32 weights), exported and
    loaded once per session."""
    return model_export(lambda: (Mlp(), (torch.randn(8, 512),)), "mlp",
                        tmp_path_factory.mktemp("mlp"))

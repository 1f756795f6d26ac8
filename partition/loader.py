"""Load a model file into a ``torch.export`` program, with one clear error for every wrong file."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pickle
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from partition.archive import load_archive
from partition.errors import ExportError, ModelLoadError, TensorSpecError
from partition.spec import TensorSpec, dtype_from_name

log = logging.getLogger(__name__)

_SHAPE = re.compile(r"^[1-9]\d*(x[1-9]\d*)*$")
_EXPORT_HINT = "save it with torch.export.save(torch.export.export(model, example_args), path)"


@dataclass(frozen=True)
class LoadedModel:
    """An exported model, the hash of the file it came from, and example inputs."""

    program: torch.export.ExportedProgram
    sha256: str
    source: str
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        names = self.program.graph_signature.user_inputs
        return tuple(TensorSpec.of(n, t) for n, t in zip(names, self.example_inputs, strict=True))


def parse_input_shape(text: str) -> TensorSpec:
    """Parse ``--input-shape``: ``1x3x224x224`` or ``1x128:int64`` (dtype defaults to float32).

    >>> parse_input_shape("1x128:int64")
    TensorSpec(name='input', dtype='int64', shape=(1, 128))
    """
    shape_text, _, dtype = text.strip().partition(":")
    if not _SHAPE.match(shape_text):
        raise ModelLoadError(
            f"--input-shape {text!r} is not a shape; write dimensions joined by 'x', "
            "optionally with a dtype, e.g. 1x3x224x224 or 1x128:int64"
        )
    dtype = dtype or "float32"
    try:
        dtype_from_name(dtype)
    except TensorSpecError as err:
        raise ModelLoadError(f"--input-shape {text!r}: {err}") from None
    return TensorSpec("input", dtype, tuple(int(d) for d in shape_text.split("x")))


def example_tensor(spec: TensorSpec) -> torch.Tensor:
    """A deterministic example input: normal floats, zeros for integer ids and masks."""
    dtype = dtype_from_name(spec.dtype)
    if dtype.is_floating_point:
        generator = torch.Generator().manual_seed(0)
        return torch.randn(spec.shape, generator=generator).to(dtype)
    return torch.zeros(spec.shape, dtype=dtype)


def load_model(
    path: str | Path, *, allow_pickle: bool = False, input_shapes: tuple[TensorSpec, ...] = ()
) -> LoadedModel:
    """Load ``path``: a ``torch.export`` archive, or (opt-in) a pickled ``nn.Module``.

    Raises
    ------
    ModelLoadError
        For a missing, foreign, truncated or corrupt file, a state_dict, a TorchScript
        archive, or a pickled module without ``allow_pickle`` and ``input_shapes``.
    ExportError
        If a pickled module fails to export.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file '{path}' does not exist")
    return load_model_bytes(
        path.read_bytes(), str(path), allow_pickle=allow_pickle, input_shapes=input_shapes
    )


def load_model_bytes(
    data: bytes,
    origin: str,
    *,
    allow_pickle: bool = False,
    input_shapes: tuple[TensorSpec, ...] = (),
) -> LoadedModel:
    """Like :func:`load_model`, for a file's bytes; ``origin`` names it in messages."""
    path = origin
    digest = hashlib.sha256(data).hexdigest()
    names = _zip_names(path, data)
    if any(n.endswith("/models/model.json") or n.endswith("serialized_exported_program.json")
           for n in names):
        program = flatten_grad_regions(load_archive(data, f"'{path}'"))
    elif any("/code/" in n for n in names) or any(n.endswith("constants.pkl") for n in names):
        raise ModelLoadError(
            f"'{path}' is a TorchScript archive, which edgesplit cannot split; {_EXPORT_HINT}"
        )
    elif any(n.endswith("data.pkl") for n in names):
        module = _load_pickle(path, data, allow_pickle, bool(input_shapes))
        examples = tuple(example_tensor(s) for s in input_shapes)
        program = export_module(module, examples, origin=path)
        return LoadedModel(program, digest, path, examples)
    else:
        raise ModelLoadError(f"'{path}' is a zip file but not a PyTorch model; {_EXPORT_HINT}")
    return LoadedModel(program, digest, path, _example_inputs(program))


def export_module(
    module: torch.nn.Module, examples: tuple[torch.Tensor, ...], origin: str
) -> torch.export.ExportedProgram:
    """Export ``module`` in eval mode without gradients; wrap failures in :class:`ExportError`."""
    module.eval()
    try:
        with torch.no_grad(), _quiet_torch():
            return torch.export.export(module, examples)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"torch.export could not trace {origin} ({type(err).__name__}: {reason}); "
            "make the model exportable or pass --debug for the full trace"
        ) from err


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Unless debug logging is on, silence what torch logs and prints to stderr when an
    export fails (the partial graph): the :class:`ExportError` says why in one line."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch_log.setLevel(level)


def _zip_names(path: str, data: bytes) -> list[str]:
    if not data.startswith(b"PK"):
        if data[:2] == b"\x80\x02":
            raise ModelLoadError(
                f"'{path}' uses torch's legacy (pre-1.6) format; re-save it, or {_EXPORT_HINT}"
            )
        raise ModelLoadError(f"'{path}' is not a PyTorch file; {_EXPORT_HINT}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except zipfile.BadZipFile as err:
        raise ModelLoadError(
            f"'{path}' is truncated or corrupt ({err}); copy or save it again"
        ) from err


def flatten_grad_regions(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Inline higher-order sub-graphs (``wrap_with_set_grad_enabled``) so every op is visible."""
    has_subgraphs = any(
        isinstance(n.target, torch._ops.HigherOrderOperator)
        for n in program.graph.nodes
        if n.op == "call_function"
    )
    if not has_subgraphs:
        return program
    log.info("flattening higher-order sub-graphs with run_decompositions()")
    return program.run_decompositions({})


def _load_pickle(
    path: str, data: bytes, allow_pickle: bool, has_input_shapes: bool
) -> torch.nn.Module:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        obj = None
    except Exception as err:
        raise ModelLoadError(f"'{path}' is truncated or corrupt ({err}); save it again") from err
    if obj is not None:
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelLoadError(
                f"'{path}' holds only a state_dict (weights without the model's code); "
                f"{_EXPORT_HINT}, or torch.save(model, path) and pass --allow-pickle"
            )
        raise ModelLoadError(
            f"'{path}' holds a {type(obj).__name__}, not a model; {_EXPORT_HINT}"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"'{path}' is a pickled nn.Module and loading it runs code from the file; "
            "pass --allow-pickle if you trust it (with --input-shape), or " + _EXPORT_HINT
        )
    if not has_input_shapes:  # checked before unpickling: a refused file runs no code
        raise ModelLoadError(
            f"'{path}' is a pickled module with no recorded inputs; "
            "give each input's shape with --input-shape, e.g. --input-shape 1x3x224x224"
        )
    log.warning("loading pickled module %s: this runs code from the file", path)
    try:
        module = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as err:
        raise ModelLoadError(
            f"'{path}' could not be unpickled ({type(err).__name__}: {err}); "
            "the module's class must be importable here"
        ) from err
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(
            f"'{path}' holds a {type(module).__name__}, not an nn.Module; {_EXPORT_HINT}"
        )
    return module


def _example_inputs(program: torch.export.ExportedProgram) -> tuple[torch.Tensor, ...]:
    """The archive's own example inputs, or made-up ones from its placeholders' shapes."""
    recorded = getattr(program, "example_inputs", None)
    if recorded is not None:
        flat, _ = pytree.tree_flatten(recorded)
        if all(isinstance(t, torch.Tensor) for t in flat):
            return tuple(flat)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise ModelLoadError(f"model input {name!r} is not a tensor; edgesplit feeds tensors")
        specs.append(TensorSpec.of(name, value))
    return tuple(example_tensor(s) for s in specs)

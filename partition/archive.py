"""Reading ``torch.export`` archives: model files and stage artifacts alike.

``torch.export.load`` unpickles with ``weights_only=False`` the weights and constants an
archive marks ``use_pickle``, and falls back to it for example inputs that a safe load
rejects. A crafted archive could run code that way, so :func:`load_archive` checks first.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import re
import warnings
import zipfile

import torch

from partition.errors import ModelLoadError

_UNREGISTERED = re.compile(r"Deserializing ([\w.]+) in pytree is not registered")
_MARKER_OP = b"torch.ops.pippy."


def load_archive(data: bytes, origin: str) -> torch.export.ExportedProgram:
    """Load a ``torch.export`` archive; ``origin`` names it in messages.

    Refuses archives whose loading would run pickled code, registers the ``pipe_split()``
    op and the pytree output types (e.g. a ``transformers`` ModelOutput) the archive needs,
    and turns torch's failure into one sentence.

    Raises
    ------
    ModelLoadError
        If ``data`` is not a loadable, safe ``torch.export`` archive.
    """
    refuse_pickled_code(data, origin)
    try:
        program = _quiet_export_load(data)
    except _ArchiveError as err:
        found = _UNREGISTERED.search(err.log)
        if found is None:
            raise ModelLoadError(
                f"{origin} is a damaged torch.export archive ({err}); save it again"
            ) from err
        module = found.group(1).rsplit(".", 1)[0]
        try:
            importlib.import_module(module)  # registers the archive's pytree output types
            program = _quiet_export_load(data)
        except (ImportError, _ArchiveError) as retry_err:
            raise ModelLoadError(
                f"{origin} returns a pytree type from {module!r}, which cannot be imported here; "
                "install it, or export a model that returns plain tensors or tuples"
            ) from retry_err
    return program


class _ArchiveError(Exception):
    """``torch.export.load`` failed; ``log`` holds what torch logged about why."""

    def __init__(self, cause: Exception, log: str) -> None:
        super().__init__(f"{type(cause).__name__}")
        self.log = log


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if record.exc_info:
            self.messages.append(logging.Formatter().formatException(record.exc_info))


def _quiet_export_load(data: bytes) -> torch.export.ExportedProgram:
    """Load an archive; torch logs the real reason for a failure, so capture it."""
    register_marker_op(data)
    torch_log = logging.getLogger("torch.export")
    capture = _Capture()
    handlers, propagate = torch_log.handlers, torch_log.propagate
    torch_log.handlers, torch_log.propagate = [capture], False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise _ArchiveError(err, "\n".join(capture.messages)) from err
    finally:
        torch_log.handlers, torch_log.propagate = handlers, propagate


def register_marker_op(data: bytes) -> None:
    """Register the op of ``pipe_split()`` markers if the archive ``data`` calls it.

    ``pippy::_pipe_split`` exists only once ``torch.distributed.pipelining`` is imported
    (about 2 s), and ``torch.export.load`` cannot resolve it otherwise, so import it only
    for archives that name it (their graph JSON is stored uncompressed).
    """
    if _MARKER_OP in data and torch.distributed.is_available():
        importlib.import_module("torch.distributed.pipelining")


def refuse_pickled_code(data: bytes, origin: str) -> None:
    """Raise :class:`ModelLoadError` unless loading the archive ``data`` runs no pickle code.

    Every ``*_config.json`` must mark no payload ``use_pickle``, and every embedded ``.pt``
    file (example inputs) must load with ``torch.load(weights_only=True)``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise ModelLoadError(f"{origin} is truncated or corrupt ({err}); save it again") from err
    with archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and _uses_pickle(archive.read(name)):
                raise ModelLoadError(
                    f"{origin} stores {name.rsplit('/', 1)[-1]} entries as pickles, and loading "
                    "them would run code from the file; export it again with plain tensors"
                )
            if name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception as err:
                    raise ModelLoadError(
                        f"{origin} holds {name.rsplit('/', 1)[-1]}, which only loads by running "
                        "pickled code; export it again with tensor example inputs"
                    ) from err


def _uses_pickle(config: bytes) -> bool:
    try:
        document = json.loads(config)
    except ValueError:
        return False  # not a payload config torch reads: nothing to unpickle
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("use_pickle") is True:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False

"""Refuse ``torch.export`` archives whose loading would run pickled code.

``torch.export.load`` unpickles with ``weights_only=False`` the weights and constants an
archive marks ``use_pickle``, and falls back to it for example inputs that a safe load
rejects. A crafted archive could run code that way, so edgesplit checks first.
"""

from __future__ import annotations

import io
import json
import zipfile

import torch

from partition.errors import ModelLoadError


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

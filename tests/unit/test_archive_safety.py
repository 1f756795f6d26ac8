"""Archives whose loading would run pickled code are refused before torch sees them."""

from __future__ import annotations

import io
import json
import zipfile

import model_zoo
import pytest
import torch

from partition.archive import refuse_pickled_code
from partition.artifact import load_program, program_to_bytes
from partition.errors import ModelLoadError
from partition.loader import load_model


def _archive() -> bytes:
    module = torch.nn.Linear(4, 4)
    return program_to_bytes(torch.export.export(module, (torch.randn(2, 4),)))


def _rewrite(data: bytes, replace: dict) -> bytes:
    """A copy of the zip ``data`` with members replaced by ``replace[name](old_bytes)``."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            content = old.read(info.filename)
            for suffix, change in replace.items():
                if info.filename.endswith(suffix):
                    content = change(content)
            new.writestr(info, content)
    return out.getvalue()


def _mark_pickled(config: bytes) -> bytes:
    document = json.loads(config)

    def mark(item):
        if isinstance(item, dict):
            if "use_pickle" in item:
                item["use_pickle"] = True
            for value in item.values():
                mark(value)
        elif isinstance(item, list):
            for value in item:
                mark(value)

    mark(document)
    return json.dumps(document).encode()


def test_a_plain_archive_passes() -> None:
    refuse_pickled_code(_archive(), "test")


def test_weights_marked_as_pickles_are_refused(tmp_path) -> None:
    data = _rewrite(_archive(), {"model_weights_config.json": _mark_pickled})
    assert b'"use_pickle": true' in data
    with pytest.raises(ModelLoadError, match="would run code"):
        load_program(data)
    path = tmp_path / "model.pt2"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="would run code"):
        load_model(path)


def test_example_inputs_that_need_pickled_code_are_refused_without_running_it() -> None:
    def pickled_object(_: bytes) -> bytes:
        buffer = io.BytesIO()
        torch.save(((model_zoo.Tripwire(),), {}), buffer)
        return buffer.getvalue()

    data = _rewrite(_archive(), {"sample_inputs/model.pt": pickled_object})
    model_zoo.UNPICKLED.clear()
    with pytest.raises(ModelLoadError, match="only loads by running pickled code"):
        load_program(data)
    assert model_zoo.UNPICKLED == []

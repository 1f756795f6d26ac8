"""No code from an archive ever runs: every kind of crafted archive is refused, through
``load_model`` (and ``coordinator profile``) and ``load_program``, before it can act."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from pathlib import Path

import crafted_archives
import pytest
import torch
from crafted_archives import KINDS, MARKER_MODULE, RUN_BY_TORCH

from coordinator.cli import main
from partition.archive import load_archive
from partition.artifact import load_program
from partition.errors import ModelLoadError
from partition.loader import load_model


@pytest.fixture(scope="module")
def plain() -> bytes:
    return crafted_archives.plain_archive()


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A marker file a crafted archive's code would create; its module is importable."""
    path = tmp_path / "marker"
    crafted_archives.write_marker_module(tmp_path, path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MARKER_MODULE, raising=False)
    return path


def test_a_plain_archive_loads(plain: bytes) -> None:
    program = load_archive(plain, "test")
    assert [spec.target for spec in program.graph_signature.input_specs[:2]] == [
        "weight", "bias"
    ]


@pytest.mark.parametrize("kind", RUN_BY_TORCH)
def test_torch_export_load_runs_the_crafted_code(kind: str, plain: bytes, marker: Path) -> None:
    """The crafted archives are real attacks: torch's own loader runs them."""
    data = KINDS[kind].make(plain, marker)
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.load(io.BytesIO(data))
    except Exception:
        pass  # many fail after the code ran; only the marker matters
    finally:
        logging.disable(logging.NOTSET)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_archive_is_refused_without_running_code(
    kind: str, plain: bytes, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = KINDS[kind].make(plain, marker)
    path = tmp_path / "crafted.pt2"
    path.write_bytes(data)
    for load in (lambda: load_program(data), lambda: load_model(path)):
        with pytest.raises(ModelLoadError) as caught:
            load()
        message = str(caught.value)
        assert KINDS[kind].names in message and "\n" not in message
        assert not marker.exists()
    assert main(["profile", str(path), "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and KINDS[kind].names in err
    assert not marker.exists()

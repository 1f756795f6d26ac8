"""Crafted ``torch.export`` archives that try to run code while they load.

Each kind of :data:`KINDS` rewrites a plain archive so that loading it the way
``torch.export.load`` does would create a marker file (or run what the archive names), and
says which words the refusal must contain. The unit and cluster tests load every kind
through each path edgesplit has and check that the marker never appears.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MARKER_MODULE = "edgesplit_marker_module"
"""A module :func:`write_marker_module` writes; importing it creates the marker."""


class _Touch:
    """Unpickling it opens (so creates) the marker file: what an attacker's payload does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plain_archive() -> bytes:
    """A small archive as ``torch.export.save`` writes it."""
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)), buffer)
    return buffer.getvalue()


def write_marker_module(directory: Path, marker: Path) -> None:
    """Write :data:`MARKER_MODULE` into ``directory``: importing it creates ``marker``."""
    (directory / f"{MARKER_MODULE}.py").write_text(
        f"import enum, pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "class Choice(enum.Enum):\n    A = 1\n"
    )


@dataclass(frozen=True)
class Crafted:
    """One kind of crafted archive: how to make it, and what its refusal must name."""

    make: Callable[[bytes, Path], bytes]
    names: str


def _entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate names are one of the crafted kinds
        for name, content in entries:
            archive.writestr(zipfile.ZipInfo(name), content)
    return out.getvalue()


def _edit(data: bytes, edits: dict[str, Callable[[bytes], bytes]],
          extra: list[tuple[str, bytes]] = ()) -> bytes:
    """``data`` with entries ending in a key of ``edits`` rewritten, and ``extra`` appended."""
    entries = []
    for name, content in _entries(data).items():
        for suffix, change in edits.items():
            if name.endswith(suffix):
                content = change(content)
        entries.append((name, content))
    return _zip(entries + list(extra))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Touch(marker))


def _json_edit(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(content: bytes) -> bytes:
        document = json.loads(content)
        change(document)
        return json.dumps(document).encode()

    return edit


def _pickled_weight(flag: object) -> Callable[[bytes, Path], bytes]:
    def make(data: bytes, marker: Path) -> bytes:
        def mark(config: dict) -> None:
            first = next(iter(config["config"].values()))
            first["use_pickle"] = flag

        first_weight = json.loads(
            _entries(data)["archive/data/weights/model_weights_config.json"]
        )["config"]
        path_name = next(iter(first_weight.values()))["path_name"]
        return _edit(data, {"model_weights_config.json": _json_edit(mark),
                            f"/weights/{path_name}": lambda _: _payload(marker)})

    return make


def _constant(path_name: str, use_pickle: bool) -> Callable[[bytes, Path], bytes]:
    def make(data: bytes, marker: Path) -> bytes:
        def add(config: dict) -> None:
            meta = next(iter(json.loads(
                _entries(data)["archive/data/weights/model_weights_config.json"]
            )["config"].values()))["tensor_meta"]
            config["config"]["c"] = {"path_name": path_name, "is_param": False,
                                     "use_pickle": use_pickle, "tensor_meta": meta}

        return _edit(data, {"model_constants_config.json": _json_edit(add)},
                     [(f"archive/data/constants/{path_name}", _payload(marker))])

    return make


def _in_program(change: Callable[[dict, Path], None]) -> Callable[[bytes, Path], bytes]:
    def make(data: bytes, marker: Path) -> bytes:
        return _edit(data, {"models/model.json": _json_edit(lambda doc: change(doc, marker))})

    return make


def _shape_expression(doc: dict, marker: Path) -> None:
    values = doc["graph_module"]["graph"]["tensor_values"]
    first = next(iter(values.values()))
    code = f"__import__('pathlib').Path({str(marker)!r}).touch() or Integer(2)"
    first["sizes"][0] = {"as_expr": {"expr_str": code, "hint": {"as_int": 2}}}


def _out_spec(doc: dict, spec: dict) -> None:
    signature = doc["graph_module"]["module_call_graph"][0]["signature"]
    signature["out_spec"] = json.dumps([1, spec])


def _pytree_enum(doc: dict, _: Path) -> None:
    enum = {"__enum__": True, "fqn": f"{MARKER_MODULE}:Choice", "name": "A"}
    _out_spec(doc, {"type": "builtins.dict", "context": json.dumps([enum]),
                    "children_spec": [{"type": None, "context": None, "children_spec": []}]})


def _pytree_type(doc: dict, _: Path) -> None:
    _out_spec(doc, {"type": f"{MARKER_MODULE}.Output", "context": "[\"out\"]",
                    "children_spec": [{"type": None, "context": None, "children_spec": []}]})


def _op_target(doc: dict, marker: Path) -> None:
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.load"


def _guards(doc: dict, marker: Path) -> None:
    doc["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() or True"]


KINDS: dict[str, Crafted] = {
    "sample-inputs": Crafted(
        lambda d, m: _edit(d, {"sample_inputs/model.pt": lambda _: _payload(m)}),
        "data/sample_inputs/model.pt"),
    "weights-use-pickle-true": Crafted(_pickled_weight(True), "use_pickle"),
    "weights-use-pickle-1": Crafted(_pickled_weight(1), "use_pickle"),
    "weights-use-pickle-yes": Crafted(_pickled_weight("yes"), "use_pickle"),
    "weights-use-pickle-list": Crafted(_pickled_weight([1]), "use_pickle"),
    "constants-use-pickle": Crafted(_constant("tensor_0", True), "use_pickle"),
    "opaque-object": Crafted(_constant("opaque_obj_0", True), "data/constants/opaque_obj_0"),
    "custom-object": Crafted(_constant("custom_obj_0", True), "data/constants/custom_obj_0"),
    "legacy-weights": Crafted(
        lambda d, m: _edit(d, {}, [("archive/data/weights/model.pt", _payload(m))]),
        "data/weights/model.pt"),
    "zip-slip-relative": Crafted(
        lambda d, m: _edit(d, {}, [("archive/../../escape", b"x")]), "archive/../../escape"),
    "zip-slip-absolute": Crafted(
        lambda d, m: _edit(d, {}, [("/tmp/edgesplit-escape", b"x")]), "/tmp/edgesplit-escape"),
    "unknown-entry": Crafted(
        lambda d, m: _edit(d, {}, [("archive/data/aotinductor/model/model.so", b"\x7fELF")]),
        "data/aotinductor/model/model.so"),
    "duplicate-entry": Crafted(
        lambda d, m: _edit(d, {}, [("archive/data/sample_inputs/model.pt", _payload(m))]),
        "data/sample_inputs/model.pt' twice"),
    "shape-expression": Crafted(_in_program(_shape_expression), "shape expression"),
    "pytree-enum-import": Crafted(_in_program(_pytree_enum), "pytree context"),
    "pytree-type-import": Crafted(_in_program(_pytree_type), f"{MARKER_MODULE}.Output"),
    "op-target": Crafted(_in_program(_op_target), "'torch.load'"),
    "guards-code": Crafted(_in_program(_guards), "guards_code"),
}

RUN_BY_TORCH = ("sample-inputs", "weights-use-pickle-true", "weights-use-pickle-1",
                "weights-use-pickle-yes", "constants-use-pickle", "opaque-object",
                "legacy-weights", "shape-expression", "pytree-enum-import")
"""Kinds that ``torch.export.load`` itself runs (their marker appears): the crafting works."""

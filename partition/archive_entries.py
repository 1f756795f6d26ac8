"""Reading the entries of a ``torch.export`` archive ourselves, admitting only known ones.

The archive is opened here, not by torch: every entry must be one of the kinds
``torch.export.save`` writes (exact names, stored uncompressed, no duplicates, no paths that
leave the archive), payload configs are checked field by field, weights and constants are
built from their raw storages with :func:`torch.frombuffer`, and the example inputs are
loaded with ``torch.load(weights_only=True)``. Nothing the file holds reaches ``pickle``.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch._export.serde.schema import Layout
from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
from torch.export.pt2_archive import constants as layout

from partition.errors import ModelLoadError

MODEL = "model"  # the name torch.export.save gives the one program it writes
_MODEL_JSON = layout.MODELS_FILENAME_FORMAT.format(MODEL)
_WEIGHTS_CONFIG = layout.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL)
_CONSTANTS_CONFIG = layout.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL)
_SAMPLE_INPUTS = layout.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL)
_WEIGHT_NAME = re.compile(re.escape(layout.WEIGHT_FILENAME_PREFIX) + r"\d+")
_CONSTANT_NAME = re.compile(re.escape(layout.TENSOR_CONSTANT_FILENAME_PREFIX) + r"\d+")
_ENTRY = re.compile(
    "|".join(
        [re.escape(name) for name in (
            ".data/serialization_id", ".data/version", layout.ARCHIVE_FORMAT_PATH,
            layout.ARCHIVE_VERSION_PATH, "byteorder", _MODEL_JSON, _WEIGHTS_CONFIG,
            _CONSTANTS_CONFIG, _SAMPLE_INPUTS,
        )]
        + [re.escape(layout.WEIGHTS_DIR) + _WEIGHT_NAME.pattern,
           re.escape(layout.CONSTANTS_DIR) + _CONSTANT_NAME.pattern]
    )
)
_PAYLOAD_KEYS = frozenset({"path_name", "is_param", "use_pickle", "tensor_meta"})
_TENSOR_META_KEYS = frozenset(
    {"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset", "layout"}
)
_REEXPORT = "export the model again with torch.export.save"


@dataclass(frozen=True)
class ArchiveEntries:
    """What an archive holds once admitted: the program's JSON document and its tensors."""

    program: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]]


def read_entries(data: bytes, origin: str) -> ArchiveEntries:
    """Admit the entries of the archive ``data``; ``origin`` names it in messages.

    Raises
    ------
    ModelLoadError
        Naming the entry, for any entry, field or value ``torch.export.save`` does not write.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as err:
        raise ModelLoadError(f"{origin} is truncated or corrupt ({err}); save it again") from err
    with archive:
        files = _admitted_names(archive, origin)
        reader = _Reader(archive, files, origin)
        if reader.text(layout.ARCHIVE_FORMAT_PATH) != layout.ARCHIVE_FORMAT_VALUE or (
            reader.text(layout.ARCHIVE_VERSION_PATH) != layout.ARCHIVE_VERSION_VALUE
        ):
            raise ModelLoadError(
                f"{origin} is a torch.export archive of another format or version; {_REEXPORT}"
            )
        if "byteorder" in files and reader.text("byteorder") != "little":
            raise ModelLoadError(f"{origin} holds big-endian tensors; {_REEXPORT} on this machine")
        program = reader.read_json(_MODEL_JSON, damaged=True)
        if not isinstance(program, dict):
            raise ModelLoadError(f"{origin} is a damaged torch.export archive; save it again")
        return ArchiveEntries(
            program=program,
            state_dict=reader.payloads(_WEIGHTS_CONFIG, layout.WEIGHTS_DIR, _WEIGHT_NAME),
            constants=reader.payloads(_CONSTANTS_CONFIG, layout.CONSTANTS_DIR, _CONSTANT_NAME),
            example_inputs=reader.sample_inputs(),
        )


def _admitted_names(archive: zipfile.ZipFile, origin: str) -> dict[str, zipfile.ZipInfo]:
    """The entries by their name inside the archive's one root folder, all of known kinds."""
    files: dict[str, zipfile.ZipInfo] = {}
    root = None
    for info in archive.infolist():
        name = info.filename
        head, _, rest = name.partition("/")
        parts = name.split("/")
        if "\\" in name or any(part in ("", ".", "..") for part in parts) or len(parts) < 2:
            raise ModelLoadError(
                f"{origin} holds an entry named {name!r}, which is not a path inside the "
                f"archive; {_REEXPORT}"
            )
        root = head if root is None else root
        if head != root or not _ENTRY.fullmatch(rest):
            raise ModelLoadError(
                f"{origin} holds {name!r}, which is not an entry torch.export.save writes; "
                f"{_REEXPORT}"
            )
        if rest in files:
            raise ModelLoadError(f"{origin} holds {name!r} twice; {_REEXPORT}")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ModelLoadError(
                f"{origin} holds {name!r} compressed or encrypted, which torch.export.save never "
                f"does; {_REEXPORT}"
            )
        files[rest] = info
    for required in (layout.ARCHIVE_FORMAT_PATH, layout.ARCHIVE_VERSION_PATH, _MODEL_JSON,
                     _WEIGHTS_CONFIG, _CONSTANTS_CONFIG, _SAMPLE_INPUTS):
        if required not in files:
            raise ModelLoadError(f"{origin} has no {required} entry; {_REEXPORT}")
    return files


class _Reader:
    """Reads admitted entries and turns each kind into plain values or tensors."""

    def __init__(
        self, archive: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo], origin: str
    ) -> None:
        self._archive, self._files, self._origin = archive, files, origin

    def read(self, name: str) -> bytes:
        try:
            return self._archive.read(self._files[name])
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            raise ModelLoadError(
                f"{self._origin} is truncated or corrupt at {name} ({err}); save it again"
            ) from err

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8", errors="replace").strip()

    def read_json(self, name: str, *, damaged: bool = False) -> Any:
        try:
            return json.loads(self.read(name))
        except (ValueError, RecursionError) as err:
            what = "is a damaged torch.export archive" if damaged else f"holds {name} as bad JSON"
            raise ModelLoadError(
                f"{self._origin} {what} ({type(err).__name__} in {name}); save it again"
            ) from err

    def payloads(self, config_name: str, folder: str, file_name: re.Pattern) -> dict:
        """The tensors a weights or constants config names, built from raw storages."""
        config = self.read_json(config_name)
        if not isinstance(config, dict) or set(config) != {"config"} or not isinstance(
            config["config"], dict
        ):
            self._refuse(config_name, "is not a payload config")
        storages: dict[str, torch.Tensor] = {}
        tensors: dict[str, torch.Tensor] = {}
        for fqn, entry in config["config"].items():
            where = f"{config_name} entry {fqn!r}"
            if not isinstance(entry, dict) or not set(entry) <= _PAYLOAD_KEYS:
                self._refuse(where, f"has fields other than {sorted(_PAYLOAD_KEYS)}")
            if "use_pickle" in entry and entry["use_pickle"] is not False:
                self._refuse(
                    where, "marks its payload use_pickle, and loading it would run code from "
                    "the file"
                )
            path_name = entry.get("path_name")
            if not isinstance(path_name, str) or not file_name.fullmatch(path_name) or (
                folder + path_name not in self._files
            ):
                self._refuse(where, "names no raw tensor entry of the archive")
            is_param = entry.get("is_param", False)
            if not isinstance(is_param, bool):
                self._refuse(where, "has an is_param that is not true or false")
            meta = _TensorMeta.parse(entry.get("tensor_meta"), where, self._origin)
            if path_name not in storages:
                storages[path_name] = self._storage(folder + path_name, meta)
            try:
                tensor = torch.as_strided(
                    storages[path_name], meta.sizes, meta.strides, meta.storage_offset
                )
            except RuntimeError as err:
                self._refuse(where, f"has sizes and strides its data does not fit ({err})")
            tensors[fqn] = (
                torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
                if is_param else tensor
            )
        return tensors

    def _storage(self, name: str, meta: _TensorMeta) -> torch.Tensor:
        raw = self.read(name)
        if len(raw) % torch.empty((), dtype=meta.dtype).element_size():
            self._refuse(name, f"is not a whole number of {meta.dtype} elements")
        try:
            flat = torch.frombuffer(bytearray(raw), dtype=meta.dtype) if raw else (
                torch.empty(0, dtype=meta.dtype)
            )
        except (RuntimeError, TypeError, ValueError) as err:
            self._refuse(name, f"is not a raw {meta.dtype} storage ({err})")
        return flat.requires_grad_(meta.requires_grad) if meta.dtype.is_floating_point else flat

    def sample_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example inputs, loaded by the unpickler that admits only tensors and plain data."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the protocol warning of a foreign pickle
                loaded = torch.load(io.BytesIO(self.read(_SAMPLE_INPUTS)), weights_only=True)
        except Exception as err:
            raise ModelLoadError(
                f"{self._origin} holds {_SAMPLE_INPUTS}, which only loads by running pickled "
                f"code ({type(err).__name__}); export it again with tensor example inputs"
            ) from err
        if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], tuple)
                and isinstance(loaded[1], dict)):
            self._refuse(_SAMPLE_INPUTS, "is not a pair of example args and kwargs")
        return loaded

    def _refuse(self, where: str, why: str) -> NoReturn:
        raise ModelLoadError(f"{self._origin}: {where} {why}; {_REEXPORT}")


@dataclass(frozen=True)
class _TensorMeta:
    """A payload's tensor metadata: plain ints, a CPU device, the strided layout."""

    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int
    requires_grad: bool

    @classmethod
    def parse(cls, meta: Any, where: str, origin: str) -> _TensorMeta:
        def refuse(why: str) -> ModelLoadError:
            return ModelLoadError(f"{origin}: {where} {why}; {_REEXPORT}")

        if not isinstance(meta, dict) or set(meta) != _TENSOR_META_KEYS:
            raise refuse(f"has no tensor_meta with exactly {sorted(_TENSOR_META_KEYS)}")
        dtype = meta["dtype"]
        if type(dtype) is not int or dtype not in _SERIALIZE_TO_TORCH_DTYPE:
            raise refuse(f"has an unknown dtype {dtype!r}")
        if meta["layout"] != Layout.Strided or type(meta["layout"]) is not int:
            raise refuse("is not a strided tensor")
        if meta["device"] != {"type": "cpu", "index": None}:
            raise refuse(f"is stored for device {meta['device']!r}, not the CPU")
        if not isinstance(meta["requires_grad"], bool):
            raise refuse("has a requires_grad that is not true or false")
        sizes, strides = _ints(meta["sizes"]), _ints(meta["strides"])
        offset = _ints([meta["storage_offset"]])
        if sizes is None or strides is None or offset is None or len(sizes) != len(strides):
            raise refuse("has sizes, strides or an offset that are not plain non-negative ints")
        return cls(_SERIALIZE_TO_TORCH_DTYPE[dtype], sizes, strides, offset[0],
                   meta["requires_grad"])


def _ints(values: Any) -> tuple[int, ...] | None:
    """``[{"as_int": 3}, ...]`` as ``(3, ...)``, or None unless every item is exactly that."""
    if not isinstance(values, list):
        return None
    out = []
    for value in values:
        if not (isinstance(value, dict) and set(value) == {"as_int"}
                and type(value["as_int"]) is int and 0 <= value["as_int"] < 2**62):
            return None
        out.append(value["as_int"])
    return tuple(out)

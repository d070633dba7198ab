"""The safetensors file format and the Hugging Face checkpoint layout, read by hand.

A ``.safetensors`` file is: 8 bytes, the header length ``N`` as little-endian u64;
``N`` bytes of JSON ``{name: {"dtype": "BF16", "shape": [2048, 7168],
"data_offsets": [begin, end]}, "__metadata__": {...}}``; then the data region, where a
tensor's bytes are ``[8 + N + begin, 8 + N + end)`` of the file, C order, little endian.

A sharded checkpoint adds ``model.safetensors.index.json``:
``{"metadata": {"total_size": ...}, "weight_map": {tensor name: shard file name}}``.

Parsing the header ourselves tells the loader exactly which byte range each tensor
occupies, so it reads those bytes and nothing else. Entries are checked lazily, when a
tensor is asked for: a checkpoint may hold tensors of dtypes we do not know (and never
need) beside the experts.
"""

from __future__ import annotations

import glob
import json
import math
import os
import reprlib
from dataclasses import dataclass
from typing import Any

import torch

from elastic_ep.errors import CheckpointError, CorruptCheckpointError, MissingFileError, MissingTensorError

INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000
"""The safetensors library refuses larger headers too; a bigger length means garbage."""
MAX_DIMS = 64
"""Dimensions of a tensor at most: more is garbage (and would make its byte count a
number too long to print)."""
MAX_JSON_FILE_BYTES = MAX_HEADER_BYTES
"""An index or ``config.json`` larger than this is not one (DeepSeek-V3's index, naming
about 90k tensors, is 9 MB)."""

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
# Present in newer torch releases only.
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 60, 60


def brief(value: Any) -> str:
    """A short ``repr`` of a value parsed from a file, for error messages: bounded in
    depth and length, so a huge or deeply nested value cannot flood (or overflow) the
    message that reports it."""
    return _BRIEF.repr(value)


def load_json(raw: bytes, path: str, what: str, fix: str) -> Any:
    """``raw`` parsed as JSON. Anything that is not JSON (bad UTF-8, syntax, an integer
    of thousands of digits, nesting deeper than the parser's recursion limit) raises
    :class:`CorruptCheckpointError` naming ``path``, ``what`` it should be and the ``fix``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        why = "nested deeper than a JSON reader follows"
    except (UnicodeDecodeError, ValueError) as e:
        why = str(e)[:200]
    raise CorruptCheckpointError(f"{path}: not {what}: {why}; {fix}")


def read_json_file(path: str, what: str, fix: str) -> Any:
    """The JSON document in the file ``path`` (at most :data:`MAX_JSON_FILE_BYTES`).
    ``FileNotFoundError`` propagates, for the caller to say which file is missing;
    another ``OSError`` raises :class:`CheckpointError`, garbage
    :class:`CorruptCheckpointError`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_FILE_BYTES:
                raise CorruptCheckpointError(
                    f"{path}: {size} bytes, more than {MAX_JSON_FILE_BYTES} for {what}; {fix}")
            raw = f.read(MAX_JSON_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e}); check that it is a readable file") from e
    if len(raw) > MAX_JSON_FILE_BYTES:  # grew while being read
        raise CorruptCheckpointError(f"{path}: more than {MAX_JSON_FILE_BYTES} bytes for {what}; {fix}")
    return load_json(raw, path, what, fix)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``[begin, end)`` as absolute file offsets.

    Example: ``TensorInfo("model.layers.0.mlp.experts.3.up_proj.weight", "BF16",
    (32, 64), 8 + 1024 + 4096, 8 + 1024 + 8192)``. ``dtype`` is ``None`` for a dtype
    string elastic-ep does not know.
    """

    name: str
    dtype_str: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype_str)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file.

    Attributes:
        path: the file.
        file_size: its size when the header was read.
        data_start: ``8 + N``, where the data region begins (also the header's bytes).
        entries: the raw JSON entries, tensor name -> dict (checked by :meth:`tensor`).
    """

    path: str
    file_size: int
    data_start: int
    entries: dict[str, Any]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> TensorInfo:
        """The checked entry of ``name``: its dtype string, shape and offsets agree with
        each other and lie inside the file. Raises :class:`MissingTensorError` or
        :class:`CorruptCheckpointError`."""
        if name not in self.entries:
            raise MissingTensorError(
                f"{self.path}: no tensor {name!r} in its header ({len(self.entries)} tensors); "
                "if an index file names this shard for it, the index is stale: regenerate it"
            )
        e = self.entries[name]
        try:
            dtype_str = e["dtype"]
            shape = tuple(e["shape"])
            begin, end = e["data_offsets"]
            ok = (
                isinstance(dtype_str, str)
                and len(shape) <= MAX_DIMS
                and all(type(d) is int and 0 <= d < 2**64 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptCheckpointError(
                f"{self.path}: header entry of {name!r} is malformed: {brief(e)}; expected "
                '{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}; '
                "the file is damaged: copy it again from the source checkpoint"
            )
        dtype = DTYPES.get(dtype_str)
        if dtype is not None:
            want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if end - begin != want:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor {name!r} is {dtype_str} {brief(list(shape))} = {brief(want)} bytes but "
                    f"its data_offsets [{begin}, {end}] span {end - begin} bytes; the header is "
                    "damaged: copy the file again from the source checkpoint"
                )
        if self.data_start + end > self.file_size:
            raise CorruptCheckpointError(
                f"{self.path}: tensor {name!r} ends at byte {self.data_start + end} but the file "
                f"has {self.file_size} bytes; the file is truncated: copy it again"
            )
        return TensorInfo(name, dtype_str, shape, self.data_start + begin, self.data_start + end)


def read_header(fd: int, path: str) -> SafetensorsHeader:
    """Parse the header of the open file ``fd`` (``path`` names it in errors)."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise CorruptCheckpointError(
            f"{path}: {size} bytes, too short for a safetensors file (8-byte header length "
            "first); the file is truncated or not safetensors"
        )
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CorruptCheckpointError(
            f"{path}: header length {n} does not fit the file of {size} bytes (at most "
            f"{min(MAX_HEADER_BYTES, max(size - 8, 0))}); the file is truncated or not safetensors"
        )
    raw = os.pread(fd, n, 8)
    fix = "the file is damaged: copy it again from the source checkpoint"
    if len(raw) != n:
        raise CorruptCheckpointError(f"{path}: short read of the header: {len(raw)} of {n} bytes; {fix}")
    entries = load_json(raw, path, f"a JSON object in its {n}-byte header", fix)
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(
            f"{path}: the {n}-byte header is a JSON {type(entries).__name__}, not a JSON object; {fix}")
    entries.pop("__metadata__", None)
    return SafetensorsHeader(path, size, 8 + n, entries)


class CheckpointFiles:
    """Which file of a checkpoint directory holds each tensor.

    A directory with one ``*.safetensors.index.json`` is sharded: its ``weight_map``
    decides. Otherwise the directory must hold exactly one ``.safetensors`` file, which
    then holds every tensor.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise MissingFileError(
                f"{self.directory}: checkpoint directory not found; pass the directory that "
                "holds model.safetensors or model.safetensors.index.json"
            )
        indexes = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*" + INDEX_SUFFIX)))
        files = sorted(glob.glob(os.path.join(glob.escape(self.directory), "*.safetensors")))
        self.index_path: str | None = None
        self.single_file: str | None = None
        self.weight_map: dict[str, str] = {}
        if len(indexes) == 1:
            self.index_path = indexes[0]
            self.weight_map = self._read_index(self.index_path)
        elif len(indexes) > 1:
            raise MissingFileError(
                f"{self.directory}: several index files {[os.path.basename(i) for i in indexes]}; "
                "keep the one of the checkpoint to serve"
            )
        elif len(files) == 1:
            self.single_file = files[0]
        else:
            raise MissingFileError(
                f"{self.directory}: expected one .safetensors file or a model{INDEX_SUFFIX}, found "
                f"{len(files)} .safetensors files and no index; "
                + ("add the index file of the sharded checkpoint" if files else "download the checkpoint")
            )

    @staticmethod
    def _read_index(path: str) -> dict[str, str]:
        fix = "copy it again from the source checkpoint"
        try:
            doc = read_json_file(path, "a valid index", 'expected JSON with "weight_map"; ' + fix)
        except FileNotFoundError:
            raise MissingFileError(f"{path}: index file vanished while being read; {fix}") from None
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CorruptCheckpointError(
                f"{path}: not a valid index (weight_map is {brief(weight_map)}); expected JSON with "
                f'"weight_map": {{tensor name: shard file}}; {fix}'
            )
        # A shard outside the directory is never part of this checkpoint.
        escaping = sorted({v for v in weight_map.values() if os.path.isabs(v) or ".." in v.split("/")})
        if escaping:
            raise CorruptCheckpointError(
                f"{path}: weight_map names shards outside the checkpoint directory {brief(escaping)}; "
                f"shard names are relative file names: {fix}"
            )
        return weight_map

    def file_of(self, name: str) -> str:
        """The path of the file holding tensor ``name``."""
        if self.single_file is not None:
            return self.single_file
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise MissingTensorError(
                f"{self.index_path}: no tensor {name!r} in weight_map ({len(self.weight_map)} "
                "tensors); check the naming scheme, the MoE layer ids and the expert count"
            ) from None
        return os.path.join(self.directory, shard)

    def files(self) -> list[str]:
        """Every file the checkpoint names."""
        if self.single_file is not None:
            return [self.single_file]
        return sorted({os.path.join(self.directory, f) for f in self.weight_map.values()})

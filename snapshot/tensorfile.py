"""Reading safetensors headers by hand, so the loader needs neither transformers nor safetensors.

Layout of a safetensors file: 8 bytes little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data;
offsets are relative to the first byte after the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from snapshot.errors import SnapshotError

# Large enough for any real header (a 1000-layer model has ~100k tensors, ~10 MB of JSON).
MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
CODE_OF_DTYPE: dict[str, str] = {name: code for code, (name, _) in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file: where its bytes are, relative to the file's data section."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class TensorFile:
    """A parsed safetensors header: the data section starts at byte `data_start` of the file."""

    path: Path
    data_start: int
    data_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> TensorFile:
    """Parse and check a safetensors header; any inconsistency raises SnapshotError."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SnapshotError(f"{name}: {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise SnapshotError(
                    f"{name}: header length {header_len} does not fit in a {size}-byte file"
                    " (truncated, or not a safetensors file)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise SnapshotError(f"{name}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{name}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"{name}: header is not a JSON object")
    data_start = 8 + header_len
    data_bytes = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SnapshotError(f"{name}: __metadata__ is not a JSON object")
    tensors = {key: _entry(name, key, value, data_bytes) for key, value in header.items()}
    return TensorFile(path, data_start, data_bytes, tensors, metadata)


def _entry(file_name: str, key: str, value: object, data_bytes: int) -> TensorEntry:
    where = f"{file_name}: tensor {key}"
    if not isinstance(value, dict):
        raise SnapshotError(f"{where}: entry is not a JSON object")
    code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if code not in DTYPES:
        raise SnapshotError(f"{where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SnapshotError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SnapshotError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
    dtype, itemsize = DTYPES[code]
    begin, end = offsets
    if end > data_bytes:
        raise SnapshotError(
            f"{where}: data ends at byte {end} past the {data_bytes}-byte data section (truncated?)"
        )
    if end - begin != math.prod(shape) * itemsize:
        raise SnapshotError(f"{where}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    return TensorEntry(key, dtype, tuple(shape), begin, end)

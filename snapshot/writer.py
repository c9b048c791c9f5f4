"""Writing weights as safetensors shards, tensor by tensor, with a progress callback.

Written by hand rather than with safetensors.save_file so a multi-GB shard reports progress
and never needs a second in-memory copy.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshot.manifest import weight_file_names
from snapshot.tensorfile import CODE_OF_DTYPE

DEFAULT_SHARD_BYTES = 2 * 1024**3
HEADER_ALIGN = 8  # the data section starts 8-byte aligned, so every tensor is element-aligned


@dataclass(frozen=True)
class Shard:
    file: str
    names: list[str]
    nbytes: int


def plan_shards(sizes: dict[str, int], shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Shard]:
    """Greedy split in the given order; a tensor larger than shard_bytes gets a shard alone."""
    groups: list[list[str]] = [[]]
    totals = [0]
    for name, size in sizes.items():
        if groups[-1] and totals[-1] + size > shard_bytes:
            groups.append([])
            totals.append(0)
        groups[-1].append(name)
        totals[-1] += size
    files = weight_file_names(len(groups))
    return [Shard(f, g, t) for f, g, t in zip(files, groups, totals, strict=True)]


def write_shard(path: Path, tensors: dict[str, Any], on_bytes: Callable[[int], Any]) -> None:
    """Write `tensors` (name -> contiguous torch.Tensor) as one safetensors file."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": CODE_OF_DTYPE[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            # uint8 view: numpy has no bfloat16, and the bytes are all we need.
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            on_bytes(data.nbytes)

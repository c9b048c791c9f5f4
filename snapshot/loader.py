"""The worker's weight loader. It never imports transformers (tests check sys.modules).

CPU: every tensor is a zero-copy view of a private mmap of its file.
CUDA (or copy=True): one buffer for all bytes, filled by snapshot.device_copy; tensors are views
into it.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snapshot import manifest as mf
from snapshot.device_copy import plan_copy, stream_into
from snapshot.errors import SnapshotError
from snapshot.page_cache import prefetch_into_page_cache
from snapshot.quant.format import QuantizedTensor, from_manifest
from snapshot.tensorfile import TensorEntry, TensorFile, read_header

# Part of the loader's API; it lives apart so it can run before torch is imported.
__all__ = ["LoadedSnapshot", "load_snapshot", "prefetch_into_page_cache", "typed_view"]


@dataclass
class LoadedSnapshot:
    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    generation_config: dict[str, Any]
    # Dense tensors, and a QuantizedTensor for each weight the manifest's "quantization" names.
    weights: dict[str, torch.Tensor | QuantizedTensor]
    timings: dict[str, float]
    # The mmaps or the device buffer the weights view; they live as long as this object.
    backing: list[Any] = field(default_factory=list, repr=False)


def load_snapshot(
    path: str | os.PathLike[str], device: str = "cpu", copy: bool = False
) -> LoadedSnapshot:
    """Map (CPU) or stream (CUDA) the weights of the snapshot at `path`.

    copy=True on the CPU streams the bytes into one owned buffer instead of mapping the files,
    so no page fault is left for the first forward pass.
    """
    start = time.perf_counter()
    path = Path(path)
    target = _device(device)
    manifest = mf.load_manifest(path)
    config = _json_object(path / mf.CONFIG)
    generation_config = _json_object(path / mf.GENERATION_CONFIG)
    files = [read_header(path / name) for name in mf.weight_files(manifest)]
    _check_against_manifest(manifest, files)
    timings = {"headers_s": time.perf_counter() - start}

    if target.type == "cpu" and not copy:
        weights, backing = _map_files(files)
    else:
        weights, backing = _stream_files(files, target, timings)
    weights = _assemble_quantized(manifest, weights)
    timings["total_s"] = time.perf_counter() - start
    timings["bytes"] = float(sum(f.data_bytes for f in files))
    return LoadedSnapshot(path, manifest, config, generation_config, weights, timings, backing)


def _json_object(path: Path) -> dict[str, Any]:
    value = mf.read_json(path)
    if not isinstance(value, dict):
        raise SnapshotError(f"{path.name}: not a JSON object")
    return value


def _device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise SnapshotError(f"device {device!r}: {exc}") from exc
    if target.type not in ("cpu", "cuda"):
        raise SnapshotError(f"device {device!r}: the loader supports cpu and cuda")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise SnapshotError(f"device {device!r}: CUDA is not available")
    return target


def _check_against_manifest(manifest: dict[str, Any], files: list[TensorFile]) -> None:
    found = {name: file for file in files for name in file.tensors}
    for name, listed in manifest["tensors"].items():
        if name not in found:
            raise SnapshotError(f"{listed.get('file')}: tensor {name} is missing")


def _assemble_quantized(
    manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Replace each quantized weight's parts by one QuantizedTensor under the weight's name."""
    quantization = manifest.get("quantization") or {}
    weights: dict[str, torch.Tensor | QuantizedTensor] = dict(tensors)
    for name, entry in quantization.items():
        weights[name] = from_manifest(name, entry, tensors)
        for key in ("qweight", "scales", "offsets"):
            if entry.get(key) is not None:
                weights.pop(entry[key], None)
    return weights


def _map_files(files: list[TensorFile]) -> tuple[dict[str, torch.Tensor], list[Any]]:
    weights: dict[str, torch.Tensor] = {}
    backing = []
    for file in files:
        try:
            with open(file.path, "rb") as f:
                # ACCESS_COPY (a private mapping) makes the buffer writable for torch without any
                # write reaching the file; pages are shared with the page cache until written.
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{file.path.name}: cannot map ({exc})") from exc
        if len(mapped) != file.data_start + file.data_bytes:
            raise SnapshotError(f"{file.path.name}: changed size while being loaded")
        raw = torch.frombuffer(mapped, dtype=torch.uint8)
        backing.append(mapped)
        for entry in file.tensors.values():
            weights[entry.name] = typed_view(raw, file.data_start, entry, file.path.name)
    return weights, backing


def _stream_files(
    files: list[TensorFile], target: torch.device, timings: dict[str, float]
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    plan = plan_copy(files)
    start = time.perf_counter()
    buffer = torch.empty(plan.total_bytes, dtype=torch.uint8, device=target)
    timings["allocate_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stream_into(files, plan, buffer)
    timings["stream_s"] = time.perf_counter() - start
    weights = {
        entry.name: typed_view(buffer, base, entry, file.path.name)
        for file, base in zip(files, plan.file_bases, strict=True)
        for entry in file.tensors.values()
    }
    return weights, [buffer]


def typed_view(raw: torch.Tensor, base: int, entry: TensorEntry, file_name: str) -> torch.Tensor:
    """The tensor `entry` as a view of the byte tensor `raw`, whose byte `base` is data byte 0."""
    try:
        dtype = getattr(torch, entry.dtype)
    except AttributeError as exc:
        raise SnapshotError(
            f"{file_name}: tensor {entry.name} has dtype {entry.dtype}, unknown to this torch"
        ) from exc
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype, device=raw.device)
    data = raw[base + entry.begin : base + entry.end]
    try:
        return data.view(dtype).view(entry.shape)
    except RuntimeError:
        # Foreign files may place a tensor off its element alignment: copy that one.
        return data.clone().view(dtype).view(entry.shape)

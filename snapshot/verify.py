"""`thaw snapshot verify`: every check a worker would otherwise fail on, at start-up, late.

Each problem is one line naming the file; verify reports all it finds, not just the first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snapshot import manifest as mf
from snapshot.architectures import required_tensors
from snapshot.errors import SnapshotError
from snapshot.tensorfile import read_header


def verify_snapshot(directory: Path) -> list[str]:
    """Return the problems found (empty when the snapshot is sound)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    try:
        manifest = mf.load_manifest(directory)
    except SnapshotError as exc:
        return [str(exc)]
    damaged = _check_files(directory, manifest)
    problems = list(damaged.values())
    problems += _check_tensors(directory, manifest, set(damaged))
    if mf.TOKENIZER not in damaged:
        problems += _check_tokenizer(directory / mf.TOKENIZER)
    return problems


def _check_files(directory: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """File name -> its problem, for every file that is missing, truncated or corrupted."""
    damaged = {}
    listed = {entry["name"] for entry in manifest["files"]}
    # Weight files are listed, or the manifest did not load (manifest.parse_manifest).
    for name in mf.REQUIRED_FILES:
        if name not in listed:
            damaged[name] = f"{name}: missing from {mf.MANIFEST}"
    for entry in manifest["files"]:
        name, path = entry["name"], directory / entry["name"]
        if not path.is_file():
            damaged[name] = f"{name}: missing"
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            damaged[name] = (
                f"{name}: {size} bytes, manifest says {entry['size']} (truncated or replaced)"
            )
        elif mf.sha256_file(path) != entry["sha256"]:
            damaged[name] = f"{name}: sha256 differs from the manifest (corrupted)"
    return damaged


def _check_tensors(directory: Path, manifest: dict[str, Any], damaged: set[str]) -> list[str]:
    try:
        config = mf.read_json(directory / mf.CONFIG)
        if not isinstance(config, dict):
            raise SnapshotError(f"{mf.CONFIG}: not a JSON object")
        required = required_tensors(config)
    except SnapshotError as exc:
        return [] if mf.CONFIG in damaged else [str(exc)]
    if config["architectures"][0] != manifest["architecture"]:
        return [f"{mf.CONFIG}: architecture differs from the manifest's {manifest['architecture']}"]
    problems = []
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    try:
        files = mf.weight_files(manifest)
    except SnapshotError as exc:
        return [str(exc)]
    for file in files:
        if file in damaged:
            continue
        try:
            header = read_header(directory / file)
        except SnapshotError as exc:
            problems.append(str(exc))
            continue
        for name, entry in header.tensors.items():
            found[name] = (file, entry.dtype, entry.shape)
    want_dtype = manifest["dtype"]
    quantization = manifest.get("quantization") or {}
    parts = {
        entry[key]
        for entry in quantization.values()
        for key in ("qweight", "scales", "offsets")
        if entry.get(key)
    }
    for name, shape in required.items():
        listed = manifest["tensors"].get(name)
        if name in quantization:
            entry = quantization[name]
            parts_files = {manifest["tensors"][entry[k]]["file"] for k in _parts(entry)}
            if not parts_files & damaged:  # a damaged file is reported once, above
                problems += _check_quantized(directory, name, entry, shape, found)
            continue
        if name not in found:
            where = listed.get("file") if isinstance(listed, dict) else None
            if where not in damaged:
                problems.append(f"{where or 'weights'}: tensor {name} is missing")
            continue
        file, dtype, actual = found[name]
        if actual != shape:
            problems.append(
                f"{file}: tensor {name} has shape {list(actual)}, expected {list(shape)}"
            )
        if dtype != want_dtype:
            problems.append(f"{file}: tensor {name} is {dtype}, the snapshot dtype is {want_dtype}")
    for name in sorted(quantization.keys() - required.keys()):
        problems.append(f"{mf.MANIFEST}: quantized weight {name} is not part of the architecture")
    for name in sorted(found.keys() - required.keys() - parts):
        architecture = manifest["architecture"]
        problems.append(f"{found[name][0]}: tensor {name} is not part of {architecture}")
    return problems


def _check_quantized(
    directory: Path,
    name: str,
    entry: dict[str, Any],
    shape: tuple[int, ...],
    found: dict[str, tuple[str, str, tuple[int, ...]]],
) -> list[str]:
    """The parts exist with the shapes and dtypes the scheme needs, the logical shape is the
    architecture's, and the scales and offsets are finite numbers (a flipped exponent bit in a
    scale would otherwise pass unnoticed where a checksum was recomputed)."""
    import torch

    from snapshot.quant.format import check_finite_scales, from_manifest

    keys = _parts(entry)
    missing = [entry[k] for k in keys if entry[k] not in found]
    if missing:
        return [f"weights: tensor {part} is missing" for part in missing]
    meta = {
        entry[k]: torch.empty(
            found[entry[k]][2], dtype=getattr(torch, found[entry[k]][1]), device="meta"
        )
        for k in keys
    }
    try:
        quantized = from_manifest(name, entry, meta)
    except SnapshotError as exc:
        return [f"{found[entry['qweight']][0]}: {exc}"]
    if tuple(quantized.shape) != tuple(shape):
        return [
            f"{found[entry['qweight']][0]}: quantized {name} has shape {list(quantized.shape)},"
            f" expected {list(shape)}"
        ]
    quantized.scales = _read_tensor(directory, found[entry["scales"]][0], entry["scales"])
    if entry.get("offsets"):
        quantized.offsets = _read_tensor(directory, found[entry["offsets"]][0], entry["offsets"])
    problem = check_finite_scales(name, quantized)
    return [f"{found[entry['scales']][0]}: {problem}"] if problem else []


def _parts(entry: dict[str, Any]) -> list[str]:
    return [key for key in ("qweight", "scales", "offsets") if entry.get(key)]


def _read_tensor(directory: Path, file: str, name: str) -> Any:
    """One (small) tensor's values, read from its file without mapping the rest."""
    import torch

    header = read_header(directory / file)
    entry = header.tensors[name]
    with open(directory / file, "rb") as f:
        f.seek(header.data_start + entry.begin)
        raw = bytearray(f.read(entry.nbytes))
    if not raw:
        return torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
    return torch.frombuffer(raw, dtype=getattr(torch, entry.dtype)).view(entry.shape)


def _check_tokenizer(path: Path) -> list[str]:
    from tokenizers import Tokenizer

    if not path.is_file():
        return [f"{path.name}: missing"]
    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own untyped Exception on bad input
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"{path.name}: does not load ({first_line})"]
    return []

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
    for name, shape in required.items():
        listed = manifest["tensors"].get(name)
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
    for name in sorted(found.keys() - required.keys()):
        architecture = manifest["architecture"]
        problems.append(f"{found[name][0]}: tensor {name} is not part of {architecture}")
    return problems


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

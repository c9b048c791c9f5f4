"""manifest.json: what a snapshot holds, and the checksums that prove it.

The Rust gateway and the worker read the same directory; the names below are the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from snapshot.errors import SnapshotError

FORMAT_VERSION = 1
# Version 2 adds "quantization" (snapshot/quant/format.py): a reader of version 1 would see the
# quantized parts as unknown tensors, so such snapshots say 2 and dense ones stay 1.
QUANTIZED_FORMAT_VERSION = 2
KNOWN_FORMAT_VERSIONS = frozenset({1, 2})

MANIFEST = "manifest.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
REQUIRED_FILES = (CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG)

HASH_CHUNK = 16 * 1024 * 1024


def weight_file_names(shard_count: int) -> list[str]:
    """Hugging Face's names: one file, or model-0000i-of-0000N.safetensors."""
    if shard_count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{shard_count:05d}.safetensors" for i in range(1, shard_count + 1)]


def sha256_file(path: Path, on_bytes: Callable[[int], Any] | None = None) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if on_bytes is not None:
                on_bytes(n)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Read a JSON file of a snapshot; failures name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SnapshotError(f"{path.name}: missing") from exc
    except OSError as exc:
        raise SnapshotError(f"{path.name}: cannot read ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"{path.name}: not valid JSON ({exc})") from exc


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def parse_manifest(value: Any) -> dict[str, Any]:
    """Check the parts of a manifest every reader relies on; return it unchanged."""
    if not isinstance(value, dict):
        raise SnapshotError(f"{MANIFEST}: not a JSON object")
    version = value.get("format_version")
    if version not in KNOWN_FORMAT_VERSIONS:
        known = ", ".join(str(v) for v in sorted(KNOWN_FORMAT_VERSIONS))
        raise SnapshotError(
            f"{MANIFEST}: unknown format_version {version!r} (this thaw reads {known})"
        )
    files = value.get("files")
    if not isinstance(files, list) or not all(_is_file_entry(f) for f in files):
        raise SnapshotError(f"{MANIFEST}: 'files' is not a list of {{name, size, sha256}}")
    for entry in files:
        _check_name("file name", entry["name"])
    tensors = value.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("file"), str) for t in tensors.values()
    ):
        raise SnapshotError(f"{MANIFEST}: 'tensors' is not an object of {{file, dtype, shape}}")
    # Tensor files are opened and mapped by the loader: the same rule, and each must be one of
    # the checksummed files, so nothing is read that the manifest does not vouch for.
    listed = {entry["name"] for entry in files}
    for name in sorted({t["file"] for t in tensors.values()}):
        _check_name("tensor file", name)
        if name not in listed:
            raise SnapshotError(f"{MANIFEST}: tensor file {name!r} is not listed in 'files'")
    for key in ("architecture", "dtype"):
        if not isinstance(value.get(key), str):
            raise SnapshotError(f"{MANIFEST}: '{key}' is missing")
    _check_quantization(value, version)
    return value


def _check_quantization(value: dict[str, Any], version: int) -> None:
    """Each quantized weight names its parts, and every part is one of the listed tensors."""
    quantization = value.get("quantization")
    if quantization is None:
        if version == QUANTIZED_FORMAT_VERSION:
            raise SnapshotError(f"{MANIFEST}: format_version 2 without 'quantization'")
        return
    if version != QUANTIZED_FORMAT_VERSION or not isinstance(quantization, dict):
        raise SnapshotError(f"{MANIFEST}: 'quantization' needs format_version 2 and an object")
    tensors = value["tensors"]
    for name, entry in quantization.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("scheme"), str):
            raise SnapshotError(f"{MANIFEST}: quantization of {name} has no 'scheme'")
        for key in ("qweight", "scales", "offsets"):
            part = entry.get(key)
            if part is None and key == "offsets":
                continue
            if not isinstance(part, str) or part not in tensors:
                raise SnapshotError(
                    f"{MANIFEST}: quantization of {name}: {key} {part!r} is not a listed tensor"
                )


def _check_name(kind: str, name: str) -> None:
    """Names come from a possibly remote manifest: a plain name inside the snapshot directory
    (no separator, no parent, not absolute, not the manifest itself)."""
    if name != os.path.basename(name) or name in ("", ".", "..", MANIFEST) or "\0" in name:
        raise SnapshotError(f"{MANIFEST}: {kind} {name!r} is not allowed")


def manifest_sha256(raw: bytes) -> str:
    """The digest that pins a snapshot: manifest.json's bytes hold every file's sha256."""
    return hashlib.sha256(raw).hexdigest()


def load_manifest(directory: Path) -> dict[str, Any]:
    return parse_manifest(read_json(Path(directory) / MANIFEST))


def weight_files(manifest: dict[str, Any]) -> list[str]:
    """The weight files a manifest's tensors live in, in order."""
    names = {t["file"] for t in manifest["tensors"].values()}
    if not names:
        raise SnapshotError(f"{MANIFEST}: 'tensors' does not name the weight files")
    return sorted(names)


def _is_file_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
    )

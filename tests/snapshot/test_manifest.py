"""Hostile manifests: every name a manifest gives stays inside the snapshot and is checksummed.

A manifest may come from a bucket someone else can write. Its tensor files are opened and mapped
by the worker, so each must be a plain name in the directory and one of the files whose sha256
the manifest lists; verify and the loader both refuse anything else, before reading it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapshot import manifest as mf
from snapshot.errors import SnapshotError
from snapshot.loader import load_snapshot
from snapshot.verify import verify_snapshot

Edit = Callable[[Path, dict[str, Any]], None]


def point_tensors_at(name: str) -> Edit:
    """Every tensor now lives in `name` (the files list stays sound)."""

    def apply(d: Path, manifest: dict[str, Any]) -> None:
        for tensor in manifest["tensors"].values():
            tensor["file"] = name

    return apply


def plant_outside(d: Path, name: str) -> Path:
    """A real copy of the weights outside the snapshot, where a hostile name points."""
    target = (d / name) if not Path(name).is_absolute() else Path(name)
    shutil.copy(d / "model.safetensors", target)
    return target


def unlisted_tensor_file(d: Path, manifest: dict[str, Any]) -> None:
    shutil.copy(d / "model.safetensors", d / "extra.safetensors")
    for tensor in manifest["tensors"].values():
        tensor["file"] = "extra.safetensors"


def tensor_file_is_the_manifest(d: Path, manifest: dict[str, Any]) -> None:
    for tensor in manifest["tensors"].values():
        tensor["file"] = "manifest.json"


def listed_name(name: str) -> Edit:
    def apply(d: Path, manifest: dict[str, Any]) -> None:
        manifest["files"].append({"name": name, "size": 1, "sha256": "0" * 64})

    return apply


def hostile_cases(outside: Path) -> list[tuple[str, Edit, str]]:
    return [
        (
            "tensor file in the parent directory",
            point_tensors_at("../outside.safetensors"),
            "tensor file '../outside.safetensors' is not allowed",
        ),
        (
            "absolute tensor file",
            point_tensors_at(str(outside)),
            f"tensor file '{outside}' is not allowed",
        ),
        (
            "tensor file in a subdirectory",
            point_tensors_at("sub/model.safetensors"),
            "tensor file 'sub/model.safetensors' is not allowed",
        ),
        (
            "unlisted tensor file",
            unlisted_tensor_file,
            "tensor file 'extra.safetensors' is not listed in 'files'",
        ),
        (
            "the manifest as a tensor file",
            tensor_file_is_the_manifest,
            "tensor file 'manifest.json' is not allowed",
        ),
        (
            "absolute file name",
            listed_name("/etc/passwd"),
            "file name '/etc/passwd' is not allowed",
        ),
        ("parent file name", listed_name(".."), "file name '..' is not allowed"),
    ]


CASE_IDS = [case[0] for case in hostile_cases(Path("/x"))]


@pytest.mark.parametrize("case", range(len(CASE_IDS)), ids=CASE_IDS)
def test_hostile_manifests_are_refused_by_verify_and_load(
    tiny_llama_copy: Path, tmp_path: Path, case: int
) -> None:
    outside = tmp_path / "elsewhere" / "outside.safetensors"
    outside.parent.mkdir()
    _, edit, expected = hostile_cases(outside)[case]
    plant_outside(tiny_llama_copy, "../outside.safetensors")
    plant_outside(tiny_llama_copy, str(outside))
    manifest = json.loads((tiny_llama_copy / mf.MANIFEST).read_text())
    edit(tiny_llama_copy, manifest)
    (tiny_llama_copy / mf.MANIFEST).write_text(json.dumps(manifest))

    assert verify_snapshot(tiny_llama_copy) == [f"{mf.MANIFEST}: {expected}"]
    with pytest.raises(SnapshotError, match=f"^{re.escape(f'{mf.MANIFEST}: {expected}')}$"):
        load_snapshot(tiny_llama_copy)
    with pytest.raises(SnapshotError):
        mf.parse_manifest(manifest)


def test_a_sound_manifest_parses_and_its_digest_is_of_its_bytes(tiny_llama_snapshot: Path) -> None:
    raw = (tiny_llama_snapshot / mf.MANIFEST).read_bytes()
    manifest = mf.parse_manifest(json.loads(raw))
    assert mf.weight_files(manifest) == ["model.safetensors"]
    assert mf.manifest_sha256(raw) == hashlib.sha256(raw).hexdigest()

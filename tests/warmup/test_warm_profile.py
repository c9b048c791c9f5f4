"""Warm profiles stored in a (fake) snapshot manifest without disturbing its checksums."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from snapshot.manifest import MANIFEST, load_manifest, sha256_file
from warmup.warm_profile import (
    WarmProfile,
    WarmSettings,
    profile_key,
    read_warm_profile,
    write_warm_profile,
)

SETTINGS = WarmSettings(block_size=16, max_batch=256, memory_fraction=0.9, kv_cache_dtype="bf16")


@pytest.fixture
def snapshot_dir(tmp_path: Path) -> Path:
    files = {"model.safetensors": b"\x00weights" * 100, "tokenizer.json": b'{"model": {}}'}
    entries = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        entries.append({"name": name, "size": len(data), "sha256": sha256_file(tmp_path / name)})
    manifest = {
        "format_version": 1,
        "architecture": "LlamaForCausalLM",
        "dtype": "bfloat16",
        "files": entries,
        "tensors": {"model.embed_tokens.weight": {"file": "model.safetensors"}},
        "thaw_version": "0.1.0",
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return tmp_path


def make_profile(gpu: str = "NVIDIA H200", gib: int = 140, blocks: int = 50_000) -> WarmProfile:
    return WarmProfile(
        gpu_name=gpu,
        total_memory_gib=gib,
        settings=SETTINGS,
        capture_sizes=[1, 2, 4, 8, 16, 24, 32],
        num_kv_blocks=blocks,
        activation_headroom_bytes=3 << 30,
        timings={"kv_sizing": 0.02, "capture_total": 0.41},
        torch_version="2.11.0",
    )


def checksums_hold(directory: Path) -> bool:
    manifest = load_manifest(directory)
    return all(sha256_file(directory / f["name"]) == f["sha256"] for f in manifest["files"])


def test_profile_key_names_gpu_and_memory():
    assert profile_key("NVIDIA H200", 150_754_820_096) == "NVIDIA H200|140"
    assert profile_key("NVIDIA H100 80GB HBM3", 85_032_084_480) == "NVIDIA H100 80GB HBM3|79"
    with pytest.raises(ValueError):
        profile_key("a|b", 1)


def test_write_then_read_round_trip_keeps_the_manifest_verifiable(snapshot_dir):
    before = load_manifest(snapshot_dir)
    profile = make_profile()
    assert write_warm_profile(snapshot_dir, profile)
    after = load_manifest(snapshot_dir)
    assert after["warm_profiles"]["NVIDIA H200|140"]["num_kv_blocks"] == 50_000
    assert {k: v for k, v in after.items() if k != "warm_profiles"} == before
    assert checksums_hold(snapshot_dir)
    assert read_warm_profile(snapshot_dir, "NVIDIA H200|140", SETTINGS) == profile
    # Nothing but the original files and the manifest is left behind.
    assert sorted(p.name for p in snapshot_dir.iterdir()) == [
        MANIFEST,
        "model.safetensors",
        "tokenizer.json",
    ]


def test_profiles_for_other_gpus_coexist_and_rewrites_replace(snapshot_dir):
    write_warm_profile(snapshot_dir, make_profile())
    write_warm_profile(snapshot_dir, make_profile("NVIDIA H100 80GB HBM3", 79, 20_000))
    write_warm_profile(snapshot_dir, make_profile(blocks=60_000))
    profiles = load_manifest(snapshot_dir)["warm_profiles"]
    assert set(profiles) == {"NVIDIA H200|140", "NVIDIA H100 80GB HBM3|79"}
    assert read_warm_profile(snapshot_dir, "NVIDIA H200|140", SETTINGS).num_kv_blocks == 60_000
    assert read_warm_profile(snapshot_dir, "NVIDIA L4|22", SETTINGS) is None


def test_other_settings_measure_again(snapshot_dir):
    write_warm_profile(snapshot_dir, make_profile())
    other = WarmSettings(block_size=32, max_batch=256, memory_fraction=0.9, kv_cache_dtype="bf16")
    assert read_warm_profile(snapshot_dir, "NVIDIA H200|140", other) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.pop("num_kv_blocks"),
        lambda p: p.update(capture_sizes=[1, -2]),
        lambda p: p.update(gpu_name="NVIDIA A100"),
        lambda p: p["settings"].pop("block_size"),
        lambda p: p.update(num_kv_blocks="many"),
    ],
)
def test_a_damaged_profile_is_ignored(snapshot_dir, damage):
    write_warm_profile(snapshot_dir, make_profile())
    path = snapshot_dir / MANIFEST
    manifest = json.loads(path.read_text())
    damage(manifest["warm_profiles"]["NVIDIA H200|140"])
    path.write_text(json.dumps(manifest))
    assert read_warm_profile(snapshot_dir, "NVIDIA H200|140", SETTINGS) is None


def test_an_unwritable_snapshot_costs_only_a_warning(snapshot_dir, monkeypatch, caplog):
    original = (snapshot_dir / MANIFEST).read_bytes()

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    assert write_warm_profile(snapshot_dir, make_profile()) is False
    assert "could not store the warm profile" in caplog.text
    assert (snapshot_dir / MANIFEST).read_bytes() == original
    assert len(list(snapshot_dir.iterdir())) == 3  # the temporary file was removed


def test_a_missing_snapshot_is_reported_not_raised(tmp_path):
    assert write_warm_profile(tmp_path / "nowhere", make_profile()) is False


def test_concurrent_writers_lose_no_profile(snapshot_dir):
    gpus = [f"GPU {i}" for i in range(8)]
    threads = [
        threading.Thread(target=write_warm_profile, args=(snapshot_dir, make_profile(g, 16)))
        for g in gpus
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(load_manifest(snapshot_dir)["warm_profiles"]) == {f"{g}|16" for g in gpus}
    assert checksums_hold(snapshot_dir)

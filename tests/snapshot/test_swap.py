"""Swapping a snapshot directory into place: never a moment without one, old or new, whole."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from snapshot import swap
from snapshot.swap import exchange_paths, replace_directory


def snapshot_dir(path: Path, version: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(version)
    (path / "model.safetensors").write_text(version * 100)
    return path


def test_into_an_empty_place(tmp_path: Path) -> None:
    replace_directory(snapshot_dir(tmp_path / "new", "v1"), tmp_path / "snap")
    assert (tmp_path / "snap" / "manifest.json").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_over_an_old_snapshot_nothing_is_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(swap, "exchange_paths", lambda a, b: False)
    target = snapshot_dir(tmp_path / "snap", "v1")
    replace_directory(snapshot_dir(tmp_path / "new", "v2"), target)
    assert (target / "manifest.json").read_text() == "v2"
    assert (target / "model.safetensors").read_text() == "v2" * 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]


def test_a_reader_always_finds_a_whole_snapshot(tmp_path: Path) -> None:
    """A thread reads the target while it is replaced again and again: it never misses."""
    if not exchange_paths(snapshot_dir(tmp_path / "a", "a"), snapshot_dir(tmp_path / "b", "b")):
        pytest.skip("this file system cannot exchange paths (the fallback has a gap)")
    target = snapshot_dir(tmp_path / "snap", "v0")
    stop = threading.Event()
    seen: list[str] = []
    misses = 0

    def read() -> None:
        nonlocal misses
        while not stop.is_set():
            try:
                seen.append((target / "manifest.json").read_text())
            except FileNotFoundError:
                misses += 1

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(1, 200):
            replace_directory(snapshot_dir(tmp_path / f"new{i}", f"v{i}"), target)
    finally:
        stop.set()
        reader.join()
    assert misses == 0
    assert len(set(seen)) > 1, "the reader never saw a swap"
    assert (target / "manifest.json").read_text() == "v199"

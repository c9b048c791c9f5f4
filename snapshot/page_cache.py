"""Warming the page cache with a snapshot's weights. No torch here: the cold-start path runs it
in a thread while the worker is still importing torch."""

from __future__ import annotations

import os
from pathlib import Path

from snapshot import manifest as mf
from snapshot.errors import SnapshotError

READ_CHUNK = 16 * 1024 * 1024


def prefetch_into_page_cache(path: str | os.PathLike[str]) -> int:
    """Read a snapshot's weight files (or one file) sequentially; return the bytes read."""
    path = Path(path)
    if path.is_dir():
        paths = [path / name for name in mf.weight_files(mf.load_manifest(path))]
    else:
        paths = [path]
    buffer = bytearray(READ_CHUNK)
    total = 0
    for file in paths:
        try:
            with open(file, "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):
                    # Ask for read-ahead of the whole file, then read it to be sure it is in.
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)
                while n := f.readinto(buffer):
                    total += n
        except OSError as exc:
            raise SnapshotError(f"{file.name}: cannot read ({exc.strerror or exc})") from exc
    return total

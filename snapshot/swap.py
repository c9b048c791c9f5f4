"""Putting a finished snapshot directory in place of another, with no moment without one.

A directory cannot be renamed over a non-empty one, so the plain way (rename the old one aside,
rename the new one in) leaves an instant with nothing at the target: a worker restarted then, or
a `thaw serve` starting then, would find no snapshot. Linux's renameat2(RENAME_EXCHANGE) swaps two
paths in one step: the new directory appears at the target as the old one moves to the staging
name, and only then is the old one deleted. A reader sees the old snapshot or the new one, whole,
and always one of them. The target stays a plain directory (no symlink), so whatever copies or
mounts it (a Dockerfile COPY, a volume) sees the files themselves.

Where the exchange is not available (not Linux, an old kernel, a file system that refuses it),
the plain way is the fallback and the gap is the two renames'.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Errors that mean "this system or file system cannot exchange", not "these paths are wrong".
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def replace_directory(new: Path, target: Path) -> None:
    """Put the directory `new` at `target` (created or replaced); `new` is gone afterwards."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    if exchange_paths(new, target):
        # `new` now names the old directory; the target already holds the new one.
        shutil.rmtree(new, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False when the system cannot (the paths are then
    untouched). Other failures raise OSError."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28 and later), or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    path, fd = ctypes.c_char_p, ctypes.c_int
    function.argtypes = [fd, path, fd, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function

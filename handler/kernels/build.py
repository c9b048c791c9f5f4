"""Compiling the C kernels into one shared library, cached per source, compiler flags and CPU.

`scripts/setup.sh` builds it (`python -m handler.kernels.build`), so serving only loads it. The
library is tuned for the CPU it is built on (-march=native); the CPU's model and flags are part
of the cache key, so a tree copied to another machine builds afresh rather than loading code
its CPU may not run. Every step is plain C with the system compiler: no torch headers, so the
build is quick.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The fused kernels, the matrix multiply and its int8/int4-weight variant, one library.
SOURCES = [
    Path(__file__).with_name(name) for name in ("cpu_kernels.c", "cpu_gemm.c", "cpu_qgemm.c")
]
# Included by the sources: part of the cache key, not of the command line.
HEADERS = [Path(__file__).with_name("cpu_gemm_tile.h")]
LIBRARY_NAME = "libthaw_cpu_kernels.so"
# -fopenmp: parallel loops on torch's own OpenMP runtime (same libgomp soname, loaded first).
# -fno-math-errno lets expf vectorise. No -ffast-math: NaN/inf must behave.
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
# "native": AVX-512 BF16 paths where the CPU has them. Tests also build the portable C paths
# with a baseline such as "x86-64-v3".
DEFAULT_MARCH = "native"
CACHE_ENV = "THAW_KERNEL_CACHE"


class KernelBuildError(RuntimeError):
    """The compiler is missing or refused the source."""


def default_cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    # The project's own directory (repo root/.thaw), next to the snapshots.
    return Path(__file__).resolve().parents[2] / ".thaw" / "kernels"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_fingerprint() -> str:
    """The CPU model and feature flags, which -march=native code depends on."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def library_path(
    cache_dir: Path | None = None, cc: str | None = None, march: str = DEFAULT_MARCH
) -> Path:
    """Where the library for this source, compiler, target and CPU lives (built or not)."""
    key = hashlib.sha256()
    sources = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    for part in (*sources, " ".join([*FLAGS, march]).encode(), (cc or "").encode()):
        key.update(part)
        key.update(b"\0")
    key.update(cpu_fingerprint().encode())
    return (cache_dir or default_cache_dir()) / key.hexdigest()[:16] / LIBRARY_NAME


def build(cache_dir: Path | None = None, march: str = DEFAULT_MARCH) -> Path:
    """The library's path, compiling it first if this source/CPU has no build yet."""
    cc = compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    target = library_path(cache_dir, cc, march)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: a concurrent loader never sees half a library.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        result = subprocess.run(
            [cc, *FLAGS, f"-march={march}", *map(str, SOURCES), "-o", str(partial), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            names = ", ".join(source.name for source in SOURCES)
            raise KernelBuildError(f"{cc} failed on {names}:\n{result.stderr.strip()}")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def main() -> int:
    try:
        path = build()
    except (KernelBuildError, OSError) as error:
        # Not fatal: the engine falls back to plain torch ops on the CPU.
        print(f"CPU kernels not built: {error}", file=sys.stderr)
        return 1
    print(f"CPU kernels: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp as the CPU peer of `thaw bench quant`: its tools built from the llama.cpp vendored in
PyPI's llama-cpp-python sdist (scripts/build_llamacpp.sh, cached under .cache/llamacpp), GGUFs
made from a thaw snapshot with llama.cpp's own converter and quantizer, and
`llama-batched-bench` run and parsed."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from thaw.serve import REPO

LLAMACPP_VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp we build
BUILD_SCRIPT = REPO / "scripts" / "build_llamacpp.sh"
GGUF_CACHE = REPO / ".cache" / "llamacpp" / "gguf"
GGUF_TYPES = ("BF16", "Q8_0", "Q4_1", "Q4_0")  # made here from the bf16 snapshot


@dataclass
class BatchedBenchRow:
    """One line of llama-batched-bench's table."""

    pp: int
    tg: int
    batch: int
    n_kv: int
    t_pp: float
    s_pp: float
    t_tg: float
    s_tg: float
    t: float
    s: float

    @property
    def output_tok_s(self) -> float:
        """Output tokens over the whole call, prefill included: what thaw's figure counts."""
        return self.batch * self.tg / self.t


@dataclass
class Gguf:
    name: str  # BF16, Q8_0, Q4_1, Q4_0, Q4_1-source
    path: Path

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


def llamacpp_bin(log) -> Path:
    """The cached llama.cpp bin dir, built by scripts/build_llamacpp.sh first when missing."""
    cached = REPO / ".cache" / "llamacpp" / LLAMACPP_VERSION / "bin"
    if not (cached / "llama-batched-bench").exists():
        log(f"building llama.cpp (llama-cpp-python {LLAMACPP_VERSION} sdist) into {cached}; "
            "a few minutes on 2 cores")  # fmt: skip
    env = {**os.environ, "LLAMACPP_PY_VERSION": LLAMACPP_VERSION}
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def ensure_ggufs(bin_dir: Path, snapshot: Path, wanted: list[str], log) -> dict[str, Gguf]:
    """GGUFs by name: BF16 converted from the bf16 snapshot, then Q8_0 / Q4_1 / Q4_0 quantized
    from that BF16, cached per snapshot content; "Q4_1-source" is the packaged Q4_1 GGUF."""
    out = GGUF_CACHE / f"{snapshot.name}-{_snapshot_digest(snapshot)}"
    out.mkdir(parents=True, exist_ok=True)
    bf16 = out / "BF16.gguf"
    if not bf16.exists() and set(wanted) & set(GGUF_TYPES):
        log(f"converting {snapshot} to {bf16}")
        _convert_to_gguf(bin_dir, snapshot, bf16)
    ggufs: dict[str, Gguf] = {}
    for name in wanted:
        if name == "Q4_1-source":
            from snapshot.sources import default_gguf

            ggufs[name] = Gguf(name, default_gguf())
            continue
        path = out / f"{name}.gguf"
        if not path.exists():
            log(f"llama-quantize {bf16.name} -> {path.name}")
            _quantize_gguf(bin_dir, bf16, path, name)
        ggufs[name] = Gguf(name, path)
    return ggufs


def _snapshot_digest(snapshot: Path) -> str:
    """A short digest of the weight files' sha256s: new weights, new GGUFs. Not of the whole
    manifest, which also records warm profiles as the snapshot is served."""
    from snapshot.manifest import load_manifest, weight_files

    manifest = load_manifest(snapshot)
    names = set(weight_files(manifest))
    sums = sorted(f"{f['name']}:{f['sha256']}" for f in manifest["files"] if f["name"] in names)
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:12]


def _convert_to_gguf(bin_dir: Path, snapshot: Path, out: Path) -> None:
    # The convert script of the same llama.cpp, with its own vendored gguf-py (it puts that
    # first on sys.path), so the writer matches the reader we built.
    script = bin_dir.parent / "src" / "convert_hf_to_gguf.py"
    partial = out.with_suffix(".partial")
    cmd = [
        sys.executable,
        str(script),
        str(snapshot),
        "--outtype",
        "bf16",
        "--outfile",
        str(partial),
    ]
    _check_call(cmd)
    partial.rename(out)


def _quantize_gguf(bin_dir: Path, source: Path, out: Path, ftype: str) -> None:
    partial = out.with_suffix(".partial")
    _check_call([str(bin_dir / "llama-quantize"), str(source), str(partial), ftype, "2"])
    partial.rename(out)


def _check_call(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(cmd[0]).name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )


@dataclass(frozen=True)
class BatchedBench:
    """One llama-batched-bench run: every concurrency, fixed prompt and output lengths."""

    prompt_len: int
    output_len: int
    concurrencies: list[int]
    threads: int

    def command(self, gguf: Path) -> list[str]:
        # Room for every sequence's prompt and output (batched-bench skips a B that does not fit).
        ctx = max(8192, max(self.concurrencies) * (self.prompt_len + self.output_len))
        npl = ",".join(map(str, self.concurrencies))
        return ["llama-batched-bench", "-m", str(gguf), "-c", str(ctx), "-b", "2048",
                "-ub", "512", "-npp", str(self.prompt_len), "-ntg", str(self.output_len),
                "-npl", npl, "-t", str(self.threads)]  # fmt: skip


def run_batched_bench(bin_dir: Path, gguf: Path, bench: BatchedBench) -> list[BatchedBenchRow]:
    cmd = bench.command(gguf)
    concurrencies = bench.concurrencies
    cmd[0] = str(bin_dir / cmd[0])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"llama-batched-bench failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    rows = parse_batched_bench(proc.stdout + "\n" + proc.stderr)
    if sorted(r.batch for r in rows) != sorted(concurrencies):
        raise RuntimeError(f"llama-batched-bench printed batches {[r.batch for r in rows]}")
    return rows


_NUMBER_ROW = re.compile(r"^\|\s*\d+\s*\|")


def parse_batched_bench(text: str) -> list[BatchedBenchRow]:
    """The rows of llama-batched-bench's markdown table (PP, TG, B, N_KV, T_PP s, S_PP t/s,
    T_TG s, S_TG t/s, T s, S t/s); everything else it prints is ignored."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not _NUMBER_ROW.match(line):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 10:
            continue
        pp, tg, batch, n_kv = (int(c) for c in cells[:4])
        t_pp, s_pp, t_tg, s_tg, t, s = (float(c) for c in cells[4:])
        rows.append(BatchedBenchRow(pp, tg, batch, n_kv, t_pp, s_pp, t_tg, s_tg, t, s))
    return rows

"""Microbenchmark: thaw's bf16 matrix multiply against its int8/int4-weight variant (cpu_qgemm.c).

    python -m bench.qgemm [--threads 2] [--rows 1 32] [--seconds 0.3]

SmolLM2-135M's linear shapes. Each format cycles through enough copies of the weight to
overflow the last-level cache (--cache-mb), as a decode step through 30 layers does, so the
figures are DRAM reads rather than a weight that stays in L3 between calls. GB/s counts the
bytes of the weight as packed (bf16: 2 per value; int8/int4: the quantized values plus scales
and offsets).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable

import torch

from handler.kernels.cpu import CpuKernels, QGemmWeight, load_cpu_kernels
from snapshot.quant.format import QuantizedTensor, pack_int4

# (name, n, k): qkv, gate_up, o, down, lm_head.
SHAPES = [
    ("qkv", 960, 576),
    ("gate_up", 3072, 576),
    ("o", 576, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
]
# (label, scheme, group)
FORMATS = [("int8 g128", "int8", 128), ("int8 g32", "int8", 32), ("int4 g32", "int4", 32)]


def quantized(scheme: str, n: int, k: int, group: int, seed: int) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    groups = math.ceil(k / group)
    scales = (torch.rand(n, groups, generator=gen) * 0.01).to(torch.float16)
    if scheme == "int8":
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return QuantizedTensor("int8", (n, k), (1, group), q, scales)
    offsets = (torch.randn(n, groups, generator=gen) * 0.05).to(torch.float16)
    q4 = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    return QuantizedTensor("int4", (n, k), (1, group), q4, scales, offsets)


def time_call(call: Callable[[int], object], copies: int, seconds: float) -> float:
    """Seconds of the fastest call, cycling through the copies (at least three passes): the
    call least disturbed by other work on the machine, since an OpenMP loop waits for its
    slowest thread and one preempted thread doubles a call."""
    for i in range(copies):
        call(i)
    best = math.inf
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < 3 * copies or time.perf_counter() < deadline:
        start = time.perf_counter()
        call(calls % copies)
        best = min(best, time.perf_counter() - start)
        calls += 1
    return best


def run(kernels: CpuKernels, rows_list: list[int], seconds: float, cache_mb: int) -> None:
    head = ("shape", "rows", "format", "MB", "us/call", "GB/s", "x bf16")
    print("{:<8} {:>4} {:<10} {:>6} {:>9} {:>6} {:>6}".format(*head))
    for name, n, k in SHAPES:
        weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02
        packed = kernels.pack_gemm_weight(weight.to(torch.bfloat16))
        copies = max(1, math.ceil(cache_mb * 2**20 / (packed.numel() * 2)))
        bf16 = [packed] + [packed.clone() for _ in range(copies - 1)]
        quant: list[tuple[str, list[QGemmWeight]]] = []
        for label, scheme, group in FORMATS:
            qw = kernels.pack_qgemm_weight(quantized(scheme, n, k, group, seed=n))
            copies = max(1, math.ceil(cache_mb * 2**20 / qw.packed.numel()))
            clones = [dataclasses.replace(qw, packed=qw.packed.clone()) for _ in range(copies - 1)]
            quant.append((label, [qw, *clones]))
        for rows in rows_list:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16()
            base = time_call(_gemm(kernels, x, bf16, n), len(bf16), seconds)
            _row(name, rows, "bf16", packed.numel() * 2, base, base)
            for label, qws in quant:
                t = time_call(_qgemm(kernels, x, qws), len(qws), seconds)
                _row(name, rows, label, qws[0].packed.numel(), t, base)


def _gemm(
    kernels: CpuKernels, x: torch.Tensor, weights: list[torch.Tensor], n: int
) -> Callable[[int], object]:
    return lambda i: kernels.gemm(x, weights[i], n, check=False)


def _qgemm(
    kernels: CpuKernels, x: torch.Tensor, weights: list[QGemmWeight]
) -> Callable[[int], object]:
    return lambda i: kernels.qgemm(x, weights[i], check=False)


def _row(name: str, rows: int, label: str, nbytes: int, t: float, base: float) -> None:
    print(
        f"{name:<8} {rows:>4} {label:<10} {nbytes / 1e6:>6.2f} {t * 1e6:>9.1f} "
        f"{nbytes / t / 1e9:>6.1f} {base / t:>6.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--cache-mb", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = load_cpu_kernels()
    if kernels is None or not kernels.qgemm_available:
        raise SystemExit("no AVX-512 BF16 kernels on this CPU")
    run(kernels, args.rows, args.seconds, args.cache_mb)


if __name__ == "__main__":
    main()

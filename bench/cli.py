"""`thaw bench NAME [ARGS]`: dispatch to bench/<name>.py, imported only when chosen."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "load": ("bench.load", "snapshot loader GB/s vs safetensors and transformers"),
    "engine": ("bench.engine", "engine tokens/s vs transformers generate / generate_batch"),
    "gateway": ("bench.gateway", "gateway requests/s and latency vs the runpod local server"),
    "coldstart": ("bench.coldstart", "exec to first token vs import torch and the HF path"),
    "gpu": ("bench.gpu", "GPU checks: H2D, Triton kernels, CUDA graphs, throughput, cold start"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "benchmarks: " + "; ".join(
        f"{name}: {help_text}" for name, (_, help_text) in BENCHES.items()
    )
    parser.add_argument("bench", choices=sorted(BENCHES), help="which benchmark")
    # Everything after NAME (options included) belongs to that benchmark's own parser.
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's arguments")


def run(args: argparse.Namespace) -> int:
    module, _ = BENCHES[args.bench]
    mod = importlib.import_module(module)
    parser = argparse.ArgumentParser(prog=f"thaw bench {args.bench}")
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.rest)) or 0)

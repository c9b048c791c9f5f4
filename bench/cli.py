"""`thaw bench NAME [ARGS]`: run one benchmark of bench/, imported only when chosen."""

from __future__ import annotations

import argparse
from types import ModuleType

HELP: dict[str, str] = {
    "load": "snapshot loader GB/s vs safetensors and transformers",
    "engine": "engine tokens/s vs transformers generate / generate_batch",
    "gateway": "gateway requests/s and latency vs the runpod local server",
    "coldstart": "exec to first token vs import torch and the HF path",
    "gpu": "GPU checks: H2D, Triton kernels, CUDA graphs, throughput, cold start",
    "structured": "engine tokens/s with every request under a JSON schema vs unconstrained",
    "grammar-engines": "llguidance vs outlines-core vs xgrammar: setup, compile, mask per token",
    "quant": "quantized snapshots' tokens/s, size, start and accuracy vs llama.cpp's GGUFs",
}


def bench_module(name: str) -> ModuleType:
    """The benchmark's module: it defines add_arguments(parser) and run(args) -> int."""
    if name == "load":
        from bench import load

        return load
    if name == "engine":
        from bench import engine

        return engine
    if name == "gateway":
        from bench import gateway

        return gateway
    if name == "coldstart":
        from bench import coldstart

        return coldstart
    if name == "gpu":
        from bench import gpu

        return gpu
    if name == "structured":
        from bench import structured

        return structured
    if name == "grammar-engines":
        from bench import grammar_engines

        return grammar_engines
    if name == "quant":
        from bench import quant

        return quant
    raise ValueError(f"unknown benchmark {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "benchmarks: " + "; ".join(
        f"{name}: {help_text}" for name, help_text in HELP.items()
    )
    parser.add_argument("bench", choices=sorted(HELP), help="which benchmark")
    # Everything after NAME (options included) belongs to that benchmark's own parser.
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's arguments")


def run(args: argparse.Namespace) -> int:
    module = bench_module(args.bench)
    parser = argparse.ArgumentParser(prog=f"thaw bench {args.bench}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)

"""`thaw bench NAME`: dispatch to bench/<name>.py, imported only when chosen."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "load": ("bench.load", "snapshot loader GB/s vs safetensors and transformers"),
    "engine": ("bench.engine", "engine tokens/s vs transformers generate / generate_batch"),
    "gateway": ("bench.gateway", "gateway requests/s and latency vs the runpod local server"),
    "coldstart": ("bench.coldstart", "exec to first token vs import torch and the HF path"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for name, (module, help_text) in BENCHES.items():
        cmd = sub.add_parser(name, help=help_text)
        cmd.set_defaults(bench_module=module)
        # Arguments are added lazily: parse_known_args below hands the rest over.
        cmd.add_argument("rest", nargs=argparse.REMAINDER)


def run(args: argparse.Namespace) -> int:
    mod = importlib.import_module(args.bench_module)
    parser = argparse.ArgumentParser(prog=f"thaw bench {args.bench}")
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.rest)) or 0)

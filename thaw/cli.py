"""The `thaw` command line.

Each command group lives in its own module and is imported only when that group
runs, so `thaw serve` never pays for the build-time imports of `thaw snapshot`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "snapshot": ("snapshot.cli", "build, verify, inspect, push and pull snapshots"),
    "serve": ("thaw.serve", "start the gateway and the worker for a snapshot"),
    "bench": ("bench.cli", "benchmarks that compare thaw with its peers in one run"),
    "deploy": ("thaw.deploy", "create or update a RunPod template and endpoint"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = argv[0] if argv else None
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(cmd)
            cmd.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `thaw` command line.

Each command group lives in its own module and is imported only when that group runs, so
`thaw --help` never imports torch and `thaw serve` never pays for `thaw snapshot`'s imports.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

HELP: dict[str, str] = {
    "snapshot": "build, verify, inspect, push and pull snapshots",
    "serve": "start the gateway and the worker for a snapshot",
    "bench": "benchmarks that compare thaw with its peers in one run",
    "deploy": "create or update a RunPod template and endpoint",
}


def command_module(name: str) -> ModuleType:
    """The module of one command group: it defines add_arguments(parser) and run(args) -> int."""
    if name == "snapshot":
        from snapshot import cli

        return cli
    if name == "serve":
        from thaw import serve

        return serve
    if name == "bench":
        from bench import cli

        return cli
    if name == "deploy":
        from thaw import deploy

        return deploy
    raise ValueError(f"unknown command {name!r}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = argv[0] if argv else None
    for name, help_text in HELP.items():
        cmd = sub.add_parser(name, help=help_text)
        if name == chosen:
            module = command_module(name)
            module.add_arguments(cmd)
            cmd.set_defaults(run=module.run)
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

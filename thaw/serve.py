"""`thaw serve`: replace this process with the gateway, configured for a snapshot.

The gateway is exec'd (not spawned) so that it is PID of record for signals and its clock starts
at the exec, which is where the cold-start timeline begins.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from handler.env import EnvReader, SettingsError

REPO = Path(__file__).resolve().parent.parent
GATEWAY_CANDIDATES = (
    "rust_gateway/target/thaw-gateway",
    "rust_gateway/target/x86_64-unknown-linux-gnu/release/thaw-gateway",
    "rust_gateway/target/x86_64-unknown-linux-musl/release/thaw-gateway",
    "rust_gateway/target/release/thaw-gateway",
)


def find_gateway() -> Path:
    explicit = os.environ.get("THAW_GATEWAY_BIN")
    if explicit:
        return Path(explicit)
    for candidate in GATEWAY_CANDIDATES:
        path = REPO / candidate
        if path.is_file() and os.access(path, os.X_OK):
            return path
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(directory) / "thaw-gateway"
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise SystemExit("thaw-gateway not found: run `bash scripts/build_gateway.sh` (or make setup)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = EnvReader(os.environ)
    try:
        port = env.integer("PORT", 8080, minimum=0)
    except SettingsError as exc:
        parser.error(str(exc))
    parser.add_argument(
        "--snapshot",
        default=env.text("THAW_SNAPSHOT", str(REPO / ".thaw/snapshots/default")),
        help="snapshot directory, or s3://bucket/prefix (pulled first); env THAW_SNAPSHOT",
    )
    parser.add_argument("--port", type=int, default=port, help="env PORT")
    parser.add_argument("--host", default=env.text("HOST", "127.0.0.1"), help="env HOST")


def gateway_env(snapshot: str, port: int, host: str) -> dict[str, str]:
    env = dict(os.environ)
    env["THAW_SNAPSHOT"] = snapshot
    env["PORT"] = str(port)
    env["HOST"] = host
    # The worker runs in this same Python environment.
    env.setdefault("THAW_WORKER_CMD", f"{shlex.quote(sys.executable)} -m handler.worker")
    return env


def resolve_snapshot(uri: str) -> str:
    if not uri.startswith("s3://"):
        path = Path(uri)
        if not (path / "manifest.json").is_file():
            raise SystemExit(
                f"{uri}: not a snapshot (no manifest.json); build one with "
                "`thaw snapshot build --from default --out DIR`"
            )
        return str(path.resolve())
    from snapshot.errors import SnapshotError
    from snapshot.s3 import S3Location, TransferSettings, pull

    env = EnvReader(os.environ)
    default_cache = Path.home() / ".cache" / "thaw" / "snapshots" / "pulled"
    target = Path(env.text("THAW_SNAPSHOT_CACHE", str(default_cache)))
    # Pinned: a bucket whose manifest is not this one is refused before anything is fetched.
    expected = env.optional_text("THAW_SNAPSHOT_SHA256")
    try:
        # Resumable: files already present and verified are not downloaded again.
        pull(S3Location.parse(uri), target, TransferSettings(), expected)
    except SnapshotError as exc:
        raise SystemExit(f"thaw serve: {exc}") from None
    return str(target.resolve())


def run(args: argparse.Namespace) -> int:
    snapshot = resolve_snapshot(args.snapshot)
    gateway = find_gateway()
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    body = '{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'
    print(
        f"thaw: serving {snapshot} on http://{shown}:{args.port}\n"
        f"  curl http://{shown}:{args.port}/v1/chat/completions \\\n"
        f"    -H 'Content-Type: application/json' -d '{body}'",
        file=sys.stderr,
        flush=True,
    )
    os.execve(str(gateway), [str(gateway)], gateway_env(snapshot, args.port, args.host))
    return 0  # not reached

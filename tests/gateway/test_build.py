"""The gateway binary: static, documented, rebuilt quickly when nothing changed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.gateway_fixtures import build_gateway

ENV_VARS = [
    "PORT",
    "PORT_HEALTH",
    "HOST",
    "THAW_SNAPSHOT",
    "THAW_WORKER_CMD",
    "THAW_API_KEY",
    "THAW_QUEUE_CAPACITY",
    "THAW_MAX_CONCURRENT_REQUESTS",
    "THAW_MAX_INPUT_TOKENS",
    "THAW_MAX_TOTAL_TOKENS",
    "THAW_MAX_BODY_BYTES",
    "THAW_JOB_RETENTION_S",
    "THAW_RUNSYNC_RETENTION_S",
    "THAW_READY_WAIT_S",
    "THAW_LOG_FORMAT",
    "THAW_IDLE_TIMEOUT",
    "THAW_SHUTDOWN_GRACE_S",
]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def test_binary_is_statically_linked(gateway_binary: Path) -> None:
    ldd = subprocess.run(["ldd", str(gateway_binary)], capture_output=True, text=True)
    output = ldd.stdout + ldd.stderr
    assert "not a dynamic executable" in output or "statically linked" in output, output


def test_every_setting_is_in_help_and_docs(gateway_binary: Path) -> None:
    help_text = subprocess.run(
        [str(gateway_binary), "--help"], capture_output=True, text=True, check=True
    ).stdout
    docs = DOCS.read_text()
    for name in ENV_VARS:
        assert f"env: {name}" in help_text, name
        assert f"`{name}`" in docs, name


def test_bad_worker_command_line_is_refused(gateway_binary: Path) -> None:
    done = subprocess.run(
        [str(gateway_binary), "--worker-cmd", "python3 'unclosed"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "THAW_WORKER_CMD" in done.stderr


def test_rebuild_without_changes_is_fast(gateway_binary: Path) -> None:
    build_gateway()  # catch up with any source edited since the session started
    built_at = gateway_binary.stat().st_mtime
    started = time.monotonic()
    assert build_gateway() == gateway_binary
    assert time.monotonic() - started < 15
    assert gateway_binary.stat().st_mtime == built_at, "nothing changed, nothing relinked"

"""A real `thaw serve` (gateway + worker) on a free port, for end-to-end tests.

The default snapshot is served with THAW_DTYPE=float32, so that greedy outputs can be compared
token for token with transformers loading the same snapshot in float32.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import DEFAULT_SNAPSHOT, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_default_snapshot() -> Path:
    if not (DEFAULT_SNAPSHOT / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "thaw.cli",
                "snapshot",
                "build",
                "--from",
                "default",
                "--out",
                str(DEFAULT_SNAPSHOT),
            ],
            check=True,
        )
    return DEFAULT_SNAPSHOT


def http_status(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@dataclass
class Server:
    """One `thaw serve` process; `base_url` is where clients talk to it."""

    snapshot: Path | str  # a directory, or an s3:// URI that `thaw serve` pulls first
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = dict(os.environ)
        env.update({"THAW_DTYPE": "float32", "THAW_LOG_FORMAT": "text"})
        env.update(self.env)
        self.log_path = Path(os.environ.get("PYTEST_TMPDIR", "/tmp"), f"thaw-serve-{self.port}.log")
        # The child gets its own copy of the descriptor, so ours can be closed at once.
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "thaw.cli",
                    "serve",
                    "--snapshot",
                    str(self.snapshot),
                    "--port",
                    str(self.port),
                ],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"thaw serve exited early:\n{self.logs()}")
            try:
                if http_status(f"{self.base_url}/ping") == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"thaw serve not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def serving(
    env: dict[str, str], snapshot: Path | None = None, ready_timeout: float = 120.0
) -> Iterator[Server]:
    """A `thaw serve` of the snapshot (default: the default model) with `env`, ready, and
    stopped on the way out."""
    server = Server(snapshot or ensure_default_snapshot(), env=env).start()
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()

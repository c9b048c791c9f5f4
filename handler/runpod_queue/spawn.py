"""Starts the gateway as a child of the RunPod handler when none is listening.

The child is started before the runpod SDK starts, so the gateway binds its port, reads the
snapshot and spawns the worker while the SDK runs its fitness checks and takes the first jobs.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

from handler.runpod_queue.config import HandlerConfig

log = logging.getLogger("thaw.runpod")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
PR_SET_PDEATHSIG = 1


def gateway_listening(url: str, timeout_s: float = 0.5) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout_s):
            return True
    except OSError:
        return False


def gateway_command(config: HandlerConfig) -> list[str]:
    if config.gateway_cmd:
        return list(config.gateway_cmd)
    # Only this handler talks to the gateway it starts: it listens on loopback whatever HOST the
    # image sets, so it needs no API key and is never reachable from outside.
    cmd = [sys.executable, "-m", "thaw.cli", "serve", "--port", str(config.gateway_port)]
    cmd += ["--host", "127.0.0.1"]
    if config.snapshot:
        cmd += ["--snapshot", config.snapshot]
    return cmd


def _die_with_parent() -> None:
    # If the handler is killed outright (os._exit after a failed fitness check, SIGKILL), the
    # kernel sends the gateway SIGTERM instead of leaving it holding the GPU.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class GatewayProcess:
    """A gateway child process; the handler process exits when it does."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self._stopping = False
        log.info("starting the gateway: %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd, preexec_fn=_die_with_parent if sys.platform == "linux" else None
        )
        atexit.register(self.stop)
        threading.Thread(target=self._watch, name="thaw-gateway-watch", daemon=True).start()

    def exit_code(self) -> int | None:
        return self._proc.poll()

    def _watch(self) -> None:
        code = self._proc.wait()
        if self._stopping:
            return
        # Without its gateway this worker can only fail jobs: stop it (the SDK shuts down
        # gracefully on SIGTERM) and let the platform start a fresh one.
        log.error("the gateway exited with status %s; stopping the RunPod worker", code)
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        if self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def ensure_gateway(config: HandlerConfig) -> GatewayProcess | None:
    """Start a gateway unless one already listens at THAW_GATEWAY_URL (or it is remote)."""
    host = urlsplit(config.gateway_url).hostname or ""
    if host not in LOCAL_HOSTS or gateway_listening(config.gateway_url):
        return None
    return GatewayProcess(gateway_command(config))

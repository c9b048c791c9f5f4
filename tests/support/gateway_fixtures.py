"""Helpers for the gateway's end-to-end tests: build the binary, make a tiny snapshot, start the
gateway with the stub worker (tests/support/stub_worker.py) and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
STUB_WORKER = ROOT / "tests" / "support" / "stub_worker.py"
EOS = "<|endoftext|>"

# Text the tiny tokenizer is trained on: ASCII words plus multi-byte characters, so that
# byte-level tokens split characters and the gateway's detokenizer has work to do.
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Grüße aus Köln! Café crème, naïve façade. ",
    "日本語のテキストと絵文字 🙂🚀 も少し。",
    "hello world, hello gateway, streaming tokens one by one.",
]


def build_gateway() -> Path:
    """Runs scripts/build_gateway.sh (fast when nothing changed); returns the binary."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_gateway.sh")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(done.stdout.strip().splitlines()[-1])


def make_snapshot(directory: Path) -> Path:
    """A snapshot directory with a real (tiny, byte-level BPE) tokenizer and no real weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"_name_or_path": "tiny-stub", "max_position_embeddings": 256, "eos_token_id": 0}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    (directory / "model.safetensors").write_bytes(b"\0" * 4096)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.get("/ping", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.02)
        raise AssertionError(f"gateway not ready within {timeout_s}s; log:\n{self.log()}")

    def worker_pids(self) -> list[int]:
        """Pids of the gateway's child processes (the worker)."""
        # Each thread has its own list: the worker is spawned from one of tokio's threads.
        tasks = Path(f"/proc/{self.process.pid}/task")
        return sorted(
            int(pid) for task in tasks.glob("*/children") for pid in task.read_text().split()
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def gateway_env(snapshot: Path, port: int, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "THAW_SNAPSHOT": str(snapshot),
            "THAW_WORKER_CMD": f"{sys.executable} {STUB_WORKER}",
            "THAW_LOG_FORMAT": "text",
            "THAW_RESTART_BACKOFF_MS": "50",
            "THAW_SHUTDOWN_GRACE_S": "10",
            "PYTHONPATH": str(ROOT),
            # The worker gets an allowlisted environment; the stub's settings are STUB_*.
            "THAW_WORKER_ENV_PASS": "STUB_*",
            # Webhooks to the tests' loopback recorders only, even if the address checks broke.
            "THAW_WEBHOOK_ALLOWLIST_ONLY": "true",
            "THAW_WEBHOOK_ALLOW": "127.0.0.1",
        }
    )
    env.update(overrides)
    return env


def start_gateway(binary: Path, snapshot: Path, log_dir: Path, **overrides: str) -> Gateway:
    port = free_port()
    log_path = log_dir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(binary)],
            env=gateway_env(snapshot, port, **overrides),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    gateway = Gateway(process, port, log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            gateway.get("/health", timeout=1)
            return gateway
        except requests.ConnectionError:
            time.sleep(0.005)
    gateway.stop()
    raise AssertionError(f"gateway did not answer /health; log:\n{gateway.log()}")


@pytest.fixture(scope="session")
def gateway_binary() -> Path:
    return build_gateway()


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_snapshot(tmp_path_factory.mktemp("snapshot"))


@pytest.fixture()
def launch(gateway_binary: Path, tiny_snapshot: Path, tmp_path: Path) -> Iterator[Any]:
    """Starts gateways with env overrides; stops them all after the test."""
    started: list[Gateway] = []

    def _launch(**overrides: str) -> Gateway:
        gateway = start_gateway(gateway_binary, tiny_snapshot, tmp_path, **overrides)
        started.append(gateway)
        return gateway

    yield _launch
    for gateway in started:
        gateway.stop()


@pytest.fixture()
def gateway(launch: Any) -> Gateway:
    """A ready gateway with default settings."""
    ready = launch()
    ready.wait_ready()
    return ready


def encode(snapshot: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode(text).ids

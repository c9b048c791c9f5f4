"""Shutdown (SIGTERM, idle timeout) and metrics."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import requests


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; so is a process reaped since the line above.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ")[1][0] != "Z"


def test_sigterm_drains_then_exits_0(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.03", STUB_TOKENS="1000")
    gateway.wait_ready()
    (worker,) = gateway.worker_pids()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 40}}
    outcome: dict = {}

    def running_request() -> None:
        outcome["response"] = gateway.post("/generate", json=body)

    thread = threading.Thread(target=running_request)
    thread.start()
    time.sleep(0.3)
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.1)
    assert gateway.get("/ping").status_code == 503
    assert gateway.get("/ready").json()["phase"] == "shutting_down"
    refused = gateway.post("/generate", json=body)
    assert refused.status_code == 503
    assert refused.json()["error_type"] == "unavailable"
    thread.join(timeout=20)
    finished = outcome["response"]
    assert finished.status_code == 200, finished.text
    assert finished.json()["generated_text"] == "hello" * 40
    assert gateway.process.wait(timeout=20) == 0
    deadline = time.monotonic() + 5
    while pid_alive(worker):
        assert time.monotonic() < deadline, "the worker outlived the gateway"
        time.sleep(0.05)


def test_sigterm_right_after_health_stops_the_starting_worker(launch) -> None:
    gateway = launch(THAW_WORKER_CMD="sleep 30")  # returns at the first 200 on /health
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(timeout=10) == 0
    assert not list(Path(tempfile.gettempdir()).glob(f"thaw-gateway-{gateway.process.pid}-*"))


def test_worker_dies_with_a_killed_gateway(launch) -> None:
    gateway = launch()
    gateway.wait_ready()
    (worker,) = gateway.worker_pids()
    gateway.process.kill()
    gateway.process.wait()
    # A killed gateway cannot remove its socket directory.
    for leftover in Path(tempfile.gettempdir()).glob(f"thaw-gateway-{gateway.process.pid}-*"):
        shutil.rmtree(leftover)
    deadline = time.monotonic() + 5
    while pid_alive(worker):
        assert time.monotonic() < deadline, "the worker outlived a SIGKILLed gateway"
        time.sleep(0.05)


def test_idle_timeout_exits_0(launch) -> None:
    gateway = launch(THAW_IDLE_TIMEOUT="0.5")
    gateway.wait_ready()
    assert gateway.post("/generate", json={"inputs": "hi"}).status_code == 200
    assert gateway.process.wait(timeout=10) == 0
    try:
        gateway.get("/health", timeout=1)
        raise AssertionError("still answering after the idle exit")
    except requests.ConnectionError:
        pass


def test_metrics(gateway) -> None:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 5}}
    assert gateway.post("/generate", json=body).status_code == 200
    assert gateway.post("/generate", json={"inputs": 1}).status_code == 422
    text = gateway.get("/metrics").text
    for needle in (
        'thaw_requests_total{route="/generate",status="200"} 1',
        'thaw_requests_total{route="/generate",status="422"} 1',
        "thaw_time_to_first_token_seconds_count 1",
        "thaw_time_per_output_token_seconds_count 1",
        "thaw_input_tokens_count 1",
        "thaw_output_tokens_sum 5",
        'thaw_cold_start_phase_seconds{phase="port_bound"}',
        'thaw_cold_start_phase_seconds{phase="ready"}',
        "thaw_queue_size 0",
        "thaw_running_requests 0",
        "thaw_worker_restarts_total 0",
    ):
        assert needle in text, needle

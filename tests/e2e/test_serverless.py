"""Serverless start-up for real: the RunPod handler in the SDK's local modes, a snapshot pulled
from S3 at start, the load-balancer /ping sequence, and scale to zero — all against the real
gateway and worker serving the default snapshot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO
from tests.support.serve_fixtures import Server, ensure_default_snapshot, free_port


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_default_snapshot()


def handler_env(snapshot: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "THAW_GATEWAY_URL": f"http://127.0.0.1:{port}",
            "THAW_SNAPSHOT": str(snapshot),
            "THAW_DTYPE": "float32",
        }
    )
    return env


def test_test_input_mode_starts_the_gateway_and_answers(snapshot: Path) -> None:
    port = free_port()
    job = {
        "input": {
            "prompt": "The capital of France is",
            "sampling_params": {"max_tokens": 6, "temperature": 0},
        }
    }
    done = subprocess.run(
        [sys.executable, "-m", "handler.runpod_queue", "--test_input", json.dumps(job)],
        env=handler_env(snapshot, port),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Paris" in done.stdout, done.stdout[-1500:]


def test_test_input_with_a_bad_job_fails() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "handler.runpod_queue", "--test_input", '{"input": {}}'],
        env=handler_env(Path("/nonexistent"), free_port()),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0


@pytest.fixture(scope="module")
def local_api(snapshot: Path) -> Iterator[str]:
    """The SDK's local API server wrapping our handler; the gateway starts with it, cold."""
    gateway_port, api_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "handler.runpod_queue",
            "--rp_serve_api",
            "--rp_api_port",
            str(api_port),
            "--rp_api_host",
            "127.0.0.1",
        ],
        env=handler_env(snapshot, gateway_port),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{base}/docs", timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the runpod local API server did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_local_api_job_sent_before_ready_completes(local_api: str) -> None:
    # The worker is still importing torch when this arrives: the job must wait, not fail.
    body = {"input": {"prompt": "Water boils at", "sampling_params": {"max_tokens": 8}}}
    resp = requests.post(f"{local_api}/runsync", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["status"] == "COMPLETED", result
    chunks = result["output"] if isinstance(result["output"], list) else [result["output"]]
    assert "".join(c.get("text", "") for c in chunks).strip()


def test_local_api_streams_openai_chunks(local_api: str) -> None:
    body = {
        "input": {
            "openai_route": "/v1/chat/completions",
            "openai_input": {
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            },
        }
    }
    job = requests.post(f"{local_api}/run", json=body, timeout=30).json()
    deadline = time.monotonic() + 300
    while True:
        status = requests.post(f"{local_api}/status/{job['id']}", timeout=30).json()
        if status["status"] in ("COMPLETED", "FAILED") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status["status"] == "COMPLETED", status
    chunks = status["output"]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip()


def test_snapshot_pulled_from_s3_at_start(
    snapshot: Path, moto_s3_env: dict[str, str], tmp_path: Path
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=moto_s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="models")
    push = subprocess.run(
        [sys.executable, "-m", "thaw.cli", "snapshot", "push", str(snapshot), "s3://models/smol"],
        env=moto_s3_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert push.returncode == 0, push.stderr
    pulled = tmp_path / "pulled"
    server = Server("s3://models/smol", env={**moto_s3_env, "THAW_SNAPSHOT_CACHE": str(pulled)})
    server.start()
    try:
        server.wait_ready(timeout=300)
        resp = requests.post(
            f"{server.base_url}/generate",
            json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}},
            timeout=120,
        )
        assert resp.status_code == 200 and "Paris" in resp.json()["generated_text"]
        assert (pulled / "manifest.json").is_file()
    finally:
        assert server.stop() == 0


def test_ping_goes_204_then_200_on_the_health_port_and_idle_exit(snapshot: Path) -> None:
    health_port = free_port()
    server = Server(snapshot, env={"PORT_HEALTH": str(health_port), "THAW_IDLE_TIMEOUT": "3"})
    server.start()
    seen: list[int] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            code = requests.get(f"http://127.0.0.1:{health_port}/ping", timeout=2).status_code
        except requests.ConnectionError:
            time.sleep(0.005)
            continue
        if not seen or seen[-1] != code:
            seen.append(code)
        if code == 200:
            break
        time.sleep(0.01)
    assert seen == [204, 200], seen
    resp = requests.post(
        f"{server.base_url}/generate",
        json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
        timeout=60,
    )
    assert resp.status_code == 200
    # Scale to zero: with no request for THAW_IDLE_TIMEOUT seconds the container exits cleanly.
    assert server.proc is not None
    assert server.proc.wait(timeout=60) == 0, server.logs()

"""RunPod-style jobs end to end: states, streaming, cancel, time limits, retention, webhooks,
and no job lost when the worker is killed."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway_fixtures import Gateway

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def submit(gateway: Gateway, prompt: str = "hello world", **extra: object) -> str:
    body = {"input": {"prompt": prompt, "sampling_params": {"max_tokens": 6}}, **extra}
    response = gateway.post("/run", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "IN_QUEUE"
    return response.json()["id"]


def wait_final(gateway: Gateway, job_id: str, timeout_s: float = 20) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        status = gateway.get(f"/status/{job_id}").json()
        if status["status"] in FINAL:
            return status
        assert time.monotonic() < deadline, f"job {job_id} stuck: {status}\n{gateway.log()}"
        time.sleep(0.05)


def test_run_then_status(gateway: Gateway) -> None:
    job_id = submit(gateway)
    status = wait_final(gateway, job_id)
    assert status["status"] == "COMPLETED"
    output = status["output"]
    assert output["text"] == "hello worldhello worldhello world"
    assert output["finish_reason"] == "length"
    assert output["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert status["delayTime"] >= 0 and status["executionTime"] >= 0


def test_runsync_returns_the_output(gateway: Gateway) -> None:
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": 2, "stop": "x"}}}
    answer = gateway.post("/runsync", json=body).json()
    assert answer["status"] == "COMPLETED"
    assert answer["output"]["text"] == "hellohello"


def test_runsync_gives_up_waiting_but_the_job_goes_on(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.05", STUB_TOKENS="1000")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": 20}}}
    answer = gateway.post("/runsync?wait=100", json=body).json()
    assert answer["status"] in {"IN_QUEUE", "IN_PROGRESS"}
    assert wait_final(gateway, answer["id"])["status"] == "COMPLETED"


def test_stream_returns_new_chunks_each_call(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.01", STUB_TOKENS="1000")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello world", "sampling_params": {"max_tokens": 30}}}
    job_id = gateway.post("/run", json=body).json()["id"]
    text, status = "", "IN_QUEUE"
    while status not in FINAL:
        answer = gateway.get(f"/stream/{job_id}").json()
        status = answer["status"]
        text += "".join(chunk["output"]["text"] for chunk in answer["stream"])
        time.sleep(0.03)
    assert status == "COMPLETED"
    assert text == gateway.get(f"/status/{job_id}").json()["output"]["text"]


def test_cancel(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.05", STUB_TOKENS="1000")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": 200}}}
    job_id = gateway.post("/run", json=body).json()["id"]
    time.sleep(0.2)
    assert gateway.post(f"/cancel/{job_id}").json() == {"id": job_id, "status": "CANCELLED"}
    assert wait_final(gateway, job_id)["status"] == "CANCELLED"
    deadline = time.monotonic() + 5
    while "thaw_running_requests 0" not in gateway.get("/metrics").text:
        assert time.monotonic() < deadline, "the cancelled job kept running in the worker"
        time.sleep(0.05)


def test_execution_timeout_and_ttl(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.05", STUB_TOKENS="1000")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": 200}}}
    slow = gateway.post("/run", json={**body, "policy": {"executionTimeout": 300}}).json()["id"]
    short = gateway.post("/run", json={**body, "policy": {"ttl": 300}}).json()["id"]
    assert wait_final(gateway, slow)["status"] == "TIMED_OUT"
    assert wait_final(gateway, short)["status"] == "TIMED_OUT"


def test_results_expire_after_retention(launch) -> None:
    gateway = launch(THAW_JOB_RETENTION_S="0.5")
    gateway.wait_ready()
    job_id = submit(gateway)
    assert wait_final(gateway, job_id)["status"] == "COMPLETED"
    time.sleep(1.0)
    assert gateway.get(f"/status/{job_id}").status_code == 404


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        length = int(self.headers["Content-Length"])
        self.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def webhook_url() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    _Recorder.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_gets_the_final_status(gateway: Gateway, webhook_url: str) -> None:
    job_id = submit(gateway, webhook=webhook_url)
    wait_final(gateway, job_id)
    deadline = time.monotonic() + 5
    while not _Recorder.received:
        assert time.monotonic() < deadline, "no webhook call"
        time.sleep(0.05)
    delivered = _Recorder.received[0]
    assert delivered["id"] == job_id and delivered["status"] == "COMPLETED"
    assert delivered["output"]["text"]


def test_kill_9_of_the_worker_loses_no_job(launch) -> None:
    gateway = launch(STUB_TOKEN_DELAY_S="0.02", STUB_TOKENS="1000", STUB_MAX_RUNNING="8")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello world", "sampling_params": {"max_tokens": 40}}}
    jobs = [gateway.post("/run", json=body).json()["id"] for _ in range(16)]
    # Kill while some jobs are mid-generation and the others still queued.
    deadline = time.monotonic() + 10
    while not any(gateway.get(f"/status/{j}").json()["status"] == "IN_PROGRESS" for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    (worker,) = gateway.worker_pids()
    os.kill(worker, signal.SIGKILL)
    finals = [wait_final(gateway, job_id, timeout_s=30) for job_id in jobs]
    assert [f["status"] for f in finals] == ["COMPLETED"] * 16
    expected = "hello world" * 20
    assert all(f["output"]["text"] == expected for f in finals)
    assert gateway.worker_pids() != [worker]
    assert "thaw_worker_restarts_total 1" in gateway.get("/metrics").text


def test_crash_on_submit_requeues_requests(launch, tmp_path: Path) -> None:
    gateway = launch(STUB_CRASH_AFTER_SUBMITS="3", STUB_CRASH_ONCE_FILE=str(tmp_path / "crashed"))
    gateway.wait_ready()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}
    results = []

    def call() -> None:
        results.append(gateway.post("/generate", json=body).status_code)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (tmp_path / "crashed").exists()
    assert results == [200] * 6

"""Poison requests and crash loops, through the real gateway and the stub worker's crash switches:
a request that kills every worker it reaches fails after two attempts (so does its job), and a
worker that keeps dying opens the crash-loop breaker (/ping 503, the reason in /ready)."""

from __future__ import annotations

import re
import time

from tests.support.gateway_fixtures import Gateway

# max_new_tokens that makes the stub worker exit on submit (STUB_CRASH_ON_MAX_TOKENS).
POISON = 13
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


def restarts(gateway: Gateway) -> int:
    text = gateway.get("/metrics").text
    found = re.search(r"^thaw_worker_restarts_total (\d+)", text, re.MULTILINE)
    assert found, text
    return int(found.group(1))


def generate(gateway: Gateway, max_new_tokens: int, route: str = "/generate") -> dict:
    body = {"inputs": "hello", "parameters": {"max_new_tokens": max_new_tokens}}
    response = gateway.post(route, json=body)
    return {"status": response.status_code, "body": response.json()}


def test_a_request_that_kills_every_worker_fails_after_two_attempts(launch) -> None:
    gateway = launch(STUB_CRASH_ON_MAX_TOKENS=str(POISON), THAW_CRASH_LOOP_CRASHES="10")
    gateway.wait_ready()
    poisoned = generate(gateway, POISON)
    print(f"poison request: {poisoned}, restarts {restarts(gateway)}")
    assert poisoned["status"] == 500
    assert poisoned["body"]["error_type"] == "generation"
    assert "crashed 2 times while running this request" in poisoned["body"]["error"]
    assert restarts(gateway) == 2
    # The gateway serves on: the next worker answers other requests.
    gateway.wait_ready()
    assert generate(gateway, 4)["status"] == 200
    # A stream fails before its first event, with the status code.
    streamed = generate(gateway, POISON, route="/generate_stream")
    assert streamed["status"] == 500
    assert "crashed 2 times" in streamed["body"]["error"]
    assert restarts(gateway) == 4


def test_a_job_that_kills_every_worker_is_failed_with_the_reason(launch) -> None:
    gateway = launch(STUB_CRASH_ON_MAX_TOKENS=str(POISON), THAW_CRASH_LOOP_CRASHES="10")
    gateway.wait_ready()
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": POISON}}}
    job_id = gateway.post("/run", json=body).json()["id"]
    deadline = time.monotonic() + 20
    while (status := gateway.get(f"/status/{job_id}").json())["status"] not in FINAL:
        assert time.monotonic() < deadline, f"job stuck: {status}\n{gateway.log()}"
        time.sleep(0.05)
    print(f"poison job: {status}, restarts {restarts(gateway)}")
    assert status["status"] == "FAILED"
    assert "crashed 2 times while running this request" in status["error"]
    assert restarts(gateway) == 2


def test_a_crash_loop_opens_the_breaker(launch) -> None:
    gateway = launch(
        STUB_CRASH_AFTER_READY_S="0.2",
        THAW_CRASH_LOOP_CRASHES="3",
        THAW_CRASH_LOOP_WINDOW_S="60",
    )
    deadline = time.monotonic() + 20
    while (ping := gateway.get("/ping").status_code) != 503:
        assert time.monotonic() < deadline, f"breaker never opened; log:\n{gateway.log()}"
        time.sleep(0.05)
    ready = gateway.get("/ready")
    report = ready.json()
    print(f"/ping {ping}, /ready {ready.status_code}: {report.get('reason')}")
    assert ready.status_code == 503
    assert report["phase"] == "failed"
    assert "crash loop" in report["reason"]
    # Three crashes, two restarts, and no more: no worker is left running.
    assert restarts(gateway) == 2
    time.sleep(0.5)
    assert gateway.worker_pids() == []
    assert restarts(gateway) == 2
    refused = generate(gateway, 4)
    assert refused["status"] == 503
    assert "crash loop" in refused["body"]["error"]

"""Poison requests through the whole product: a real `thaw serve` with the worker's documented
fault injection (THAW_FAULT_INJECT, off unless set).

- A request whose logits go bad inside the worker fails alone with a clear error; the requests
  batched with it complete with exactly the text they get without it, and the worker lives on.
- A request that kills the worker is tried at most twice (two restarts), then fails, and its job
  is FAILED with the reason; the next request is served.
- Requests that keep killing workers open the crash-loop breaker: /ping answers 503 and /ready
  says why, so the platform replaces the worker instead of billing a loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.serve_fixtures import Server, serving

NAN_TOKEN = 48_999  # rare in ordinary text: only the poisoned prompts below carry them
CRASH_TOKEN = 48_998
PROMPTS = [[1, 504, 3458, 314, 4649, 314], [1, 4444, 12, 43, 991], [1, 22, 333, 4444, 5555, 6]]


def completion(base: str, prompt: list[int], tokens: int = 12) -> requests.Response:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    return requests.post(base + "/v1/completions", json=body, timeout=120)


def restarts(server: Server) -> float:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    match = re.search(r"^thaw_worker_restarts_total ([0-9.]+)$", text, re.M)
    assert match is not None
    return float(match.group(1))


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {
        "THAW_FAULT_INJECT": f"nan_logits_token={NAN_TOKEN},crash_token={CRASH_TOKEN}",
        "THAW_DTYPE": "bfloat16",
        "THAW_RESTART_BACKOFF_MS": "100",
        "THAW_CRASH_LOOP_CRASHES": "5",
        "THAW_CRASH_LOOP_WINDOW_S": "120",
    }
    with serving(env) as srv:
        yield srv


def test_a_poisoned_request_fails_alone(server: Server) -> None:
    base = server.base_url
    clean = [completion(base, p).json()["choices"][0]["text"] for p in PROMPTS]
    poisoned = [*PROMPTS[0][:3], NAN_TOKEN, *PROMPTS[0][3:]]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(completion, base, p) for p in PROMPTS]
        bad = pool.submit(completion, base, poisoned)
        answers = [f.result() for f in futures]
        failed = bad.result()
    assert failed.status_code >= 400 and failed.json()["error"], failed.text
    assert [a.json()["choices"][0]["text"] for a in answers] == clean
    assert restarts(server) == 0  # the worker lived through it


def test_a_request_that_kills_the_worker_is_tried_twice_then_fails(server: Server) -> None:
    base = server.base_url
    before = restarts(server)
    # The crash token goes in as a token id, through the job API's OpenAI passthrough.
    body = {
        "input": {
            "openai_route": "/v1/completions",
            "openai_input": {"prompt": [1, 22, CRASH_TOKEN, 7], "max_tokens": 4},
        }
    }
    job = requests.post(base + "/runsync", json=body, timeout=300).json()
    deadline = time.monotonic() + 120
    while job["status"] in ("IN_QUEUE", "IN_PROGRESS") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = requests.get(f"{base}/status/{job['id']}", timeout=10).json()
    assert job["status"] == "FAILED", job
    assert "crashed" in str(job.get("error")), job
    server.wait_ready()
    assert restarts(server) - before == 2
    # The worker that came back serves the next request.
    assert completion(base, PROMPTS[1]).status_code == 200


def test_a_crash_loop_opens_the_breaker() -> None:
    env = {
        "THAW_FAULT_INJECT": f"crash_token={CRASH_TOKEN}",
        "THAW_DTYPE": "bfloat16",
        "THAW_RESTART_BACKOFF_MS": "100",
        "THAW_CRASH_LOOP_CRASHES": "3",
        "THAW_CRASH_LOOP_WINDOW_S": "120",
    }
    with serving(env) as srv:
        base = srv.base_url
        for _ in range(2):  # two poison requests: up to four crashes, the breaker opens at three
            completion(base, [1, CRASH_TOKEN, 5], tokens=2)
            if requests.get(base + "/ping", timeout=10).status_code == 503:
                break
        ping = requests.get(base + "/ping", timeout=10)
        ready = requests.get(base + "/ready", timeout=10)
        assert ping.status_code == 503
        assert ready.status_code == 503 and "crash loop" in ready.json().get("reason", "")
        refused = completion(base, PROMPTS[0], tokens=2)
        assert refused.status_code == 503

"""Every bad input gets its status code and a JSON error, and the gateway keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.gateway_fixtures import Gateway, start_gateway

JSON = {"Content-Type": "application/json"}
TEN_MB = b'{"inputs": "' + b"a" * (10 * 1024 * 1024) + b'"}'

# (name, method, path, raw body, expected status)
BAD_INPUTS = [
    ("malformed JSON", "post", "/generate", b'{"inputs": ', 400),
    ("empty body", "post", "/generate", b"", 400),
    ("invalid UTF-8", "post", "/generate", b'{"inputs": "\xff\xfe"}', 400),
    ("inputs not a string", "post", "/generate", b'{"inputs": 5}', 422),
    ("missing inputs", "post", "/generate", b'{"parameters": {}}', 422),
    (
        "max_new_tokens of the wrong type",
        "post",
        "/generate",
        b'{"inputs": "hi", "parameters": {"max_new_tokens": "ten"}}',
        422,
    ),
    (
        "negative max_new_tokens",
        "post",
        "/generate",
        b'{"inputs": "hi", "parameters": {"max_new_tokens": -5}}',
        422,
    ),
    ("top_p above 1", "post", "/generate", b'{"inputs": "hi", "parameters": {"top_p": 1.5}}', 422),
    (
        "typical_p unsupported",
        "post",
        "/generate_stream",
        b'{"inputs": "hi", "parameters": {"typical_p": 0.5}}',
        422,
    ),
    (
        "negative temperature",
        "post",
        "/generate",
        b'{"inputs": "hi", "parameters": {"temperature": -1}}',
        422,
    ),
    (
        "empty stop string",
        "post",
        "/generate",
        b'{"inputs": "hi", "parameters": {"stop": [""]}}',
        422,
    ),
    ("a 10 MB body", "post", "/generate", TEN_MB, 413),
    ("over-long prompt", "post", "/generate", b'{"inputs": "' + b"zq9 " * 600 + b'"}', 422),
    (
        "prompt plus new tokens too long",
        "post",
        "/generate",
        b'{"inputs": "hi", "parameters": {"max_new_tokens": 100000}}',
        422,
    ),
    ("unknown job", "get", "/status/no-such-job", b"", 404),
    ("unknown job stream", "get", "/stream/no-such-job", b"", 404),
    ("cancel unknown job", "post", "/cancel/no-such-job", b"", 404),
    ("unknown route", "get", "/nope", b"", 404),
    ("job without input", "post", "/run", b"{}", 422),
    ("job input without prompt", "post", "/run", b'{"input": {}}', 422),
    (
        "job with prompt and messages",
        "post",
        "/run",
        b'{"input": {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}}',
        422,
    ),
    (
        "messages without a chat template",
        "post",
        "/run",
        b'{"input": {"messages": [{"role": "user", "content": "b"}]}}',
        422,
    ),
    (
        "job with bad sampling params",
        "post",
        "/run",
        b'{"input": {"prompt": "a", "sampling_params": {"top_p": 7}}}',
        422,
    ),
    (
        "job with a bad webhook",
        "post",
        "/run",
        b'{"input": {"prompt": "a"}, "webhook": "nope"}',
        422,
    ),
    ("runsync with a bad wait", "post", "/runsync?wait=soon", b'{"input": {"prompt": "a"}}', 400),
]


@pytest.fixture(scope="module")
def shared_gateway(
    gateway_binary: Path, tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(gateway_binary, tiny_snapshot, tmp_path_factory.mktemp("errors"))
    gateway.wait_ready()
    yield gateway
    gateway.stop()


def assert_still_serving(gateway: Gateway) -> None:
    assert gateway.get("/health").status_code == 200
    good = gateway.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_its_status(
    shared_gateway: Gateway, method: str, path: str, body: bytes, status: int
) -> None:
    try:
        response = getattr(requests, method)(
            shared_gateway.url + path, data=body, headers=JSON, timeout=30
        )
    except requests.ConnectionError:
        pytest.fail("the gateway dropped the connection instead of answering")
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error"]
    assert_still_serving(shared_gateway)


def test_api_key(launch) -> None:
    gateway = launch(THAW_API_KEY="s3cret")
    gateway.wait_ready()
    assert gateway.get("/health").status_code == 200
    assert gateway.get("/ping").status_code == 200
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        refused = gateway.post("/generate", json=body, headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error_type"] == "unauthorized"
    assert gateway.get("/metrics").status_code == 401
    # /ready answers probes without the key, with the bare status only.
    assert gateway.get("/ready").json() == {"ready": True, "phase": "ready"}
    ok = {"Authorization": "Bearer s3cret"}
    assert gateway.post("/generate", json=body, headers=ok).status_code == 200
    assert gateway.get("/ready", headers=ok).status_code == 200


def test_full_queue_answers_429(launch) -> None:
    gateway = launch(THAW_WORKER_CMD="sleep 30", THAW_QUEUE_CAPACITY="2")
    job = {"input": {"prompt": "hello"}}
    assert gateway.post("/run", json=job).status_code == 200
    assert gateway.post("/run", json=job).status_code == 200
    refused = gateway.post("/run", json=job)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error_type"] == "overloaded"
    assert gateway.post("/generate", json={"inputs": "x"}).status_code == 429

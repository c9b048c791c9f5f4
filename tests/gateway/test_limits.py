"""Limits the gateway enforces before the worker is reached: the worker's own context (its
`max_context` at ready), the length of stop strings, JSON-only bodies, and a chat template that
never ends."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.gateway_fixtures import Gateway

# Tokens of the tiny tokenizer in one repetition of this text.
WORDS = "hello world "


def prompt_of_at_least(tokens: int) -> str:
    return WORDS * tokens


def test_prompts_over_the_workers_context_are_422_before_the_worker(launch) -> None:
    # The snapshot says 256 tokens of context; the worker holds 64.
    gateway = launch(STUB_MAX_CONTEXT="64")
    gateway.wait_ready()
    info = gateway.get("/info").json()
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (63, 64)
    assert gateway.get("/v1/models").json()["data"][0]["max_model_len"] == 64
    long = {"inputs": prompt_of_at_least(80), "parameters": {"max_new_tokens": 1}}
    response = gateway.post("/generate", json=long)
    assert response.status_code == 422, response.text
    assert "limit is 63" in response.json()["error"]
    fits = {"inputs": "hello", "parameters": {"max_new_tokens": 4}}
    assert gateway.post("/generate", json=fits).status_code == 200


def test_prompts_queued_before_ready_are_checked_when_the_worker_says_its_context(
    launch,
) -> None:
    gateway = launch(STUB_MAX_CONTEXT="64", STUB_START_DELAY_S="1")
    long = {"inputs": prompt_of_at_least(80), "parameters": {"max_new_tokens": 1}}
    response = gateway.post("/generate", json=long)
    assert response.status_code == 422, response.text
    assert "the worker's context limit is 64" in response.json()["error"]


def test_stop_strings_are_capped_in_length(gateway: Gateway) -> None:
    def generate(stop: str) -> int:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 4, "stop": [stop]}}
        return gateway.post("/generate", json=body).status_code

    assert generate("x" * 512) == 200
    assert generate("x" * 513) == 422
    body = {"prompt": "hello", "max_tokens": 4, "stop": "é" * 257}
    response = gateway.post("/v1/completions", json=body)
    assert response.status_code == 422
    assert "512 bytes" in response.json()["error"]


def test_bodies_must_be_json(gateway: Gateway) -> None:
    body = b'{"inputs": "hello", "parameters": {"max_new_tokens": 2}}'
    for route in ("/generate", "/v1/completions", "/run", "/tokenize"):
        response = gateway.post(route, data=body, headers={"Content-Type": "text/plain"})
        assert response.status_code == 415, (route, response.text)
        assert response.json()["error_type"] == "unsupported_media_type"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert gateway.post("/generate", data=body, headers=form).status_code == 415
    # JSON with parameters, and no Content-Type at all, are read as JSON.
    utf8 = {"Content-Type": "application/json; charset=utf-8"}
    assert gateway.post("/generate", data=body, headers=utf8).status_code == 200
    assert gateway.post("/generate", data=body).status_code == 200


def test_a_chat_template_that_never_ends_fails_the_request(
    launch, tiny_snapshot: Path, tmp_path: Path
) -> None:
    snapshot = tmp_path / "looping"
    shutil.copytree(tiny_snapshot, snapshot)
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (snapshot / "chat_template.jinja").write_text(loop)
    gateway = launch(THAW_SNAPSHOT=str(snapshot))
    gateway.wait_ready()
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = gateway.post("/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert "fuel" in response.json()["error"]
    # The gateway still answers.
    assert gateway.post("/generate", json={"inputs": "hello"}).status_code == 200

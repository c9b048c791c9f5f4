"""TGI routes end to end, against the stub worker that echoes the prompt's tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from tests.support.gateway_fixtures import encode

MULTI_BYTE = "Grüße aus Köln 🙂 日本語"


def expected_echo(snapshot: Path, prompt: str, n: int) -> str:
    """The text of the stub's first `n` tokens: the prompt's ids, cyclically."""
    from tokenizers import Tokenizer

    ids = encode(snapshot, prompt)
    echoed = [ids[i % len(ids)] for i in range(n)]
    return Tokenizer.from_file(str(snapshot / "tokenizer.json")).decode(echoed)


def sse_events(response: requests.Response) -> list[dict]:
    events = []
    # SSE is UTF-8 by definition; requests would guess Latin-1 from the bare content type.
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            events.append(json.loads(line[len(b"data:") :].decode("utf-8")))
    return events


def test_generate_detokenizes_multi_byte_text(launch, tiny_snapshot: Path) -> None:
    gateway = launch(STUB_TOKENS="100")
    gateway.wait_ready()
    n = len(encode(tiny_snapshot, MULTI_BYTE)) + 3
    body = {"inputs": MULTI_BYTE, "parameters": {"max_new_tokens": n, "details": True}}
    answer = gateway.post("/generate", json=body).json()
    assert answer["generated_text"] == expected_echo(tiny_snapshot, MULTI_BYTE, n)
    details = answer["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == n == len(details["tokens"])
    assert "".join(t["text"] for t in details["tokens"]) == answer["generated_text"]


def test_generate_stops_at_eos(gateway) -> None:
    answer = gateway.post(
        "/generate", json={"inputs": "hello world", "parameters": {"details": True}}
    ).json()
    details = answer["details"]
    assert details["finish_reason"] == "eos_token"
    assert details["generated_tokens"] == 8  # the stub's default STUB_TOKENS
    assert details["tokens"][-1] == {"id": 0, "text": "", "logprob": -0.5, "special": True}


def test_stop_sequence_is_trimmed(launch, tiny_snapshot: Path) -> None:
    gateway = launch(STUB_TOKENS="100")
    gateway.wait_ready()
    prompt = "hello world, hello gateway, streaming tokens"
    params = {"max_new_tokens": 40, "stop": ["gateway"], "details": True}
    answer = gateway.post("/generate", json={"inputs": prompt, "parameters": params}).json()
    assert answer["generated_text"] == "hello world, hello "
    assert answer["details"]["finish_reason"] == "stop_sequence"


def test_return_full_text_and_top_tokens(gateway) -> None:
    params = {"max_new_tokens": 3, "return_full_text": True, "details": True, "top_n_tokens": 2}
    answer = gateway.post("/generate", json={"inputs": "hello", "parameters": params}).json()
    assert answer["generated_text"].startswith("hellohello")
    assert all(len(top) == 2 for top in answer["details"]["top_tokens"])


def test_generate_stream_events(launch, tiny_snapshot: Path) -> None:
    gateway = launch(STUB_TOKENS="100")
    gateway.wait_ready()
    n = 12
    body = {"inputs": MULTI_BYTE, "parameters": {"max_new_tokens": n}}
    with gateway.post("/generate_stream", json=body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert [e["index"] for e in events] == list(range(1, n + 1))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["details"]["finish_reason"] == "length"
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["generated_text"] == expected_echo(tiny_snapshot, MULTI_BYTE, n)


def test_client_disconnect_cancels_the_request(launch) -> None:
    gateway = launch(STUB_TOKENS="10000", STUB_TOKEN_DELAY_S="0.02")
    gateway.wait_ready()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 200}}
    with gateway.post("/generate_stream", json=body, stream=True) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data:")
    deadline = time.monotonic() + 5
    while "thaw_running_requests 0" not in gateway.get("/metrics").text:
        assert time.monotonic() < deadline, "the request kept running after the disconnect"
        time.sleep(0.05)


def test_info_and_tokenize(gateway, tiny_snapshot: Path) -> None:
    info = gateway.get("/info").json()
    assert info["model_id"] == "tiny-stub"
    assert info["max_total_tokens"] == 256 and info["max_input_tokens"] == 255
    tokens = gateway.post("/tokenize", json={"inputs": MULTI_BYTE}).json()
    assert [t["id"] for t in tokens] == encode(tiny_snapshot, MULTI_BYTE)
    assert all(MULTI_BYTE.encode()[t["start"] : t["stop"]].decode() == t["text"] for t in tokens)


def test_huggingface_client(gateway) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=gateway.url)
    text = client.text_generation("hello world", max_new_tokens=4)
    assert text == "hello worldhello world"
    streamed = "".join(client.text_generation("hello world", max_new_tokens=4, stream=True))
    assert streamed == text

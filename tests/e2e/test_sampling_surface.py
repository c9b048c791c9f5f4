"""The rest of the sampling surface through the real clients, gateway and worker (issue 16):
`n` and `best_of` (forks of one prompt), `logit_bias`, `min_tokens`, `stop_token_ids`,
`ignore_eos`, prompt logprobs (completions `echo` + `logprobs`, TGI `decoder_input_details`),
and /run jobs carrying `response_format` and `n`.

The default snapshot is served in float32 so that prompt logprobs can be compared with
transformers on the same snapshot.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import requests
from tokenizers import Tokenizer

from tests.support.serve_fixtures import Server, ensure_default_snapshot

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Write one short sentence about the sea."}]
BANANA = " banana"
# Prompt logprobs: the engine's float32 against transformers' float32 (different kernels).
LOGPROB_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_default_snapshot()


@pytest.fixture(scope="module")
def server(snapshot: Path, gateway_binary: Path) -> Iterator[Server]:
    srv = Server(snapshot).start().wait_ready()
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300
    )


@pytest.fixture(scope="module")
def tokenizer(snapshot: Path) -> Tokenizer:
    return Tokenizer.from_file(str(snapshot / "tokenizer.json"))


@pytest.fixture(scope="module")
def prompt_logprobs_hf(snapshot: Path, tokenizer: Tokenizer) -> list[float]:
    """transformers' float32 logprob of every prompt token from the second on."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer.encode(PROMPT).ids
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def complete(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.completions.create(model="default", **kw)


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="default", **kw)


def refused(call: Any, field_name: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        call()
    assert field_name in info.value.response.text, info.value.response.text


# --- n and best_of ----------------------------------------------------------------------------


def test_n_returns_n_choices_with_summed_usage(client: openai.OpenAI) -> None:
    resp = chat(client, n=3, max_tokens=6, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 3 * 6
    # Greedy forks of one prompt are the same text, and the same as n=1.
    single = chat(client, max_tokens=6, extra_body={"ignore_eos": True})
    assert {c.message.content for c in resp.choices} == {single.choices[0].message.content}
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens


def test_n_usage_counts_each_choice_own_length(client: openai.OpenAI) -> None:
    resp = complete(client, n=3, max_tokens=24, temperature=1.0, seed=5, logprobs=0)
    assert len(resp.choices) == 3
    lengths = [len(c.logprobs.tokens) for c in resp.choices]
    assert resp.usage.completion_tokens == sum(lengths), (resp.usage, lengths)


def test_seeded_n_choices_differ_and_repeat(client: openai.OpenAI) -> None:
    def texts(**kw: Any) -> list[str]:
        resp = chat(client, n=3, max_tokens=12, temperature=1.0, **kw)
        return [c.message.content or "" for c in sorted(resp.choices, key=lambda c: c.index)]

    first = texts(seed=1234)
    assert len(set(first)) > 1, first
    assert texts(seed=1234) == first
    # Fork i samples with seed + i: choice 1 of seed s is choice 0 of seed s + 1.
    assert texts(seed=1235)[0] == first[1]


def test_streamed_n_tags_chunks_by_index(client: openai.OpenAI) -> None:
    unary = chat(client, n=2, max_tokens=8)
    chunks = list(chat(client, n=2, max_tokens=8, stream=True))
    joined: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            joined[choice.index] = joined.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(joined) == [0, 1]
    assert joined == {c.index: c.message.content for c in unary.choices}
    assert finishes == {c.index: c.finish_reason for c in unary.choices}


def test_best_of_keeps_the_likeliest_candidate(client: openai.OpenAI) -> None:
    seed, tokens = 77, 10
    resp = complete(
        client,
        best_of=3,
        max_tokens=tokens,
        temperature=1.0,
        seed=seed,
        extra_body={"ignore_eos": True},
    )
    assert len(resp.choices) == 1
    # Every candidate's tokens are counted, as OpenAI bills them.
    assert resp.usage.completion_tokens == 3 * tokens
    candidates = []
    for i in range(3):
        one = complete(
            client,
            max_tokens=tokens,
            temperature=1.0,
            seed=seed + i,
            logprobs=0,
            extra_body={"ignore_eos": True},
        )
        candidates.append((sum(one.choices[0].logprobs.token_logprobs), one.choices[0].text))
    assert resp.choices[0].text == max(candidates)[1], candidates


def test_bad_n_and_best_of_are_refused(client: openai.OpenAI) -> None:
    refused(lambda: chat(client, n=17), "n")
    refused(lambda: complete(client, n=3, best_of=2), "best_of")
    refused(lambda: complete(client, best_of=2, stream=True), "best_of")
    refused(lambda: complete(client, best_of=17), "best_of")


# --- logit_bias, min_tokens, stop_token_ids, ignore_eos ---------------------------------------


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    (banana,) = tokenizer.encode(BANANA).ids
    resp = complete(client, max_tokens=4, logprobs=0, logit_bias={str(banana): 100})
    assert resp.choices[0].text == BANANA * 4
    # Reported logprobs stay the model's own, not the biased distribution's.
    assert all(lp < -1.0 for lp in resp.choices[0].logprobs.token_logprobs)
    greedy = complete(client, max_tokens=1, logprobs=0)
    first = tokenizer.encode(greedy.choices[0].text).ids[0]
    banned = complete(client, max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].text != greedy.choices[0].text
    chat_resp = chat(client, max_tokens=3, logit_bias={str(banana): 100})
    assert (chat_resp.choices[0].message.content or "").strip() == (BANANA * 3).strip()


def test_bad_logit_bias_is_refused(client: openai.OpenAI) -> None:
    refused(lambda: complete(client, logit_bias={"5": 101}), "logit_bias")
    refused(lambda: complete(client, logit_bias={"10000000": 1}), "logit_bias")
    refused(lambda: complete(client, logit_bias={"not-a-token": 1}), "logit_bias")
    refused(lambda: complete(client, logit_bias={str(i): 1 for i in range(301)}), "logit_bias")


def test_min_tokens_holds_back_eos(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Say hi."}]
    natural = chat(client, messages=messages, max_tokens=64)
    assert natural.choices[0].finish_reason == "stop", natural
    floor = natural.usage.completion_tokens + 6
    held = chat(client, messages=messages, max_tokens=64, extra_body={"min_tokens": floor})
    assert held.usage.completion_tokens >= floor
    refused(lambda: chat(client, max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens")


def test_stop_token_ids_and_ignore_eos(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    free = complete(client, max_tokens=8, logprobs=0)
    tokens = free.choices[0].logprobs.tokens
    assert len(tokens) == 8
    stop_id = tokenizer.encode(tokens[3]).ids[0]
    stopped = complete(client, max_tokens=8, extra_body={"stop_token_ids": [stop_id]})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens <= 4
    messages = [{"role": "user", "content": "Say hi."}]
    endless = chat(client, messages=messages, max_tokens=40, extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == 40
    assert endless.choices[0].finish_reason == "length"


# --- prompt logprobs ---------------------------------------------------------------------------


def test_completions_echo_with_logprobs(
    client: openai.OpenAI, tokenizer: Tokenizer, prompt_logprobs_hf: list[float]
) -> None:
    ids = tokenizer.encode(PROMPT).ids
    resp = complete(client, echo=True, logprobs=2, max_tokens=4)
    choice = resp.choices[0]
    plain = complete(client, max_tokens=4)
    assert choice.text == PROMPT + plain.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert "".join(lp.tokens[: len(ids)]) == PROMPT
    assert lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    for got, want in zip(lp.token_logprobs[1 : len(ids)], prompt_logprobs_hf, strict=True):
        assert math.isclose(got, want, abs_tol=LOGPROB_TOLERANCE), (got, want)
    for i in range(1, len(ids)):
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-4
    # Streamed echo carries the same prompt tokens first.
    chunks = list(complete(client, echo=True, logprobs=0, max_tokens=4, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text


def test_tgi_decoder_input_details_are_real(
    server: Server, tokenizer: Tokenizer, prompt_logprobs_hf: list[float]
) -> None:
    from huggingface_hub import InferenceClient

    ids = tokenizer.encode(PROMPT).ids
    hub = InferenceClient(base_url=server.base_url)
    out = hub.text_generation(PROMPT, max_new_tokens=4, details=True, decoder_input_details=True)
    prefill = out.details.prefill
    assert [t.id for t in prefill] == ids
    assert prefill[0].logprob is None
    for token, want in zip(prefill[1:], prompt_logprobs_hf, strict=True):
        assert isinstance(token.logprob, float) and math.isfinite(token.logprob)
        assert math.isclose(token.logprob, want, abs_tol=LOGPROB_TOLERANCE), (token, want)


# --- /run jobs --------------------------------------------------------------------------------


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 10},
        "ok": {"type": "boolean"},
    },
    "required": ["word", "ok"],
    "additionalProperties": False,
}


def test_jobs_carry_response_format_and_n(server: Server) -> None:
    openai_input = {
        "model": "default",
        "messages": CHAT,
        "max_tokens": 64,
        "temperature": 1.0,
        "seed": 9,
        "n": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "word", "schema": SCHEMA, "strict": True},
        },
    }
    body = {"input": {"openai_route": "/v1/chat/completions", "openai_input": openai_input}}
    answer = requests.post(f"{server.base_url}/runsync", json=body, timeout=300).json()
    assert answer["status"] == "COMPLETED", answer
    choices = answer["output"]["choices"]
    assert sorted(c["index"] for c in choices) == [0, 1]
    for choice in choices:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    # An asynchronous /run with a vLLM extra, polled to the end.
    extra = {**openai_input, "n": 1, "response_format": None, "guided_choice": ["up", "down"]}
    body = {"input": {"openai_route": "/v1/chat/completions", "openai_input": extra}}
    job = requests.post(f"{server.base_url}/run", json=body, timeout=30).json()
    deadline = time.monotonic() + 120
    while True:
        status = requests.get(f"{server.base_url}/status/{job['id']}", timeout=30).json()
        if status["status"] not in ("IN_QUEUE", "IN_PROGRESS") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status["status"] == "COMPLETED", status
    assert status["output"]["choices"][0]["message"]["content"] in ("up", "down")

"""The real `openai` and `huggingface_hub` clients against the real gateway and worker.

One `thaw serve` of the default snapshot (float32) serves the whole module; expected texts and
token counts come from transformers on the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.serve_fixtures import Server, ensure_default_snapshot

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one?"},
]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_default_snapshot()


@pytest.fixture(scope="module")
def server(snapshot: Path) -> Iterator[Server]:
    srv = Server(snapshot).start().wait_ready()
    yield srv
    assert srv.stop() == 0, srv.logs()


@pytest.fixture(scope="module")
def hf(snapshot: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    return tok, model


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    import torch

    tok, model = hf
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_chat_matches_transformers_with_exact_usage(client: openai.OpenAI, hf) -> None:
    tok, _ = hf
    prompt_ids = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    expected_ids = hf_greedy(hf, list(prompt_ids), 16)
    resp = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=16, temperature=0
    )
    choice = resp.choices[0]
    eos_trimmed = [t for t in expected_ids if t not in (tok.eos_token_id,)]
    assert choice.message.role == "assistant"
    assert choice.message.content == tok.decode(eos_trimmed, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.completion_tokens == len(expected_ids)
    assert resp.usage.total_tokens == len(prompt_ids) + len(expected_ids)
    assert choice.finish_reason in ("stop", "length")


def test_chat_stream_equals_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=CHAT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason


def test_completion_matches_transformers(client: openai.OpenAI, hf) -> None:
    tok, _ = hf
    ids = tok(PROMPT).input_ids
    expected = tok.decode(hf_greedy(hf, ids, 10), skip_special_tokens=True)
    resp = client.completions.create(model="default", prompt=PROMPT, max_tokens=10, temperature=0)
    assert resp.choices[0].text == expected
    assert resp.usage.prompt_tokens == len(ids)
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="default", prompt=PROMPT, max_tokens=10, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == expected


def test_stop_string_trims_and_reports_stop(client: openai.OpenAI) -> None:
    def complete(**kw: object) -> openai.types.Completion:
        return client.completions.create(
            model="default", prompt="1, 2, 3,", max_tokens=12, temperature=0, **kw
        )

    text = complete().choices[0].text
    assert len(text) >= 8, text
    # Three characters from inside the text: a stop string that spans token boundaries.
    stop = text[4:7]
    resp = complete(stop=[stop, "never-generated"])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == text[: text.index(stop)]


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        resp = client.chat.completions.create(
            model="default", messages=CHAT, max_tokens=16, temperature=1.0, seed=seed
        )
        return resp.choices[0].message.content or ""

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_unsupported_parameters_are_refused(client: openai.OpenAI) -> None:
    def refusal(**kw: object) -> str:
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.chat.completions.create(model="default", messages=CHAT, **kw)
        return refused.value.response.json()["error"]

    assert "`n`" in refusal(n=17)
    functions = [{"name": "f", "parameters": {}}]
    assert "function" in refusal(functions=functions, function_call={"name": "f"})
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.completions.create(model="default", prompt="a", suffix="b", max_tokens=2)
    assert "suffix" in refused.value.response.json()["error"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages="not a list")  # type: ignore[arg-type]


def test_models_lists_the_snapshot(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert len(models.data) == 1 and models.data[0].id


def test_huggingface_text_generation(server: Server, hf) -> None:
    from huggingface_hub import InferenceClient

    tok, _ = hf
    expected = tok.decode(hf_greedy(hf, tok(PROMPT).input_ids, 8), skip_special_tokens=True)
    hub = InferenceClient(base_url=server.base_url)
    out = hub.text_generation(PROMPT, max_new_tokens=8, details=True)
    assert out.generated_text == expected
    assert out.details.generated_tokens == 8
    assert out.details.finish_reason == "length"
    streamed = list(hub.text_generation(PROMPT, max_new_tokens=8, stream=True, details=True))
    assert "".join(s.token.text for s in streamed) == expected
    assert streamed[-1].generated_text == expected


def test_huggingface_chat_completion(server: Server, client: openai.OpenAI) -> None:
    from huggingface_hub import InferenceClient

    hub = InferenceClient(base_url=server.base_url)
    out = hub.chat_completion(CHAT, max_tokens=12, temperature=0)
    ref = client.chat.completions.create(
        model="default", messages=CHAT, max_tokens=12, temperature=0
    )
    assert out.choices[0].message.content == ref.choices[0].message.content

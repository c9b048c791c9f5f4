"""Issue 16's sampling surface through the gateway, with the real `openai` and `huggingface_hub`
clients, against the stub worker: `n` and `best_of` (forks with `fork_of`, seed + i), `echo`
with prompt logprobs, `logit_bias` / `min_tokens` / `stop_token_ids` passed through, TGI's
`decoder_input_details`, and the same fields through `/runsync` jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.gateway.test_openai import CHAT, client_for, ids_of, make_chat_snapshot, render
from tests.support.gateway_fixtures import Gateway, encode, start_gateway


@pytest.fixture(scope="module")
def chat_snapshot(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_snapshot(tiny_snapshot, tmp_path_factory.mktemp("choices-snapshot"))


@pytest.fixture()
def launch_chat(
    gateway_binary: Path, chat_snapshot: Path, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def _launch(**overrides: str) -> Gateway:
        gateway = start_gateway(gateway_binary, chat_snapshot, tmp_path, **overrides)
        started.append(gateway)
        gateway.wait_ready()
        return gateway

    yield _launch
    for gateway in started:
        gateway.stop()


@pytest.fixture()
def chat_gateway(launch_chat: Callable[..., Gateway]) -> Gateway:
    return launch_chat()


@pytest.fixture()
def client(chat_gateway: Gateway) -> openai.OpenAI:
    return client_for(chat_gateway)


def submits(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def logged_gateway(launch_chat: Callable[..., Gateway], tmp_path: Path) -> tuple[Gateway, Path]:
    log = tmp_path / "submits.jsonl"
    return launch_chat(STUB_SUBMIT_LOG=str(log)), log


def test_n_choices_fork_the_first_and_sum_usage(
    launch_chat: Callable[..., Gateway], tmp_path: Path, chat_snapshot: Path
) -> None:
    gateway, log = logged_gateway(launch_chat, tmp_path)
    client = client_for(gateway)
    resp = client.chat.completions.create(
        model="m", messages=CHAT, n=3, max_tokens=4, seed=11, temperature=0.8
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert len({c.message.content for c in resp.choices}) == 1, "the stub echoes the prompt"
    prompt_tokens = len(ids_of(chat_snapshot, render(CHAT)))
    assert resp.usage.prompt_tokens == prompt_tokens
    assert resp.usage.completion_tokens == 3 * 4
    sent = submits(log)
    assert len(sent) == 3
    first = sent[0]
    assert first["fork_of"] is None
    assert [s["fork_of"] for s in sent[1:]] == [first["id"], first["id"]]
    assert [s["params"]["seed"] for s in sent] == [11, 12, 13]


def test_streamed_choices_are_tagged_by_index(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=CHAT,
        n=2,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = {0: "", 1: ""}
    finished = set()
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts[0] == texts[1] != ""
    assert usage is not None and usage.completion_tokens == 6


def test_best_of_keeps_n_and_counts_every_candidate(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="m", prompt="hello world", max_tokens=3, best_of=3)
    assert len(resp.choices) == 1 and resp.choices[0].index == 0
    assert resp.usage.completion_tokens == 3 * 3
    two = client.completions.create(model="m", prompt="hello world", max_tokens=2, n=2, best_of=4)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.usage.completion_tokens == 4 * 2


def test_echo_puts_the_prompt_and_its_logprobs_first(
    launch_chat: Callable[..., Gateway], tmp_path: Path, chat_snapshot: Path
) -> None:
    gateway, log = logged_gateway(launch_chat, tmp_path)
    client = client_for(gateway)
    plain = client.completions.create(model="m", prompt="hello world", max_tokens=2)
    echoed = client.completions.create(
        model="m", prompt="hello world", max_tokens=2, echo=True, logprobs=1
    )
    text = echoed.choices[0].text
    assert text == "hello world" + plain.choices[0].text
    prompt_ids = encode(chat_snapshot, "hello world")
    logprobs = echoed.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt_ids) + 2
    # The stub scores prompt token i with -i/8; nothing predicts the first.
    expected = [None] + [-i / 8 for i in range(1, len(prompt_ids))] + [-0.5, -0.5]
    assert logprobs.token_logprobs == expected
    assert logprobs.top_logprobs[0] is None and len(logprobs.top_logprobs[1]) == 1
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[len(prompt_ids)] == len("hello world")
    assert echoed.usage.completion_tokens == 2
    asked = [s["params"]["prompt_logprobs"] for s in submits(log)]
    assert asked == [None, 1], "prompt logprobs only when echo asks for logprobs"
    streamed = client.completions.create(
        model="m", prompt="hello world", max_tokens=2, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_bias_and_vllm_extras_reach_the_worker(
    launch_chat: Callable[..., Gateway], tmp_path: Path
) -> None:
    gateway, log = logged_gateway(launch_chat, tmp_path)
    client = client_for(gateway)
    client.chat.completions.create(
        model="m",
        messages=CHAT,
        max_tokens=4,
        logit_bias={"5": -100, "7": 2.5},
        extra_body={"min_tokens": 2, "stop_token_ids": [3], "ignore_eos": True},
    )
    params = submits(log)[0]["params"]
    assert sorted(map(tuple, params["logit_bias"])) == [(5, -100.0), (7, 2.5)]
    assert (params["min_tokens"], params["stop_token_ids"], params["ignore_eos"]) == (2, [3], True)
    assert params["constraint"] is None and params["prompt_logprobs"] is None
    too_many = {str(i): 1 for i in range(301)}
    response = gateway.post("/v1/chat/completions", json={"messages": CHAT, "logit_bias": too_many})
    assert response.status_code == 422 and "logit_bias" in response.json()["error"]
    assert gateway.get("/health").status_code == 200


def test_decoder_input_details_has_real_prefill_logprobs(
    launch: Callable[..., Gateway], tiny_snapshot: Path
) -> None:
    from huggingface_hub import InferenceClient

    gateway = launch()
    gateway.wait_ready()
    client = InferenceClient(base_url=gateway.url)
    answer = client.text_generation(
        "hello world", max_new_tokens=2, details=True, decoder_input_details=True
    )
    prefill = answer.details.prefill
    ids = encode(tiny_snapshot, "hello world")
    assert [t.id for t in prefill] == ids
    assert prefill[0].logprob is None
    assert [t.logprob for t in prefill[1:]] == [-i / 8 for i in range(1, len(ids))]
    without = gateway.post(
        "/generate", json={"inputs": "hello world", "parameters": {"details": True}}
    ).json()
    assert without["details"]["prefill"] == []


def test_jobs_take_the_same_fields(chat_gateway: Gateway) -> None:
    job = {
        "openai_route": "/v1/completions",
        "openai_input": {"prompt": "hello world", "max_tokens": 2, "n": 2, "echo": True},
    }
    done = chat_gateway.post("/runsync?wait=10000", json={"input": job}).json()
    assert done["status"] == "COMPLETED", done
    choices = done["output"]["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["text"].startswith("hello world") for c in choices)
    assert done["output"]["usage"]["completion_tokens"] == 4
    plain = {
        "prompt": "hello world",
        "sampling_params": {"max_tokens": 3, "min_tokens": 1, "logit_bias": {"4": 1.0}},
    }
    done = chat_gateway.post("/runsync?wait=10000", json={"input": plain}).json()
    assert done["status"] == "COMPLETED", done
    assert done["output"]["usage"]["completion_tokens"] == 3


def test_a_client_that_leaves_cancels_every_choice(
    launch_chat: Callable[..., Gateway], tmp_path: Path
) -> None:
    gateway = launch_chat(STUB_TOKENS="100000", STUB_TOKEN_DELAY_S="0.01")
    body = {"messages": CHAT, "n": 3, "max_tokens": 200, "stream": True}
    with requests.post(f"{gateway.url}/v1/chat/completions", json=body, stream=True) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())
    # Every fork is cancelled in the worker: the gateway's running count drains to zero.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        metrics = gateway.get("/metrics").text
        running = [
            line for line in metrics.splitlines() if line.startswith("thaw_running_requests ")
        ]
        if running and float(running[0].split()[1]) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"choices still running after the client left:\n{running}")


def test_tgi_best_of_lists_the_other_candidates(launch: Callable[..., Gateway]) -> None:
    from huggingface_hub import InferenceClient

    gateway = launch()
    gateway.wait_ready()
    client = InferenceClient(base_url=gateway.url)
    answer = client.text_generation(
        "hello world", max_new_tokens=3, details=True, best_of=3, do_sample=True, seed=4
    )
    others = answer.details.best_of_sequences
    assert len(others) == 2
    assert answer.details.generated_tokens == 3
    assert {answer.details.seed, *(o.seed for o in others)} == {4, 5, 6}
    greedy = gateway.post("/generate", json={"inputs": "x", "parameters": {"best_of": 2}})
    assert greedy.status_code == 422 and "sampling" in greedy.json()["error"]
    streamed = gateway.post(
        "/generate_stream",
        json={"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}},
    )
    assert streamed.status_code == 422 and "best_of" in streamed.json()["error"]
    assert gateway.get("/info").json()["max_best_of"] == 16

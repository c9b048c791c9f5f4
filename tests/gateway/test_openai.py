"""The OpenAI-compatible routes end to end, with the real `openai` client, against the gateway
and the stub worker (which echoes the prompt's token ids; see tests/support/stub_worker.py)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import requests
from tokenizers import Tokenizer

from tests.support.gateway_fixtures import Gateway, start_gateway

# A ChatML-like template; the tiny tokenizer has no special tokens for it, which does not matter.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello world"},
]
STUB_TOKENS = 8  # the stub's default: its 8th token is EOS


def render(messages: list[dict[str, str]]) -> str:
    turns = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
    return turns + "<|assistant|>"


def make_chat_snapshot(tiny_snapshot: Path, directory: Path) -> Path:
    """A copy of the tiny snapshot with a chat template."""
    shutil.copytree(tiny_snapshot, directory, dirs_exist_ok=True)
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def chat_snapshot(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chat_snapshot(tiny_snapshot, tmp_path_factory.mktemp("chat-snapshot"))


@pytest.fixture()
def launch_chat(
    gateway_binary: Path, chat_snapshot: Path, tmp_path: Path
) -> Callable[..., Gateway]:
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


def client_for(gateway: Gateway, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture()
def client(chat_gateway: Gateway) -> openai.OpenAI:
    return client_for(chat_gateway)


def echo(snapshot: Path, ids: list[int], n: int) -> str:
    """The text of the stub's first `n` tokens for a prompt of `ids`."""
    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    return tokenizer.decode([ids[i % len(ids)] for i in range(n)])


def ids_of(snapshot: Path, text: str) -> list[int]:
    tokenizer = Tokenizer.from_file(str(snapshot / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


def sse_data(response: requests.Response) -> list[str]:
    return [
        line[len(b"data: ") :].decode("utf-8")
        for line in response.iter_lines()
        if line.startswith(b"data: ")
    ]


def test_chat_completion_renders_the_template_and_counts_usage(
    client: openai.OpenAI, chat_snapshot: Path
) -> None:
    prompt_ids = ids_of(chat_snapshot, render(CHAT))
    resp = client.chat.completions.create(model="anything", messages=CHAT, max_tokens=5)
    assert resp.object == "chat.completion"
    assert resp.model == "tiny-stub"
    assert resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == echo(chat_snapshot, prompt_ids, 5)
    assert choice.finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(prompt_ids), 5)
    assert resp.usage.total_tokens == len(prompt_ids) + 5


def test_eos_finishes_with_stop_and_is_counted(client: openai.OpenAI, chat_snapshot: Path) -> None:
    prompt_ids = ids_of(chat_snapshot, render(CHAT))
    resp = client.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=50)
    assert resp.choices[0].finish_reason == "stop"
    # The EOS token adds no text but is a generated token, as transformers counts it.
    assert resp.choices[0].message.content == echo(chat_snapshot, prompt_ids, STUB_TOKENS - 1)
    assert resp.usage.completion_tokens == STUB_TOKENS


def test_chat_stream_matches_and_ends_with_usage_then_done(
    client: openai.OpenAI, chat_gateway: Gateway
) -> None:
    full = client.chat.completions.create(model="m", messages=CHAT, max_tokens=6)
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=CHAT,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    body = {"messages": CHAT, "max_tokens": 3, "stream": True}
    with chat_gateway.post("/v1/chat/completions", json=body, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = sse_data(response)
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])


def test_completions_take_text_ids_and_one_element_lists(
    client: openai.OpenAI, chat_snapshot: Path
) -> None:
    ids = ids_of(chat_snapshot, "hello world")
    expected = echo(chat_snapshot, ids, 4)
    for prompt in ("hello world", ["hello world"], ids, [ids]):
        resp = client.completions.create(model="m", prompt=prompt, max_tokens=4)
        assert resp.object == "text_completion"
        assert resp.choices[0].text == expected, prompt
        assert resp.usage.prompt_tokens == len(ids)
    streamed = list(
        client.completions.create(
            model="m",
            prompt="hello world",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].usage.completion_tokens == 4
    # OpenAI's default for the completions API is 16 tokens; the stub ends with EOS at 8.
    resp = client.completions.create(model="m", prompt="hello world")
    assert resp.usage.completion_tokens == STUB_TOKENS


def test_stop_strings_trim_and_finish_with_stop(launch_chat, chat_snapshot: Path) -> None:
    client = client_for(launch_chat(STUB_TOKENS="100"))
    prompt = "hello world, hello gateway"
    full = client.completions.create(model="m", prompt=prompt, max_tokens=30).choices[0].text
    # Four characters from the second echo of the prompt: the stop string spans tokens.
    stop = full[len(prompt) + 2 : len(prompt) + 6]
    for stream in (False, True):
        if stream:
            chunks = list(
                client.completions.create(
                    model="m", prompt=prompt, max_tokens=30, stop=[stop, "zzz"], stream=True
                )
            )
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            resp = client.completions.create(model="m", prompt=prompt, max_tokens=30, stop=stop)
            text, finish = resp.choices[0].text, resp.choices[0].finish_reason
        assert text == full[: full.index(stop)]
        assert finish == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="m", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == 3
    assert all(t.logprob == -0.5 and len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    text = client.completions.create(model="m", prompt="hello world", max_tokens=3, logprobs=1)
    logprobs = text.choices[0].logprobs
    assert logprobs.token_logprobs == [-0.5] * 3
    assert logprobs.text_offset[0] == 0 and len(logprobs.top_logprobs) == 3


@pytest.mark.parametrize(
    "route, extra, word",
    [
        ("/v1/chat/completions", {"n": 17}, "`n`"),
        (
            "/v1/chat/completions",
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "`tool_choice`",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "`response_format.json_schema.schema`",
        ),
        ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, "vocabulary"),
        ("/v1/chat/completions", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ("/v1/chat/completions", {"stop_token_ids": [-1]}, "stop_token_ids"),
        ("/v1/chat/completions", {"stream": True, "n": 0}, "`n`"),
        ("/v1/completions", {"suffix": "!"}, "suffix"),
        ("/v1/completions", {"best_of": 2, "n": 3}, "best_of"),
        ("/v1/completions", {"best_of": 3, "stream": True}, "best_of"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "exactly one"),
        ("/v1/completions", {"prompt": [999999]}, "vocabulary"),
        ("/v1/completions", {"temperature": -1, "stream": True}, "temperature"),
        ("/v1/completions", {"prompt": "zq9 " * 600, "stream": True}, "limit"),
    ],
)
def test_what_the_engine_cannot_honour_is_422(
    chat_gateway: Gateway, route: str, extra: dict, word: str
) -> None:
    base = {"messages": CHAT} if route.endswith("chat/completions") else {"prompt": "hi"}
    response = chat_gateway.post(route, json={**base, **extra})
    assert response.status_code == 422, response.text
    assert word in response.json()["error"]
    assert response.json()["error_type"] == "validation"


def test_openai_client_error_classes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=CHAT, n=17)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages="not a list")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="hi", max_tokens="ten")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [b'{"messages": ', b"", b'{"messages": 5}', b'{"max_tokens": 3}', b"[1, 2]"],
)
def test_malformed_bodies_are_400(chat_gateway: Gateway, body: bytes) -> None:
    for route in ("/v1/chat/completions", "/v1/completions"):
        response = chat_gateway.post(route, data=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (route, body, response.text)
        assert response.json()["error_type"] == "malformed_request"


def test_models_lists_the_snapshot(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-stub"]
    assert models.data[0].owned_by == "thaw"


def test_api_key(launch_chat) -> None:
    gateway = launch_chat(THAW_API_KEY="sesame")
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway, "wrong").chat.completions.create(model="m", messages=CHAT)
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway, "wrong").models.list()
    resp = client_for(gateway, "sesame").chat.completions.create(
        model="m", messages=CHAT, max_tokens=2
    )
    assert resp.usage.completion_tokens == 2


def test_client_disconnect_cancels_the_request(launch_chat) -> None:
    gateway = launch_chat(STUB_TOKENS="10000", STUB_TOKEN_DELAY_S="0.02")
    body = {"messages": CHAT, "max_tokens": 200, "stream": True}
    with gateway.post("/v1/chat/completions", json=body, stream=True) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
        assert "thaw_running_requests 1" in gateway.get("/metrics").text
    deadline = time.monotonic() + 5
    while "thaw_running_requests 0" not in gateway.get("/metrics").text:
        assert time.monotonic() < deadline, "the request kept running after the disconnect"
        time.sleep(0.05)


def wait_final(gateway: Gateway, job_id: str) -> dict:
    deadline = time.monotonic() + 20
    while (status := gateway.get(f"/status/{job_id}").json())["status"] in (
        "IN_QUEUE",
        "IN_PROGRESS",
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def test_runsync_with_openai_route_answers_the_openai_object(
    chat_gateway: Gateway, chat_snapshot: Path
) -> None:
    chat = {"messages": CHAT, "max_tokens": 4}
    job = {"input": {"openai_route": "/v1/chat/completions", "openai_input": chat}}
    status = chat_gateway.post("/runsync", json=job).json()
    assert status["status"] == "COMPLETED", status
    output = status["output"]
    assert output["object"] == "chat.completion"
    prompt_ids = ids_of(chat_snapshot, render(CHAT))
    assert output["choices"][0]["message"]["content"] == echo(chat_snapshot, prompt_ids, 4)
    assert output["usage"]["completion_tokens"] == 4
    models = chat_gateway.post("/runsync", json={"input": {"openai_route": "/v1/models"}})
    assert models.json()["output"]["data"][0]["id"] == "tiny-stub"


def test_run_and_stream_with_openai_route(chat_gateway: Gateway) -> None:
    body = {"prompt": "hello world", "max_tokens": 5, "stream": True}
    body["stream_options"] = {"include_usage": True}
    job = {"input": {"openai_route": "/v1/completions", "openai_input": body}}
    job_id = chat_gateway.post("/run", json=job).json()["id"]
    status = wait_final(chat_gateway, job_id)
    assert status["status"] == "COMPLETED", status
    streamed = chat_gateway.get(f"/stream/{job_id}").json()["stream"]
    chunks = [item["output"] for item in streamed]
    assert chunks == status["output"]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    expected = client_for(chat_gateway).completions.create(
        model="m", prompt="hello world", max_tokens=5
    )
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == (
        expected.choices[0].text
    )


@pytest.mark.parametrize(
    "job_input, status",
    [
        ({"openai_route": "/v1/chat/completions", "openai_input": {"messages": "x"}}, 400),
        (
            {"openai_route": "/v1/chat/completions", "openai_input": {"messages": CHAT, "n": 17}},
            422,
        ),
        ({"openai_route": "/v1/embeddings", "openai_input": {"input": "x"}}, 422),
        ({"openai_route": "/v1/completions"}, 422),
    ],
)
def test_bad_openai_jobs_are_refused(chat_gateway: Gateway, job_input: dict, status: int) -> None:
    for route in ("/run", "/runsync"):
        response = chat_gateway.post(route, json={"input": job_input})
        assert response.status_code == status, response.text

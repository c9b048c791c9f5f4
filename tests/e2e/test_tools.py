"""Tool calling end to end with the real `openai` client (issue 16).

Against the real gateway and worker on the default snapshot: `tool_choice` required and named are
enforced with a grammar, so even SmolLM2-135M must produce calls whose arguments validate against
the tool's parameter schema, streamed and not; the call's result goes back as a `role: tool`
message and a final answer comes out. `auto` returns content or valid calls. Bad tool input is
refused with 422 naming the field.

Against the gateway and the stub worker (which echoes its prompt): a chat template that renders
only the last message makes the stub "generate" exactly the text the test writes, so an auto-mode
Hermes tool call goes through the gateway's parser deterministically, streamed and not, and a
`role: tool` message is seen to reach the template.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.gateway_fixtures import Gateway, encode, start_gateway
from tests.support.serve_fixtures import Server

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 12}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": TIME_PARAMS,
        },
    },
]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


@dataclass
class Call:
    id: str
    name: str
    arguments: str


@dataclass
class Answer:
    content: str
    calls: list[Call] = field(default_factory=list)
    finish_reason: str | None = None


def answer_of(resp: Any) -> Answer:
    message = resp.choices[0].message
    calls = [Call(c.id, c.function.name, c.function.arguments) for c in (message.tool_calls or [])]
    assert all(c.type == "function" for c in message.tool_calls or [])
    return Answer(message.content or "", calls, resp.choices[0].finish_reason)


def answer_of_stream(chunks: list[Any]) -> Answer:
    """Content deltas, then tool-call deltas (id and name first, arguments in pieces)."""
    content, by_index, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = by_index.setdefault(delta.index, Call("", "", ""))
            call.id = delta.id or call.id
            if delta.function is not None:
                call.name += delta.function.name or ""
                call.arguments += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return Answer(content, [by_index[i] for i in sorted(by_index)], finish)


def assert_valid_calls(answer: Answer, names: set[str]) -> None:
    assert answer.finish_reason == "tool_calls", answer
    assert answer.calls, answer
    assert len({c.id for c in answer.calls}) == len(answer.calls), answer
    for call in answer.calls:
        assert call.id and call.name in names, answer
        jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


def tool_turn(answer: Answer) -> list[dict[str, Any]]:
    """The assistant's calls and one `role: tool` result per call, as a client sends them back."""
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in answer.calls
        ],
    }
    results = [
        {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": "sunny, 21 C"})}
        for c in answer.calls
    ]
    return [assistant, *results]


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(bf16_server: Server) -> Server:
    return bf16_server


@pytest.fixture(scope="module")
def client(bf16_client: openai.OpenAI) -> openai.OpenAI:
    return bf16_client


def ask(client: openai.OpenAI, stream: bool, **kw: Any) -> Answer:
    kw.setdefault("messages", ASK)
    kw.setdefault("max_tokens", 192)
    kw.setdefault("temperature", 0)
    if stream:
        chunks = list(client.chat.completions.create(model="default", stream=True, **kw))
        return answer_of_stream(chunks)
    return answer_of(client.chat.completions.create(model="default", **kw))


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_round_trip(client: openai.OpenAI, choice: str, stream: bool) -> None:
    tool_choice: Any = "required" if choice == "required" else NAMED
    names = set(PARAMS) if choice == "required" else {"get_time"}
    first = ask(client, stream, tools=TOOLS, tool_choice=tool_choice)
    assert_valid_calls(first, names)
    # The result goes back through the template; the final answer is text.
    final = ask(
        client,
        stream,
        messages=[*ASK, *tool_turn(first)],
        tools=TOOLS,
        tool_choice="none",
        max_tokens=32,
    )
    assert final.calls == [] and final.content, final
    assert final.finish_reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_auto_gives_content_or_valid_calls(client: openai.OpenAI, stream: bool) -> None:
    for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        answer = ask(client, stream, tools=TOOLS, temperature=temperature, seed=seed)
        if answer.calls:
            assert_valid_calls(answer, set(PARAMS))
        else:
            assert answer.finish_reason in ("stop", "length"), answer


def test_auto_after_a_tool_result(client: openai.OpenAI) -> None:
    first = ask(client, False, tools=TOOLS, tool_choice="required")
    final = ask(client, False, messages=[*ASK, *tool_turn(first)], tools=TOOLS, max_tokens=48)
    if final.calls:
        assert_valid_calls(final, set(PARAMS))
    else:
        assert final.content


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    for temperature, seed in ((0.0, 0), (1.0, 3)):
        answer = ask(
            client,
            False,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=temperature,
            seed=seed,
        )
        assert_valid_calls(answer, set(PARAMS))
        assert len(answer.calls) == 1, answer


def test_none_gives_no_calls(client: openai.OpenAI) -> None:
    answer = ask(client, False, tools=TOOLS, tool_choice="none", max_tokens=16)
    assert answer.calls == [] and answer.finish_reason in ("stop", "length")


def refused(client: openai.OpenAI, field_name: str, **kw: Any) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="default", messages=ASK, max_tokens=8, **kw)
    assert field_name in info.value.response.text, info.value.response.text


def test_bad_tool_input_is_refused_and_the_server_keeps_serving(client: openai.OpenAI) -> None:
    absent = {"type": "function", "function": {"name": "launch_rocket"}}
    refused(client, "tool_choice", tools=TOOLS, tool_choice=absent)
    bad_params = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    refused(client, "tools", tools=bad_params, tool_choice="required")
    refused(client, "tools", tools=bad_params)
    cyclic = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    refused(
        client,
        "tools",
        tools=[{"type": "function", "function": {"name": "g", "parameters": cyclic}}],
    )
    refused(client, "tool_choice", tool_choice="required")  # required without tools
    answer = ask(client, False, tools=TOOLS, tool_choice="required")
    assert_valid_calls(answer, set(PARAMS))


# --- the stub worker: a scripted auto-mode call through the parser ------------------------------

# Renders only the last message's content: the stub echoes the prompt, so it "generates" exactly
# that text. The template never mentions tools, so the gateway describes them in a system
# message, which this template drops.
ECHO_TEMPLATE = "{{ messages[-1]['content'] }}"
SCRIPTED = (
    "Let me check. <tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>"
)
TOOL_RESULT = '{"result": "sunny"}'
# The tiny snapshot's context is 256 tokens; the stub ends each request with EOS before this.
STUB_MAX_TOKENS = 128


@pytest.fixture(scope="module")
def echo_snapshot(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("echo-snapshot")
    shutil.copytree(tiny_snapshot, directory, dirs_exist_ok=True)
    config = {"chat_template": ECHO_TEMPLATE, "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def stub_gateway(
    gateway_binary: Path, echo_snapshot: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # One echo of the scripted text, then EOS: the stub's last token is its EOS.
    tokens = len(encode(echo_snapshot, SCRIPTED)) + 1
    gateway = start_gateway(
        gateway_binary,
        echo_snapshot,
        tmp_path_factory.mktemp("stub-logs"),
        STUB_TOKENS=str(tokens),
        THAW_TOOL_PARSER="hermes",
    )
    gateway.wait_ready()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def stub_client(stub_gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stub_gateway.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_auto_mode_call_is_parsed(stub_client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": SCRIPTED}]
    answer = ask(stub_client, stream, messages=messages, tools=TOOLS, max_tokens=STUB_MAX_TOKENS)
    assert answer.content.strip() == "Let me check.", answer
    assert_valid_calls(answer, {"get_weather"})
    assert [(c.name, json.loads(c.arguments)) for c in answer.calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]


def test_plain_text_in_auto_mode_stays_content(stub_client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "no tools needed"}]
    answer = ask(stub_client, False, messages=messages, tools=TOOLS, max_tokens=STUB_MAX_TOKENS)
    assert answer.calls == [] and answer.content.startswith("no tools needed"), answer
    assert answer.finish_reason in ("stop", "length")


def test_a_tool_message_reaches_the_template(stub_client: openai.OpenAI) -> None:
    call = Call("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}')
    turn = tool_turn(Answer("", [call]))
    turn[-1]["content"] = TOOL_RESULT
    answer = ask(
        stub_client, False, messages=[*ASK, *turn], tools=TOOLS, max_tokens=STUB_MAX_TOKENS
    )
    # The template may wrap the result (a Hermes <tool_response>); the result itself is there.
    assert answer.calls == [] and TOOL_RESULT in answer.content, answer

"""Tool calling and structured output through real HTTP with the real `openai` client: the
gateway parses a scripted model output (the stub worker's STUB_SCRIPT) into `tool_calls`,
whole and streamed, sends the grammar for `required` and named choices and for
`response_format`, and refuses bad tools and schemas with 422 while it keeps serving."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pydantic
import pytest
from tokenizers import Tokenizer

from tests.support.gateway_fixtures import Gateway, start_gateway

# A template that ignores tools: the gateway describes them in a Hermes-style system message.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL_TEXT = (
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tools_snapshot(tiny_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny snapshot with a chat template and room for the tools' description."""
    directory = tmp_path_factory.mktemp("tools-snapshot")
    shutil.copytree(tiny_snapshot, directory, dirs_exist_ok=True)
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    model = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**model, "max_position_embeddings": 4096}))
    return directory


def script_for(snapshot: Path, text: str) -> str:
    ids = Tokenizer.from_file(str(snapshot / "tokenizer.json")).encode(text).ids
    return ",".join(str(i) for i in ids)


@pytest.fixture()
def launch_tools(
    gateway_binary: Path, tools_snapshot: Path, tmp_path: Path
) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def _launch(output: str, **overrides: str) -> Gateway:
        env = {"STUB_SCRIPT": script_for(tools_snapshot, output), "STUB_MAX_CONTEXT": "4096"}
        gateway = start_gateway(gateway_binary, tools_snapshot, tmp_path, **env, **overrides)
        started.append(gateway)
        gateway.wait_ready()
        return gateway

    yield _launch
    for gateway in started:
        gateway.stop()


def client_for(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)


def submitted_params(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line)["params"] for line in log.read_text().splitlines()]


def test_a_tool_call_is_parsed_whole_and_streamed(launch_tools: Callable[..., Gateway]) -> None:
    client = client_for(launch_tools(CALL_TEXT))
    response = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    with client.chat.completions.stream(model="m", messages=ASK, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert streamed.message.content == "Checking."
    (call,) = streamed.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_tool_round_trip_renders_and_answers(launch_tools: Callable[..., Gateway]) -> None:
    client = client_for(launch_tools("It is 21 degrees."))
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]
    for tools in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "none"}, {}):
        response = client.chat.completions.create(model="m", messages=history, **tools)
        assert response.choices[0].message.content == "It is 21 degrees."
        assert response.choices[0].message.tool_calls is None
        assert response.choices[0].finish_reason == "stop"


def test_forcing_choices_and_response_formats_send_a_grammar(
    launch_tools: Callable[..., Gateway], tmp_path: Path
) -> None:
    log = tmp_path / "submits.jsonl"
    client = client_for(launch_tools(CALL_TEXT, STUB_SUBMIT_LOG=str(log)))
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        response = client.chat.completions.create(
            model="m", messages=ASK, tools=[WEATHER], tool_choice=choice
        )
        assert response.choices[0].message.tool_calls[0].function.name == "get_weather"
    client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none")
    client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER])
    grammars = [params.get("constraint") for params in submitted_params(log)]
    assert grammars[2:] == [None, None]
    for grammar in grammars[:2]:
        lark = json.loads(grammar)["grammars"][0]["lark_grammar"]
        assert "<tool_call>" in lark and "get_weather" in lark and "%json" in lark


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_parse_with_a_pydantic_model(launch_tools: Callable[..., Gateway], tmp_path: Path) -> None:
    log = tmp_path / "submits.jsonl"
    output = '{"city": "Paris", "celsius": 21}'
    client = client_for(launch_tools(output, STUB_SUBMIT_LOG=str(log)))
    parsed = client.chat.completions.parse(model="m", messages=ASK, response_format=Weather)
    assert parsed.choices[0].message.parsed == Weather(city="Paris", celsius=21)
    (params,) = submitted_params(log)
    schema = json.loads(params["constraint"])["grammars"][0]["json_schema"]
    assert schema["properties"]["celsius"]["type"] == "integer"


def test_bad_tools_and_schemas_get_422_and_the_gateway_keeps_serving(
    launch_tools: Callable[..., Gateway],
) -> None:
    gateway = launch_tools("fine")
    recursive = {"type": "object", "properties": {"next": {"$ref": "#"}}}
    huge_enum = {"enum": [f"v{i}" for i in range(5000)]}
    cases = [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
            "tools[0].function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "schema": recursive},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"guided_json": huge_enum}, "guided_json"),
        ({"guided_json": {"type": "objekt"}}, "guided_json"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ]
    for extra, field in cases:
        reply = gateway.post("/v1/chat/completions", json={"messages": ASK, **extra})
        assert reply.status_code == 422, (extra, reply.text)
        assert f"`{field}`" in reply.text, (extra, reply.text)
    reply = gateway.post("/v1/chat/completions", json={"messages": ASK})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "fine"


def test_tgi_grammar_from_the_inference_client(
    launch_tools: Callable[..., Gateway], tmp_path: Path
) -> None:
    from huggingface_hub import InferenceClient

    log = tmp_path / "submits.jsonl"
    output = '{"city": "Paris", "celsius": 21}'
    gateway = launch_tools(output, STUB_SUBMIT_LOG=str(log))
    client = InferenceClient(base_url=gateway.url)
    schema = Weather.model_json_schema()
    text = client.text_generation(
        "Weather?", max_new_tokens=64, grammar={"type": "json", "value": schema}
    )
    assert Weather.model_validate_json(text) == Weather(city="Paris", celsius=21)
    client.text_generation(
        "Digits?", max_new_tokens=64, grammar={"type": "regex", "value": "[0-9]+"}
    )
    first, second = submitted_params(log)
    sent = json.loads(first["constraint"])["grammars"][0]["json_schema"]
    # The schema as given, plus the JSON layout the gateway asks llguidance for.
    assert sent.pop("x-guidance")["whitespace_flexible"] is False
    assert sent == schema
    assert json.loads(second["constraint"])["grammars"][0]["lark_grammar"] == "start: /[0-9]+/"
    bad = gateway.post(
        "/generate",
        json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "("}}},
    )
    assert bad.status_code == 422 and "`grammar`" in bad.text


def test_the_gateway_accepts_every_schema_of_the_corpus(
    launch_tools: Callable[..., Gateway],
) -> None:
    """No false 422: each schema the constrained-decoding suite decodes compiles here."""
    from bench.schema_corpus import corpus

    gateway = launch_tools("{}")
    for entry in corpus():
        body = {
            "messages": ASK,
            "max_tokens": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": entry.schema, "strict": True},
            },
        }
        reply = gateway.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, (entry.schema, reply.text)

"""Constrained decoding through the real clients, gateway and worker (issue 16).

The real `openai` client (`chat.completions.parse` with a pydantic model, json_object mode, the
vLLM extras guided_regex / guided_choice / guided_grammar / guided_json, a streamed schema) and
the real `huggingface_hub.InferenceClient` (TGI `grammar`, json and regex). Bad constraints are
refused with 422 naming the field, and the server keeps serving.

The default snapshot is served in bfloat16: these tests check validity, not exact text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.support.serve_fixtures import Server

USER = [{"role": "user", "content": "Tell me about Paris."}]
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


class City(BaseModel):
    name: str = Field(max_length=16)
    country: str = Field(max_length=16)
    population: int = Field(ge=0, le=100_000_000)
    capital: bool


@pytest.fixture(scope="module")
def server(bf16_server: Server) -> Server:
    return bf16_server


@pytest.fixture(scope="module")
def client(bf16_client: openai.OpenAI) -> openai.OpenAI:
    return bf16_client


def schema_format(schema: dict[str, Any], name: str = "answer") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def chat_text(client: openai.OpenAI, **kw: Any) -> str:
    kw.setdefault("messages", USER)
    kw.setdefault("max_tokens", 128)
    kw.setdefault("temperature", 0)
    resp = client.chat.completions.create(model="default", **kw)
    assert resp.choices[0].finish_reason == "stop", resp
    return resp.choices[0].message.content or ""


def test_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        resp = client.chat.completions.parse(
            model="default",
            messages=USER,
            response_format=City,
            max_tokens=128,
            temperature=temperature,
            seed=7,
        )
        city = resp.choices[0].message.parsed
        assert isinstance(city, City), resp
        assert City.model_validate_json(resp.choices[0].message.content or "") == city


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    text = chat_text(client, response_format=schema_format(PERSON_SCHEMA))
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_json_object_mode_output_parses(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": 'Reply with a JSON object like {"city": "Paris"}. Lyon?'}
    ]
    text = chat_text(client, messages=messages, response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict), text


def test_vllm_guided_json(client: openai.OpenAI) -> None:
    text = chat_text(client, extra_body={"guided_json": PERSON_SCHEMA})
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_vllm_guided_regex_on_chat_and_completions(client: openai.OpenAI) -> None:
    regex = r"[0-9]{3}-[0-9]{4}"
    text = chat_text(client, extra_body={"guided_regex": regex})
    assert re.fullmatch(regex, text), text
    resp = client.completions.create(
        model="default",
        prompt="My phone number is",
        max_tokens=32,
        temperature=1.0,
        seed=3,
        extra_body={"guided_regex": regex},
    )
    assert re.fullmatch(regex, resp.choices[0].text), resp.choices[0].text


def test_vllm_guided_choice(client: openai.OpenAI) -> None:
    choices = ["yes", "no", "it depends"]
    for temperature in (0.0, 1.0):
        text = chat_text(
            client, temperature=temperature, seed=11, extra_body={"guided_choice": choices}
        )
        assert text in choices


def test_vllm_guided_grammar_lark(client: openai.OpenAI) -> None:
    grammar = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{2,8}/\n'
    for temperature in (0.0, 1.0):
        text = chat_text(
            client, temperature=temperature, seed=5, extra_body={"guided_grammar": grammar}
        )
        assert re.fullmatch(r"(hello|hi) [a-z]{2,8}", text), text


def test_streamed_schema_output_joins_into_valid_json(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=USER,
            max_tokens=128,
            temperature=1.0,
            seed=1,
            stream=True,
            response_format=schema_format(PERSON_SCHEMA),
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tgi_grammar_json_and_regex(server: Server) -> None:
    from huggingface_hub import InferenceClient, TextGenerationInputGrammarType

    hub = InferenceClient(base_url=server.base_url)
    out = hub.text_generation(
        "A person as JSON:",
        max_new_tokens=128,
        details=True,
        grammar=TextGenerationInputGrammarType(type="json", value=PERSON_SCHEMA),
    )
    jsonschema.validate(json.loads(out.generated_text), PERSON_SCHEMA)
    assert out.details.finish_reason == "eos_token"
    regex = r"(19|20)[0-9]{2}"
    out = hub.text_generation(
        "The year the war ended:",
        max_new_tokens=16,
        grammar=TextGenerationInputGrammarType(type="regex", value=regex),
    )
    assert re.fullmatch(regex, out), out
    streamed = list(
        hub.text_generation(
            "A person as JSON:",
            max_new_tokens=128,
            stream=True,
            details=True,
            grammar={"type": "json", "value": PERSON_SCHEMA},
        )
    )
    jsonschema.validate(json.loads(streamed[-1].generated_text), PERSON_SCHEMA)


def refused(call: Callable[[], object], *fields: str) -> str:
    """Asserts `call` raises a 422 whose message names one of `fields`; returns the message."""
    with pytest.raises(openai.UnprocessableEntityError) as info:
        call()
    text = info.value.response.text
    assert any(field in text for field in fields), text
    return text


def test_bad_constraints_are_refused_naming_the_field(client: openai.OpenAI) -> None:
    def chat(**kw: Any) -> Callable[[], object]:
        return lambda: client.chat.completions.create(
            model="default", messages=USER, max_tokens=8, **kw
        )

    cycle = {
        "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
        "$ref": "#/$defs/a",
    }
    endless = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"next": {"$ref": "#/$defs/node"}},
                "required": ["next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    }
    huge_enum = {
        "type": "object",
        "properties": {"v": {"enum": [f"value-{i}" for i in range(20_000)]}},
        "required": ["v"],
    }
    refused(chat(response_format=schema_format({"type": "objekt"})), "response_format")
    refused(chat(response_format=schema_format({"$ref": "#/$defs/missing"})), "response_format")
    refused(chat(response_format=schema_format(cycle)), "response_format")
    refused(chat(response_format=schema_format(endless)), "response_format")
    refused(chat(response_format=schema_format(huge_enum)), "response_format")
    refused(chat(response_format={"type": "xml"}), "response_format")
    refused(
        chat(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
        "response_format",
        "guided_regex",
    )
    refused(
        chat(extra_body={"guided_regex": "a+", "guided_choice": ["a", "b"]}),
        "guided_regex",
        "guided_choice",
    )
    refused(chat(extra_body={"guided_regex": "(?=look)ahead"}), "guided_regex")
    refused(chat(extra_body={"guided_grammar": "start: undefined_rule"}), "guided_grammar")
    refused(chat(extra_body={"guided_choice": []}), "guided_choice")
    refused(chat(extra_body={"guided_json": {"type": 5}}), "guided_json")


def test_bad_tgi_grammar_is_refused_naming_the_field(server: Server) -> None:
    for grammar in (
        {"type": "json", "value": {"type": "objekt"}},
        {"type": "regex", "value": "(?<=x)y"},
    ):
        resp = requests.post(
            f"{server.base_url}/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 4, "grammar": grammar}},
            timeout=60,
        )
        assert resp.status_code == 422, resp.text
        assert "grammar" in resp.text, resp.text


def test_the_server_keeps_serving_after_bad_constraints(client: openai.OpenAI) -> None:
    # Runs after the refusals above (file order): a plain and a constrained request still work.
    plain = client.chat.completions.create(model="default", messages=USER, max_tokens=4)
    assert plain.usage is not None and plain.usage.completion_tokens > 0
    text = chat_text(client, extra_body={"guided_choice": ["red", "blue"]})
    assert text in ("red", "blue")

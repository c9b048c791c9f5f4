"""Chat templates: the gateway's Rust rendering equals transformers' `apply_chat_template`.

tests/fixtures/chat_templates/ holds each model's template (`<name>.jinja`, the text its
tokenizer_config.json or GGUF ships) and special tokens (`<name>.json`). `expected.json` holds
conversations and what transformers renders for them; the unit test in
rust_gateway/src/chat_template.rs renders the same conversations and must produce the same strings
(or fail where transformers fails). The tests here keep expected.json true to transformers and run
that Rust test. After adding a template or a conversation, regenerate the file with
`THAW_UPDATE_FIXTURES=1 pytest tests/gateway/test_chat_template.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
EXPECTED = FIXTURES / "expected.json"
TEMPLATES = ("llama3", "mistral", "qwen2", "smollm2")

Message = dict[str, Any]

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
ASK = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
FOLLOW_UP = {"role": "user", "content": "And of Italy?"}


@dataclass(frozen=True)
class Conversation:
    name: str
    messages: list[Message]
    add_generation_prompt: bool = True
    # OpenAI tool objects, passed as `tools=` (templates without tool support ignore them).
    tools: list[dict[str, Any]] | None = None


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
WEATHER_ASK = {"role": "user", "content": "Weather in Paris?"}
# Mistral's template wants 9-character call ids; arguments as a dict, as transformers takes them.
# Content is "" (not None) so that the templates without tool support render the turn too.
WEATHER_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "abcdefghi",
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ],
}
WEATHER_RESULT = {
    "role": "tool",
    "tool_call_id": "abcdefghi",
    "name": "get_weather",
    "content": '{"celsius": 21}',
}


CONVERSATIONS = (
    Conversation("system_multi_turn", [SYSTEM, ASK, ANSWER, FOLLOW_UP]),
    Conversation("system_multi_turn_no_prompt", [SYSTEM, ASK, ANSWER, FOLLOW_UP], False),
    Conversation("system_ending_with_assistant", [SYSTEM, ASK, ANSWER], False),
    Conversation("no_system", [ASK, ANSWER, FOLLOW_UP]),
    Conversation("no_system_no_prompt", [ASK, ANSWER, FOLLOW_UP], False),
    Conversation("single_user", [ASK]),
    Conversation(
        "text_that_looks_like_markup",
        [
            {"role": "system", "content": '  Reply in JSON: {"a": 1}  \n'},
            {"role": "user", "content": "Tabs\tand\nnewlines, é 漢字 🙂, {{ x }} {% if %} </s>"},
            {"role": "assistant", "content": "  padded reply\n\n"},
            {"role": "user", "content": " last "},
        ],
    ),
    # Templates that refuse a conversation (Mistral here) must fail in Rust as in transformers.
    Conversation("roles_do_not_alternate", [SYSTEM, ASK, FOLLOW_UP]),
    Conversation(
        "tool_result",
        [ASK, {"role": "tool", "content": '{"temperature": 21}'}, FOLLOW_UP],
    ),
    Conversation("tools_offered", [SYSTEM, WEATHER_ASK], tools=[WEATHER_TOOL]),
    Conversation(
        "tool_round_trip", [WEATHER_ASK, WEATHER_CALL, WEATHER_RESULT], tools=[WEATHER_TOOL]
    ),
)


@dataclass(frozen=True)
class TemplateFixture:
    name: str
    source: str
    bos_token: str | None
    eos_token: str | None


def load_fixture(name: str) -> TemplateFixture:
    tokens = json.loads((FIXTURES / f"{name}.json").read_text())
    return TemplateFixture(
        name=name,
        source=(FIXTURES / f"{name}.jinja").read_text(),
        bos_token=tokens["bos_token"],
        eos_token=tokens["eos_token"],
    )


def transformers_tokenizer(fixture: TemplateFixture) -> Any:
    """A real fast tokenizer carrying the model's template and special tokens.

    The vocabulary does not matter for rendering with tokenize=False, so a one-word vocabulary
    stands in for the model's tokenizer.json (no model hub is needed).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokens = {"bos_token": fixture.bos_token, "eos_token": fixture.eos_token}
    special = {name: token for name, token in tokens.items() if token is not None}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")), **special
    )
    tokenizer.chat_template = fixture.source
    return tokenizer


def render_case(tokenizer: Any, conversation: Conversation) -> dict[str, Any]:
    from jinja2.exceptions import TemplateError

    case: dict[str, Any] = {
        "name": conversation.name,
        "messages": conversation.messages,
        "add_generation_prompt": conversation.add_generation_prompt,
    }
    if conversation.tools is not None:
        case["tools"] = conversation.tools
    try:
        case["expected"] = tokenizer.apply_chat_template(
            conversation.messages,
            tools=conversation.tools,
            tokenize=False,
            add_generation_prompt=conversation.add_generation_prompt,
        )
        case["error"] = None
    except TemplateError as err:
        case["expected"] = None
        case["error"] = str(err)
    return case


def build_expected() -> dict[str, Any]:
    cases = []
    for name in TEMPLATES:
        tokenizer = transformers_tokenizer(load_fixture(name))
        for conversation in CONVERSATIONS:
            cases.append({"template": name, **render_case(tokenizer, conversation)})
    return {"generated_by": "tests/gateway/test_chat_template.py", "cases": cases}


def fixture_drift(committed: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Names of the cases whose committed rendering differs from transformers' current one."""
    by_key = {(c["template"], c["name"]): c for c in committed.get("cases", [])}
    drift = []
    for case in current["cases"]:
        key = (case["template"], case["name"])
        if by_key.pop(key, None) != case:
            drift.append("/".join(key))
    drift.extend("/".join(key) + " (no longer generated)" for key in by_key)
    return drift


@pytest.fixture(scope="module")
def current() -> dict[str, Any]:
    return build_expected()


def test_expected_json_matches_what_transformers_renders(current: dict[str, Any]) -> None:
    if os.environ.get("THAW_UPDATE_FIXTURES") == "1":
        EXPECTED.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n")
    committed = json.loads(EXPECTED.read_text())
    drift = fixture_drift(committed, current)
    assert not drift, f"expected.json is stale for {drift}; regenerate with THAW_UPDATE_FIXTURES=1"


def test_fixture_drift_is_detected(current: dict[str, Any]) -> None:
    changed = json.loads(json.dumps(current))
    changed["cases"][0]["expected"] += " "
    del changed["cases"][-1]
    assert fixture_drift(changed, current) == [
        f"{current['cases'][0]['template']}/{current['cases'][0]['name']}",
        f"{current['cases'][-1]['template']}/{current['cases'][-1]['name']}",
    ]


def test_every_template_renders_system_prompts_and_rejects_some_conversations(
    current: dict[str, Any],
) -> None:
    # Guards the fixture itself: the comparisons must cover real renderings, not only errors.
    rendered = {(c["template"], c["name"]): c for c in current["cases"]}
    for name in TEMPLATES:
        case = rendered[(name, "system_multi_turn")]
        assert case["error"] is None and "You are a terse assistant." in case["expected"]
        assert "And of Italy?" in case["expected"]
    assert rendered[("mistral", "roles_do_not_alternate")]["error"]


def test_rust_renders_every_fixture_like_transformers() -> None:
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    manifest = ROOT / "rust_gateway" / "Cargo.toml"
    if not manifest.exists() or not Path(cargo).exists():
        pytest.skip("the Rust gateway crate or cargo is not available")
    # --release shares the build that scripts/test.sh makes, so this is usually incremental.
    result = subprocess.run(
        [cargo, "test", "--release", "chat_template::"],
        cwd=manifest.parent,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "fixtures_render_like_transformers ... ok" in result.stdout

"""Every schema of the corpus (bench/schema_corpus.py), through the real gateway and
worker: OpenAI `response_format` json_schema (strict), at temperature 0 and 1, all requests in
flight together so the engine batches constrained rows. Every output must parse and validate
with `jsonschema`: 100%.

One exception, stated: the "free_string" schemas hold a string with no length bound, whose valid
outputs are unbounded; SmolLM2-135M may never close it (greedy, it repeats a phrase). An output
of those may stop at max_tokens (finish_reason "length", as OpenAI reports a cut-off); every
other output must end because its grammar completed, and every output that ended so must
validate. A cut-off in any bounded schema (a runaway in whitespace, say) fails the test.

The server runs the default snapshot in bfloat16: validity does not depend on the dtype, and the
whole corpus has to fit a small CPU's time budget.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import jsonschema
import openai
import pytest

from bench.schema_corpus import KINDS, CorpusSchema, corpus, example
from tests.support.serve_fixtures import Server, ensure_default_snapshot

CONCURRENCY = 32
# Far above what any bounded corpus schema's valid outputs need.
MAX_TOKENS = 384
# The unbounded free strings: enough to see the model close one, not to wait on a loop.
FREE_STRING_MAX_TOKENS = 128
UNBOUNDED_KINDS = {"free_string"}


@dataclass
class Outcome:
    schema: CorpusSchema
    temperature: float
    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None


def test_corpus_is_deterministic_and_covers_every_kind() -> None:
    first, second = corpus(), corpus()
    assert len(first) >= 200
    assert [s.schema for s in first] == [s.schema for s in second]
    assert {s.kind for s in first} == set(KINDS)
    assert len({s.name for s in first}) == len(first)
    # Growing the corpus keeps the schemas it had.
    assert [s.schema for s in corpus(count=50)] == [s.schema for s in first[:50]]


def test_every_schema_is_valid_and_compiles() -> None:
    import llguidance

    tokenizer = llguidance.LLTokenizer(str(ensure_default_snapshot() / "tokenizer.json"))
    for item in corpus():
        jsonschema.Draft202012Validator.check_schema(item.schema)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(item.schema)
        assert llguidance.LLMatcher.validate_grammar(grammar, tokenizer) == "", item.name


def test_every_schema_has_a_valid_example() -> None:
    for item in corpus():
        jsonschema.validate(example(item.schema), item.schema)


@pytest.fixture(scope="module")
def server(bf16_server: Server) -> Server:
    return bf16_server


def request_one(
    client: openai.OpenAI, item: CorpusSchema, temperature: float, seed: int
) -> Outcome:
    outcome = Outcome(item, temperature)
    try:
        resp = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": item.prompt}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": item.name, "schema": item.schema, "strict": True},
            },
            temperature=temperature,
            seed=seed,
            max_tokens=FREE_STRING_MAX_TOKENS if item.kind in UNBOUNDED_KINDS else MAX_TOKENS,
        )
    except openai.APIError as err:
        outcome.error = f"{type(err).__name__}: {err}"
        return outcome
    outcome.text = resp.choices[0].message.content
    outcome.finish_reason = resp.choices[0].finish_reason
    return outcome


def problem(outcome: Outcome) -> str | None:
    """Why the outcome is not a valid instance of its schema; None when it is (or when an
    unbounded schema's output was cut off at max_tokens)."""
    if outcome.error is not None:
        return outcome.error
    if outcome.finish_reason == "length" and outcome.schema.kind in UNBOUNDED_KINDS:
        return None
    if outcome.finish_reason != "stop":
        return f"finish {outcome.finish_reason}, not stop: {outcome.text!r}"
    try:
        doc = json.loads(outcome.text or "")
    except json.JSONDecodeError as err:
        return f"not JSON ({err}, finish {outcome.finish_reason}): {outcome.text!r}"
    try:
        jsonschema.validate(doc, outcome.schema.schema, cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as err:
        return f"invalid ({err.message}): {outcome.text!r}"
    return None


def test_every_output_validates_at_temperature_0_and_1(
    server: Server, record_property: pytest.RecordProperty
) -> None:
    client = openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=600
    )
    jobs = [
        (item, temperature, seed)
        for temperature in (0.0, 1.0)
        for seed, item in enumerate(corpus())
    ]
    start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        outcomes = list(pool.map(lambda job: request_one(client, *job), jobs))
    elapsed = time.monotonic() - start
    record_property("corpus_requests", len(jobs))
    record_property("corpus_seconds", round(elapsed, 1))
    failures = [
        f"{o.schema.name} T={o.temperature}: {why[:300]}"
        for o in outcomes
        if (why := problem(o)) is not None
    ]
    cut = sum(o.finish_reason == "length" for o in outcomes)
    record_property("cut_off_unbounded", cut)
    print(f"{len(jobs)} requests in {elapsed:.1f}s; {cut} unbounded outputs cut at max_tokens")
    assert not failures, f"{len(failures)}/{len(jobs)} invalid:\n" + "\n".join(failures[:40])


def test_schemas_left_the_server_healthy(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    resp = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert resp.choices[0].message.content is not None

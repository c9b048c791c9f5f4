"""Constrained decoding: every token a grammar allows, EOS when it is complete, free rows
untouched, a bad grammar or a refused token failing its request alone, preemption kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import llguidance
import pytest

from handler.engine.constraint import ConstraintMasker, GrammarMatcher
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from tests.handler.engine.grammar_fixtures import decode, write_byte_tokenizer
from tests.support.engine_fixtures import EOS_ID, TinyModel, build_tiny, random_prompts

REGEX = "(true|false|[a-d]{2,5})"
SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "kind": {"enum": ["ab", "cd", "true"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "kind", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=11)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_byte_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def engine(tiny: TinyModel, tokenizer: Path, **overrides: object) -> LLMEngine:
    config = {"max_num_seqs": 16, "max_num_batched_tokens": 256, **overrides}
    from handler.engine.config import EngineConfig

    return LLMEngine(
        tiny.model_config, tiny.weights, [EOS_ID], EngineConfig(**config), None, tokenizer
    )


def run(eng: LLMEngine, requests: dict[int, tuple[list[int], SamplingParams]]) -> dict:
    """Submit all, step to the end; per id: tokens, finish reason, error."""
    for i, (prompt, params) in requests.items():
        eng.add_request(i, prompt, params)
    return drain(eng, set(requests))


def drain(eng: LLMEngine, ids: set[int]) -> dict:
    results = {i: {"tokens": [], "finish": None, "error": None} for i in ids}
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            entry = results[out.request_id]
            if out.token_id is not None:
                entry["tokens"].append(out.token_id)
            entry["finish"] = out.finish_reason
            entry["error"] = out.error
        steps += 1
        assert steps < 2000
    return results


def regex_grammar() -> str:
    return llguidance.LLMatcher.grammar_from_regex(REGEX)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_output_matches_the_grammar_and_ends_with_eos(
    tiny: TinyModel, tokenizer: Path, temperature: float
) -> None:
    eng = engine(tiny, tokenizer)
    prompts = random_prompts(6, 3, 20, seed=3)
    requests = {
        i: (
            p,
            SamplingParams(
                max_new_tokens=20, temperature=temperature, seed=i, constraint=regex_grammar()
            ),
        )
        for i, p in enumerate(prompts)
    }
    for i, r in run(eng, requests).items():
        assert r["error"] is None and r["finish"] == "eos_token", r
        assert r["tokens"][-1] == EOS_ID
        assert max(r["tokens"]) < 265, "ids past the tokenizer's vocabulary are never allowed"
        assert re.fullmatch(REGEX, decode(tokenizer, r["tokens"])), (
            i,
            decode(tokenizer, r["tokens"]),
        )
    stats = eng.stats()
    assert stats.constrained_tokens > 0 and stats.mask_seconds > 0
    timings = eng.mask_timings
    assert timings and all(t.rows >= 1 and t.compute_s >= 0 and t.wait_s >= 0 for t in timings)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(
    tiny: TinyModel, tokenizer: Path, temperature: float
) -> None:
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False}
    )
    eng = engine(tiny, tokenizer)
    prompts = random_prompts(4, 3, 12, seed=4)
    requests = {
        i: (
            p,
            SamplingParams(max_new_tokens=80, temperature=temperature, seed=i, constraint=grammar),
        )
        for i, p in enumerate(prompts)
    }
    for r in run(eng, requests).values():
        assert r["finish"] == "eos_token", r
        value = json.loads(decode(tokenizer, r["tokens"]))
        assert set(value) == {"ok", "kind", "n"}
        assert (
            isinstance(value["ok"], bool) and value["kind"] in SCHEMA["properties"]["kind"]["enum"]
        )
        assert isinstance(value["n"], int) and 0 <= value["n"] <= 9


def test_free_rows_beside_constrained_ones_are_unchanged(tiny: TinyModel, tokenizer: Path) -> None:
    prompts = random_prompts(4, 5, 30, seed=8)
    free = SamplingParams(max_new_tokens=10, temperature=0.0)
    alone = tiny.engine().generate(prompts, free)
    eng = engine(tiny, tokenizer)
    requests: dict[int, tuple[list[int], SamplingParams]] = {
        i: (p, free) for i, p in enumerate(prompts)
    }
    for i, p in enumerate(prompts):
        requests[10 + i] = (
            p,
            SamplingParams(max_new_tokens=10, temperature=0.0, constraint=regex_grammar()),
        )
    results = run(eng, requests)
    for i in range(len(prompts)):
        assert results[i]["tokens"] == alone[i]
        assert re.fullmatch(REGEX, decode(tokenizer, results[10 + i]["tokens"]))


def test_ignore_eos_still_ends_when_the_grammar_is_complete(
    tiny: TinyModel, tokenizer: Path
) -> None:
    grammar = llguidance.LLMatcher.grammar_from_regex("ab(cd)?")
    params = SamplingParams(
        max_new_tokens=30, temperature=1.0, seed=5, ignore_eos=True, constraint=grammar
    )
    results = run(engine(tiny, tokenizer), {0: ([5, 6, 7], params)})
    assert results[0]["finish"] == "eos_token"
    # EOS is held back while the grammar could go on, so the full "abcd" is produced.
    assert decode(tokenizer, results[0]["tokens"]) == "abcd"


def test_a_bad_grammar_is_refused_and_the_engine_goes_on(tiny: TinyModel, tokenizer: Path) -> None:
    eng = engine(tiny, tokenizer)
    for bad in ("{not json", '{"grammars": [{"lark_grammar": "start: <<"}]}'):
        with pytest.raises(ValueError, match="constraint"):
            eng.add_request(1, [5, 6], SamplingParams(constraint=bad))
    assert not eng.has_unfinished()
    results = run(eng, {2: ([5, 6], SamplingParams(max_new_tokens=3, constraint=regex_grammar()))})
    assert results[2]["error"] is None


def test_no_tokenizer_refuses_constraints(tiny: TinyModel) -> None:
    with pytest.raises(ValueError, match="constraint"):
        tiny.engine().add_request(1, [5, 6], SamplingParams(constraint=regex_grammar()))


def test_a_refused_token_fails_its_request_alone(
    tiny: TinyModel, tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = engine(tiny, tokenizer)
    original = ConstraintMasker.consume

    def refuse_when_marked(
        self: ConstraintMasker, pairs: list[tuple[GrammarMatcher, int]]
    ) -> list[str | None]:
        errors = original(self, pairs)
        return [
            "constraint: token refused (test)" if getattr(m, "refuse", False) else e
            for (m, _), e in zip(pairs, errors, strict=True)
        ]

    monkeypatch.setattr(ConstraintMasker, "consume", refuse_when_marked)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, constraint=regex_grammar())
    free = SamplingParams(max_new_tokens=8, temperature=0.0)
    eng.add_request(0, [5, 6, 7], params)
    eng.add_request(1, [8, 9], params)
    eng.add_request(2, [10, 11], free)
    eng._live[1].matcher.refuse = True  # type: ignore[union-attr]
    results = drain(eng, {0, 1, 2})
    assert results[1]["error"] == "constraint: token refused (test)" and results[1]["tokens"] == []
    assert results[0]["finish"] == "eos_token" and results[2]["finish"] == "length"
    assert eng.stats().kv_used_blocks == 0


def test_preemption_keeps_the_grammar_state(tiny: TinyModel, tokenizer: Path) -> None:
    grammar = llguidance.LLMatcher.grammar_from_regex("[a-d]{30,40}")
    params = SamplingParams(max_new_tokens=45, temperature=0.0, constraint=grammar)
    prompts = random_prompts(4, 14, 16, seed=9)
    requests = {i: (p, params) for i, p in enumerate(prompts)}
    roomy = run(engine(tiny, tokenizer), requests)
    tight = engine(tiny, tokenizer, num_kv_blocks=12, block_size=8)
    squeezed = run(tight, requests)
    assert tight.stats().preemptions > 0
    for i in requests:
        assert squeezed[i]["tokens"] == roomy[i]["tokens"]
        assert re.fullmatch("[a-d]{30,40}", decode(tokenizer, squeezed[i]["tokens"]))


def test_masks_unpack_to_the_models_vocabulary(tokenizer: Path) -> None:
    import torch

    from handler.engine.constraint import GrammarTokenizer, TokenMasks

    # A model vocabulary smaller than the tokenizer's: the tokenizer keeps its own size and
    # masks are cut to the model's.
    small = GrammarTokenizer(tokenizer, 200, [EOS_ID])
    assert small.get().vocab_size >= 265 and small.load_seconds is not None
    bits = torch.tensor(
        [[0b101, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32
    )
    masks = TokenMasks([1, 3], bits)
    allowed = masks.allowed(200, torch.device("cpu"))
    assert allowed.shape == (2, 200) and allowed[0].nonzero().flatten().tolist() == [0, 2]
    assert masks.allowed(400, torch.device("cpu")).shape == (2, 400)  # padded, not allowed
    assert masks.empty_rows() == [3]
    assert masks.select(3).rows == [0] and masks.select(2) is None
    # A bit in the sign position of an int32 word unpacks too.
    top = TokenMasks([0], torch.tensor([[-(2**31)]], dtype=torch.int32))
    assert top.allowed(32, torch.device("cpu"))[0].nonzero().flatten().tolist() == [31]


def test_a_broken_tokenizer_fails_constraints_but_not_the_engine(
    tiny: TinyModel, tmp_path: Path
) -> None:
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    eng = engine(tiny, broken)
    for i in range(2):
        with pytest.raises(ValueError, match="constraint"):
            eng.add_request(i, [5, 6], SamplingParams(constraint=regex_grammar()))
    assert run(eng, {3: ([5, 6], SamplingParams(max_new_tokens=2))})[3]["finish"] == "length"


def test_forks_have_their_own_grammar_state(tiny: TinyModel, tokenizer: Path) -> None:
    eng = engine(tiny, tokenizer)
    prompt = random_prompts(1, 20, 20, seed=13)[0]
    grammar = regex_grammar()
    for i in range(3):
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=20 + i, constraint=grammar)
        eng.add_request(i, prompt, params, fork_of=None if i == 0 else 0)
    for r in drain(eng, {0, 1, 2}).values():
        assert r["finish"] == "eos_token" and re.fullmatch(REGEX, decode(tokenizer, r["tokens"]))

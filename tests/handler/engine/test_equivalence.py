"""Greedy output of the engine equals transformers' generate, token for token (float32, CPU)."""

from __future__ import annotations

import pytest

from handler.engine.params import SamplingParams
from tests.support.engine_fixtures import TinyModel, build_tiny, random_prompts, run_staggered

MAX_NEW = 10
ARRIVALS = [0, 0, 1, 2, 3, 5, 8, 9]  # eight prompts joining a running batch at different steps
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
MODELS = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("MistralForCausalLM", {}),
    "qwen2": ("Qwen2ForCausalLM", {}),
}
SCENARIOS = {
    "plain": {},
    "chunked-prefill": {"max_num_batched_tokens": 7},
    "preemption": {"block_size": 4, "num_kv_blocks": 24},
}


@pytest.fixture(scope="module", params=list(MODELS))
def tiny(request: pytest.FixtureRequest) -> TinyModel:
    architecture, overrides = MODELS[request.param]
    return build_tiny(architecture, seed=len(request.param), **overrides)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(len(ARRIVALS), 2, 50, seed=1)


@pytest.fixture(scope="module")
def references(tiny: TinyModel, prompts: list[list[int]]) -> list[list[int]]:
    return [tiny.hf_greedy(p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_transformers(
    tiny: TinyModel, prompts: list[list[int]], references: list[list[int]], scenario: str
) -> None:
    engine = tiny.engine(**SCENARIOS[scenario])
    outputs = run_staggered(engine, prompts, GREEDY, ARRIVALS)
    for i, expected in enumerate(references):
        assert outputs[i] == expected, f"prompt {i} (length {len(prompts[i])})"
    stats = engine.stats()
    if scenario == "preemption":
        assert stats.preemptions > 0
    if scenario == "chunked-prefill":
        assert stats.steps > len(ARRIVALS) + MAX_NEW
    assert stats.kv_used_blocks == 0


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_prefix_cache_hits_keep_output_exact(name: str) -> None:
    architecture, overrides = MODELS[name]
    tiny = build_tiny(architecture, seed=7, **overrides)
    system = random_prompts(1, 24, 24, seed=2)[0]  # three full blocks of 8
    prompts = [system + tail for tail in random_prompts(8, 1, 12, seed=3)]
    engine = tiny.engine(block_size=8)
    outputs = run_staggered(engine, prompts, GREEDY, ARRIVALS)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == tiny.hf_greedy(prompt, MAX_NEW), f"prompt {i}"
    stats = engine.stats()
    assert stats.prefix_hit_tokens >= 16 * 6  # every late arrival reuses at least two blocks
    assert stats.kv_used_blocks == 0


def test_repeated_prompt_is_served_from_cache_and_stays_exact() -> None:
    tiny = build_tiny("LlamaForCausalLM", seed=11)
    prompt = random_prompts(1, 32, 32, seed=4)[0]  # exactly four blocks of 8
    engine = tiny.engine(block_size=8)
    first = engine.generate([prompt], GREEDY)
    computed_before = engine.stats().prompt_tokens_computed
    second = engine.generate([prompt], GREEDY)
    stats = engine.stats()
    assert first == second == [tiny.hf_greedy(prompt, MAX_NEW)]
    # A fully cached prompt still recomputes its last block to get logits for the next token.
    assert stats.prefix_hit_tokens == 24
    assert stats.prompt_tokens_computed - computed_before == 8

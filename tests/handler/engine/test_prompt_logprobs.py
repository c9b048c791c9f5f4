"""prompt_logprobs: every prompt token's logprob after the first (and its top-k), equal to a
full forward pass of transformers, chunked prefill and prefix-cached prompts included."""

from __future__ import annotations

import pytest
import torch

from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams, TokenOutput
from tests.support.engine_fixtures import TinyModel, build_tiny, random_prompts


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=51)


def reference(tiny: TinyModel, prompt: list[int]) -> torch.Tensor:
    """transformers' logprobs for positions 0..n-2 (each predicting the next prompt token)."""
    with torch.no_grad():
        logits = tiny.hf_model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(-1)[:-1]


def first_outputs(engine: LLMEngine, requests: dict[int, tuple[list[int], SamplingParams]]):
    for i, (prompt, params) in requests.items():
        engine.add_request(i, prompt, params)
    firsts: dict[int, TokenOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            firsts.setdefault(out.request_id, out)
            if out.request_id in firsts and firsts[out.request_id] is not out:
                assert out.prompt_logprobs is None, "sent once, with the first output"
    return firsts


@pytest.mark.parametrize("chunk", [256, 16])
def test_values_match_a_full_forward(tiny: TinyModel, chunk: int) -> None:
    prompts = random_prompts(3, 2, 45, seed=6)
    engine = tiny.engine(max_num_batched_tokens=chunk)
    requests = {
        0: (prompts[0], SamplingParams(max_new_tokens=3, prompt_logprobs=0)),
        1: (prompts[1], SamplingParams(max_new_tokens=3, prompt_logprobs=5)),
        2: (prompts[2], SamplingParams(max_new_tokens=3)),
    }
    firsts = first_outputs(engine, requests)
    assert firsts[2].prompt_logprobs is None
    for i in (0, 1):
        prompt, params = requests[i]
        entries = firsts[i].prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) - 1
        ref = reference(tiny, prompt)
        targets = torch.tensor(prompt[1:])
        expected = ref.gather(1, targets.unsqueeze(1)).squeeze(1)
        got = torch.tensor([lp for lp, _ in entries])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        k = params.prompt_logprobs
        if k == 0:
            assert all(top is None for _, top in entries)
            continue
        ref_values, ref_ids = ref.topk(k, dim=-1)
        for row, (_, top) in enumerate(entries):
            assert [t for t, _ in top] == ref_ids[row].tolist()
            torch.testing.assert_close(
                torch.tensor([v for _, v in top]), ref_values[row], atol=1e-4, rtol=1e-4
            )


def test_a_cached_prompt_is_computed_again(tiny: TinyModel) -> None:
    prompt = random_prompts(1, 50, 50, seed=7)[0]
    engine = tiny.engine()
    engine.generate([prompt], SamplingParams(max_new_tokens=2))
    hits = engine.stats().prefix_hit_tokens
    firsts = first_outputs(
        engine, {5: (prompt, SamplingParams(max_new_tokens=2, prompt_logprobs=1))}
    )
    assert engine.stats().prefix_hit_tokens == hits, "the prefix cache was bypassed"
    entries = firsts[5].prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) - 1
    expected = reference(tiny, prompt).gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(
        torch.tensor([lp for lp, _ in entries]), expected, atol=1e-4, rtol=1e-4
    )


def test_a_one_token_prompt_has_no_entries(tiny: TinyModel) -> None:
    firsts = first_outputs(
        tiny.engine(), {0: ([7], SamplingParams(max_new_tokens=1, prompt_logprobs=2))}
    )
    assert firsts[0].prompt_logprobs == []


def test_preemption_keeps_the_values_right(tiny: TinyModel) -> None:
    prompts = random_prompts(4, 38, 42, seed=8)
    engine = tiny.engine(num_kv_blocks=14, block_size=8, max_num_batched_tokens=16)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True, temperature=0.0, prompt_logprobs=1)
    firsts = first_outputs(engine, {i: (p, params) for i, p in enumerate(prompts)})
    assert engine.stats().preemptions > 0
    for i, prompt in enumerate(prompts):
        entries = firsts[i].prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) - 1
        expected = reference(tiny, prompt).gather(1, torch.tensor(prompt[1:]).unsqueeze(1))
        got = torch.tensor([lp for lp, _ in entries])
        torch.testing.assert_close(got, expected.squeeze(1), atol=1e-4, rtol=1e-4)

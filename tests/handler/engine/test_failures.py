"""A request that fails inside a step fails alone: its companions finish as if it never came."""

from __future__ import annotations

import math

import pytest
import torch

from handler.engine.faults import FaultInjection
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams, TokenOutput
from handler.engine.sampler import NON_FINITE_LOGITS, Sampler
from handler.engine.sequence import Sequence
from tests.support.engine_fixtures import TinyModel, build_tiny, random_prompts

POISON = 77
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=11)


def clean_prompts(count: int, seed: int) -> list[list[int]]:
    return [[t for t in p if t != POISON] for p in random_prompts(count, 3, 30, seed=seed)]


def run(
    engine: LLMEngine, requests: dict[int, list[int]], arrivals: dict[int, int] | None = None
) -> tuple[dict[int, list[int]], dict[int, TokenOutput]]:
    """Tokens per request and each request's last output, submitting at the given steps."""
    arrivals = arrivals or dict.fromkeys(requests, 0)
    tokens: dict[int, list[int]] = {i: [] for i in requests}
    last: dict[int, TokenOutput] = {}
    step = 0
    while step <= max(arrivals.values()) or engine.has_unfinished():
        for i, at in arrivals.items():
            if at == step:
                engine.add_request(i, requests[i], GREEDY)
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
            if out.finish_reason is not None:
                last[out.request_id] = out
        step += 1
        assert step < 1000
    return tokens, last


@pytest.mark.parametrize("arrive_late", [False, True], ids=["same step", "mid-decode"])
def test_a_nan_row_fails_only_its_request(tiny: TinyModel, arrive_late: bool) -> None:
    companions = dict(enumerate(clean_prompts(4, seed=3)))
    clean_tokens, _ = run(tiny.engine(block_size=4), companions)

    poisoned = tiny.engine(block_size=4, fault_injection=FaultInjection(nan_logits_token=POISON))
    requests = {**companions, 9: [5, 6, POISON, 8, 9]}
    arrivals = {**dict.fromkeys(companions, 0), 9: 4 if arrive_late else 0}
    tokens, last = run(poisoned, requests, arrivals)

    failure = last[9]
    assert failure.finish_reason == "error" and failure.error == NON_FINITE_LOGITS
    assert failure.token_id is None and tokens[9] == []
    for i in companions:
        assert last[i].finish_reason == "length" and last[i].error is None
        assert tokens[i] == clean_tokens[i], f"companion {i} changed"
    stats = poisoned.stats()
    assert stats.kv_used_blocks == 0 and stats.running == stats.waiting == 0


def test_a_row_whose_sampling_raises_fails_alone(tiny: TinyModel) -> None:
    companions = dict(enumerate(clean_prompts(3, seed=5)))
    clean_tokens, _ = run(tiny.engine(), companions)

    engine = tiny.engine()
    for i, prompt in companions.items():
        engine.add_request(i, prompt, GREEDY)
    engine.add_request(7, [4, 5, 6], SamplingParams(max_new_tokens=5, temperature=0.7, seed=1))
    engine._live[7].generator = "not a generator"  # type: ignore[assignment]
    tokens: dict[int, list[int]] = {i: [] for i in (*companions, 7)}
    last: dict[int, TokenOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_id is not None:
                tokens[out.request_id].append(out.token_id)
            if out.finish_reason is not None:
                last[out.request_id] = out
    assert last[7].finish_reason == "error" and last[7].error.startswith("sampling failed: ")
    assert tokens[7] == []
    for i in companions:
        assert tokens[i] == clean_tokens[i]
    assert engine.stats().kv_used_blocks == 0


def test_an_error_no_row_can_be_blamed_for_propagates(tiny: TinyModel) -> None:
    engine = tiny.engine()
    engine.add_request(1, [4, 5, 6], SamplingParams(max_new_tokens=5, temperature=0.7, seed=1))
    engine._live[1].generator = "not a generator"  # type: ignore[assignment]
    with pytest.raises(TypeError):
        engine.step()


def seq(params: SamplingParams) -> Sequence:
    return Sequence(0, [1, 2, 3], params, None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sampler_names_each_non_finite_row(bad: float, dtype: torch.dtype) -> None:
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[1, 10] = bad
    logits[3] = bad
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.8, seed=3),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
    ]
    sampler = Sampler()
    result = sampler(logits, [seq(p) for p in params])
    assert result.failed == {1: NON_FINITE_LOGITS, 3: NON_FINITE_LOGITS}
    assert result.token_ids[0] == logits[0].float().argmax().item()
    assert all(math.isfinite(result.logprobs[row]) for row in (0, 2))


def test_the_cpu_kernels_path_finds_non_finite_rows_too() -> None:
    from handler.kernels.cpu import load_cpu_kernels

    kernels = load_cpu_kernels()
    if kernels is None:
        pytest.skip("the CPU kernels do not build here")
    logits = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)).bfloat16()
    logits[0, 100] = math.nan
    logits[2, 7] = math.inf
    result = Sampler(kernels)(logits, [seq(SamplingParams(temperature=0.0))] * 3)
    assert result.failed == {0: NON_FINITE_LOGITS, 2: NON_FINITE_LOGITS}
    assert result.token_ids[1] == logits[1].float().argmax().item()

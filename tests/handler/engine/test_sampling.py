"""The batched sampler: seeds, filters, penalties and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from handler.engine.params import SamplingParams
from handler.engine.sampler import Sampler
from handler.engine.sequence import Sequence
from tests.support.engine_fixtures import TinyModel, build_tiny, random_prompts, run_staggered


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=21)


def test_seeded_sampling_is_reproducible_whatever_the_companions(tiny: TinyModel) -> None:
    prompt = random_prompts(1, 20, 20, seed=5)[0]
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    alone = tiny.engine().generate([prompt], seeded)[0]

    companions = random_prompts(5, 3, 40, seed=6)
    unseeded = SamplingParams(max_new_tokens=8, temperature=1.3)
    other_seed = SamplingParams(max_new_tokens=15, temperature=0.7, seed=99)
    engine = tiny.engine(max_num_batched_tokens=16)
    outputs = run_staggered(
        engine,
        [*companions[:2], prompt, *companions[2:]],
        [unseeded, other_seed, seeded, unseeded, unseeded, other_seed],
        [0, 0, 1, 1, 2, 4],
    )
    assert outputs[2] == alone
    different_seed = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=4321)
    assert tiny.engine().generate([prompt], different_seed)[0] != alone


def test_top_k_one_is_greedy(tiny: TinyModel) -> None:
    prompts = random_prompts(4, 5, 30, seed=7)
    greedy = tiny.engine().generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    top1 = tiny.engine().generate(prompts, SamplingParams(max_new_tokens=8, top_k=1, seed=3))
    assert top1 == greedy


def _seq(params: SamplingParams, prompt: list[int], outputs: tuple[int, ...] = ()) -> Sequence:
    generator = None
    if params.seed is not None:
        generator = torch.Generator().manual_seed(params.seed)
    seq = Sequence(0, prompt, params, generator)
    seq.token_ids.extend(outputs)
    return seq


def test_filters_keep_only_allowed_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(200, 1)
    sampler = Sampler()
    picks = {
        "top_k": SamplingParams(top_k=2),
        "top_p": SamplingParams(top_p=0.5),  # p(0) = 0.64 already covers 0.5
        "min_p": SamplingParams(min_p=0.3),  # p(1)/p(0) = 0.37, p(2)/p(0) = 0.14
    }
    allowed = {"top_k": {0, 1}, "top_p": {0}, "min_p": {0, 1}}
    for name, params in picks.items():
        seqs = [_seq(params, [9]) for _ in range(200)]
        tokens = set(sampler(logits, seqs).token_ids)
        assert tokens == allowed[name], name


def test_penalties_move_repeated_tokens_down() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    sampler = Sampler()
    greedy = dict(temperature=0.0)
    assert sampler(logits, [_seq(SamplingParams(**greedy), [0])]).token_ids == [0]
    rep = SamplingParams(repetition_penalty=1.5, **greedy)
    assert sampler(logits, [_seq(rep, [0])]).token_ids == [1]  # prompt tokens count
    freq = SamplingParams(frequency_penalty=0.06, **greedy)
    assert sampler(logits, [_seq(freq, [3], (0,))]).token_ids == [0]  # 1.94 > 1.9
    assert sampler(logits, [_seq(freq, [3], (0, 0))]).token_ids == [1]  # 1.88 < 1.9
    presence = SamplingParams(presence_penalty=0.5, **greedy)
    assert sampler(logits, [_seq(presence, [0])]).token_ids == [0]  # prompt tokens do not count
    assert sampler(logits, [_seq(presence, [3], (0, 0))]).token_ids == [1]


def test_logprobs_are_the_models_and_top_n_is_sorted() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=0.0, logprobs=1, repetition_penalty=2.0),
    ]
    result = Sampler()(logits, [_seq(p, [1, 2]) for p in params])
    expected = torch.log_softmax(logits, dim=-1)
    for row, token in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[row], expected[row, token].item(), abs_tol=1e-5)
    top = result.top_logprobs[0]
    assert [t for t, _ in top] == expected[0].topk(3).indices.tolist()
    assert top[0][0] == result.token_ids[0]
    assert result.top_logprobs[1] is None
    assert len(result.top_logprobs[2]) == 1


def test_engine_reports_logprobs(tiny: TinyModel) -> None:
    engine = tiny.engine()
    engine.add_request(0, [5, 6, 7], SamplingParams(max_new_tokens=3, temperature=0.0, logprobs=2))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert len(outputs) == 3
    for out in outputs:
        assert out.logprob is not None and out.logprob <= 0.0
        assert out.top_logprobs[0] == (out.token_id, pytest.approx(out.logprob))
    assert outputs[-1].finish_reason == "length"

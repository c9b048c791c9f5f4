"""logit_bias and min_tokens: applied before sampling, the model's logprobs reported, bad
values refused with the field named."""

from __future__ import annotations

import pytest
import torch

from handler.engine.params import SamplingParams
from handler.engine.sampler import Sampler
from handler.engine.sequence import Sequence
from tests.support.engine_fixtures import EOS_ID, VOCAB, TinyModel, build_tiny, random_prompts


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=31)


def _seq(params: SamplingParams, end_ids: list[int] = ()) -> Sequence:
    seq = Sequence(0, [9, 10], params, None)
    seq.eos_ids = [EOS_ID]
    seq.end_ids = sorted({EOS_ID, *end_ids})
    return seq


def test_bias_moves_the_pick_but_not_the_logprobs() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 0.5]])
    model_logprobs = logits.log_softmax(-1)[0]
    params = SamplingParams(temperature=0.0, logit_bias=[(3, 10.0)], logprobs=2)
    result = Sampler()(logits, [_seq(params)])
    assert result.token_ids == [3]
    assert result.logprobs[0] == pytest.approx(float(model_logprobs[3]))
    assert [t for t, _ in result.top_logprobs[0]] == [0, 1]  # the model's top two
    # A large negative bias removes the favourite.
    result = Sampler()(logits, [_seq(SamplingParams(temperature=0.0, logit_bias=[(0, -100.0)]))])
    assert result.token_ids == [1]


def test_bias_rows_leave_their_companions_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    plain = [_seq(SamplingParams(temperature=0.0)) for _ in range(6)]
    alone = Sampler()(logits, plain).token_ids
    mixed = list(plain)
    mixed[2] = _seq(SamplingParams(temperature=0.0, logit_bias=[(7, 100.0)]))
    picks = Sampler()(logits, mixed).token_ids
    assert picks[2] == 7
    assert [p for i, p in enumerate(picks) if i != 2] == [p for i, p in enumerate(alone) if i != 2]


def test_min_tokens_holds_back_eos_and_stop_ids(tiny: TinyModel) -> None:
    # EOS pushed to the top: without min_tokens the request ends at once.
    prompt = random_prompts(1, 5, 5, seed=2)[0]
    eager = SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=[(EOS_ID, 100.0)])
    assert tiny.engine().generate([prompt], eager)[0] == [EOS_ID]
    held = SamplingParams(
        max_new_tokens=10, temperature=0.0, logit_bias=[(EOS_ID, 100.0), (50, 90.0)], min_tokens=4
    )
    out = tiny.engine().generate([prompt], held)[0]
    assert out == [50, 50, 50, 50, EOS_ID]
    # A stop id is held back too.
    stop = SamplingParams(
        max_new_tokens=10,
        temperature=1.0,
        seed=1,
        stop_token_ids=[50],
        logit_bias=[(50, 100.0)],
        min_tokens=3,
    )
    out = tiny.engine().generate([prompt], stop)[0]
    assert len(out) == 4 and out[-1] == 50 and 50 not in out[:3]


@pytest.mark.parametrize(
    "params, field",
    [
        (SamplingParams(logit_bias=[(VOCAB, 1.0)]), "logit_bias"),
        (SamplingParams(logit_bias=[(-1, 1.0)]), "logit_bias"),
        (SamplingParams(logit_bias=[(5, 100.5)]), "logit_bias"),
        (SamplingParams(logit_bias=[(5, float("nan"))]), "logit_bias"),
        (SamplingParams(logit_bias=[(5, 1.0), (5, 2.0)]), "logit_bias"),
        (SamplingParams(logit_bias=[(5,)]), "logit_bias"),  # type: ignore[list-item]
        (SamplingParams(logit_bias=[(i, 1.0) for i in range(301)]), "logit_bias"),
        (SamplingParams(max_new_tokens=4, min_tokens=5), "min_tokens"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
        (SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
        (SamplingParams(constraint=""), "constraint"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    tiny: TinyModel, params: SamplingParams, field: str
) -> None:
    engine = tiny.engine()
    with pytest.raises(ValueError, match=field):
        engine.add_request(1, [5, 6], params)
    assert not engine.has_unfinished()

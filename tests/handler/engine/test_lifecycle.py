"""Engine lifecycle: stopping, aborting, freeing blocks, refusing bad input and bad models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from handler.engine.config import EngineConfig
from handler.engine.llm_engine import LLMEngine
from handler.engine.params import SamplingParams
from handler.model import UnsupportedModelError
from handler.model.config import ModelConfig
from tests.support.engine_fixtures import EOS_ID, VOCAB, TinyModel, build_tiny, random_prompts


@pytest.fixture(scope="module")
def tiny() -> TinyModel:
    return build_tiny("LlamaForCausalLM", seed=31)


def _drain(engine: LLMEngine) -> list:
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    return outputs


def test_abort_frees_blocks_and_reports_cancelled(tiny: TinyModel) -> None:
    engine = tiny.engine(block_size=4)
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    engine.add_request(1, list(range(10, 40)), params)
    engine.add_request(2, list(range(50, 60)), params)
    engine.step()
    engine.step()
    used = engine.stats().kv_used_blocks
    cancelled = engine.abort(1)
    assert cancelled is not None and cancelled.finish_reason == "cancelled"
    assert cancelled.token_id is None
    assert engine.stats().kv_used_blocks == used - 8  # 30 prompt + 2 new tokens = 8 blocks
    assert engine.abort(1) is None  # already gone
    outputs = _drain(engine)
    assert {o.request_id for o in outputs} == {2}
    assert engine.stats().kv_used_blocks == 0


def test_abort_of_a_waiting_request(tiny: TinyModel) -> None:
    engine = tiny.engine()
    engine.add_request(7, [5, 6, 7], SamplingParams(max_new_tokens=4))
    assert engine.abort(7).finish_reason == "cancelled"
    assert not engine.has_unfinished()
    assert engine.step() == []


def test_every_block_is_free_after_a_busy_run(tiny: TinyModel) -> None:
    engine = tiny.engine(block_size=4, num_kv_blocks=30, max_num_batched_tokens=24)
    prompts = random_prompts(12, 1, 40, seed=8)
    for i, prompt in enumerate(prompts):
        engine.add_request(i, prompt, SamplingParams(max_new_tokens=6 + i, temperature=0.9))
    outputs = _drain(engine)
    finished = [o for o in outputs if o.finish_reason is not None]
    assert sorted(o.request_id for o in finished) == list(range(12))
    stats = engine.stats()
    assert stats.kv_used_blocks == 0 and stats.running == 0 and stats.waiting == 0
    assert stats.preemptions > 0


def test_stops_on_eos_stop_tokens_and_context_limit(tiny: TinyModel) -> None:
    prompt = [11, 12, 13]
    free_run = tiny.engine().generate([prompt], SamplingParams(max_new_tokens=6, temperature=0))
    free_run = free_run[0]
    stop_at = free_run[2]
    engine = tiny.engine()
    engine.add_request(0, prompt, SamplingParams(temperature=0, stop_token_ids=[stop_at]))
    outputs = _drain(engine)
    assert [o.token_id for o in outputs] == free_run[: free_run.index(stop_at) + 1]
    assert outputs[-1].finish_reason == "eos_token"

    limited = tiny.engine(max_model_len=8)
    limited.add_request(0, prompt, SamplingParams(max_new_tokens=100, temperature=0))
    outputs = _drain(limited)
    assert len(outputs) == 5 and outputs[-1].finish_reason == "length"

    # Any id of the generation config's EOS list stops a request...
    eos = free_run[1]
    engine = LLMEngine(tiny.model_config, tiny.weights, [EOS_ID, eos], EngineConfig())
    engine.add_request(0, prompt, SamplingParams(max_new_tokens=5, temperature=0))
    outputs = _drain(engine)
    assert [o.token_id for o in outputs] == free_run[: free_run.index(eos) + 1]
    assert outputs[-1].finish_reason == "eos_token"
    # ...unless ignore_eos is set.
    engine.add_request(1, prompt, SamplingParams(max_new_tokens=5, temperature=0, ignore_eos=True))
    outputs = _drain(engine)
    assert [o.token_id for o in outputs] == free_run[:5]
    assert outputs[-1].finish_reason == "length"


BAD_PARAMS = [
    {"max_new_tokens": 0},
    {"temperature": -1.0},
    {"temperature": float("nan")},
    {"top_k": -2},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"min_p": 2.0},
    {"repetition_penalty": 0.0},
    {"presence_penalty": 3.0},
    {"seed": -1},
    {"seed": "7"},
    {"stop_token_ids": [VOCAB]},
    {"logprobs": 100},
    {"ignore_eos": "yes"},
]


@pytest.mark.parametrize("bad", BAD_PARAMS, ids=lambda d: next(iter(d)))
def test_bad_params_are_refused_and_the_engine_keeps_working(tiny: TinyModel, bad: dict) -> None:
    engine = tiny.engine()
    with pytest.raises(ValueError, match=next(iter(bad))):
        engine.add_request(0, [5, 6], SamplingParams(**bad))
    ok = SamplingParams(max_new_tokens=2, ignore_eos=True)
    assert [len(tokens) for tokens in engine.generate([[5, 6]], ok)] == [2]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "non-empty"),
        ("hello", "non-empty list"),
        ([1, 2.5], "integers"),
        ([1, VOCAB], "must be in"),
        ([-1], "must be in"),
        (list(range(4, 4 + 256)), "context limit"),
    ],
)
def test_bad_prompts_are_refused(tiny: TinyModel, prompt: object, message: str) -> None:
    engine = tiny.engine()
    engine.add_request(99, [5, 6, 7], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match=message):
        engine.add_request(0, prompt, SamplingParams())
    with pytest.raises(ValueError, match="already running"):
        engine.add_request(99, [1], SamplingParams())
    assert len(_drain(engine)) == 3


def test_prompt_longer_than_a_tiny_cache_is_refused(tiny: TinyModel) -> None:
    engine = tiny.engine(block_size=4, num_kv_blocks=4)
    assert engine.max_model_len == 16
    with pytest.raises(ValueError, match="context limit is 16"):
        engine.add_request(0, list(range(5, 21)), SamplingParams())
    engine.add_request(0, list(range(5, 20)), SamplingParams(max_new_tokens=10))
    outputs = _drain(engine)
    assert len(outputs) == 1 and outputs[0].finish_reason == "length"


def test_unsupported_models_are_refused_by_name(tiny: TinyModel) -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf_config({**tiny.hf_config, "architectures": ["GPT2LMHeadModel"]})
    gemma3 = {**tiny.hf_config, "architectures": ["Gemma3ForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        ModelConfig.from_hf_config({**gemma3, "use_bidirectional_attention": True})
    yarn = {**tiny.hf_config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_config(yarn)
    weights = dict(tiny.weights)
    del weights["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        LLMEngine(tiny.model_config, weights, [EOS_ID], EngineConfig())


def test_hub_style_rope_config_is_read() -> None:
    hub = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    rope = ModelConfig.from_hf_config(hub).rope
    assert (rope.rope_type, rope.theta, rope.factor) == ("llama3", 500000.0, 32.0)


def test_rope_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from handler.model.rope import inverse_frequencies

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf = LlamaConfig(
        hidden_size=256, num_attention_heads=4, max_position_embeddings=512, rope_parameters=params
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(
        ModelConfig.from_hf_config(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]}).rope, 64
    )
    torch.testing.assert_close(ours, expected)


def test_serving_path_never_imports_transformers() -> None:
    code = (
        "import sys\n"
        "sys.modules['transformers'] = None  # any import of it now raises\n"
        "import torch\n"
        "from handler.engine.config import EngineConfig\n"
        "from handler.engine.llm_engine import LLMEngine\n"
        "from handler.engine.params import SamplingParams\n"
        "from handler.model.config import ModelConfig\n"
        "cfg = {'architectures': ['LlamaForCausalLM'], 'vocab_size': 32, 'hidden_size': 8,\n"
        "       'intermediate_size': 16, 'num_hidden_layers': 1, 'num_attention_heads': 2,\n"
        "       'max_position_embeddings': 64, 'tie_word_embeddings': True}\n"
        "w = {'model.embed_tokens.weight': torch.randn(32, 8),\n"
        "     'model.norm.weight': torch.ones(8),\n"
        "     'model.layers.0.input_layernorm.weight': torch.ones(8),\n"
        "     'model.layers.0.post_attention_layernorm.weight': torch.ones(8)}\n"
        "for n, s in [('self_attn.q_proj', (8, 8)), ('self_attn.k_proj', (8, 8)),\n"
        "             ('self_attn.v_proj', (8, 8)), ('self_attn.o_proj', (8, 8)),\n"
        "             ('mlp.gate_proj', (16, 8)), ('mlp.up_proj', (16, 8)),\n"
        "             ('mlp.down_proj', (8, 16))]:\n"
        "    w[f'model.layers.0.{n}.weight'] = torch.randn(*s)\n"
        "e = LLMEngine(ModelConfig.from_hf_config(cfg), w, [0], EngineConfig())\n"
        "p = SamplingParams(max_new_tokens=3, ignore_eos=True)\n"
        "print(len(e.generate([[1, 2, 3]], p)[0]))\n"
        "assert 'transformers' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"

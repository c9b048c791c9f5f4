"""Every supported family against transformers, on tiny random-weight models with the family's
features switched on (tests/support/families.py): windows shorter than the prompts, soft-caps,
experts with top-k routing, LongRoPE past the original context, Gemma 3's local rope base.

float32: thaw's greedy ids equal transformers' for MAX_NEW new tokens, with prompts arriving at
different steps, prefix-cache hits, chunked prefill under a small token budget and preemption
forced by a small cache; the chosen tokens' logprobs agree within LOGPROB_TOLERANCE.
bfloat16: teacher-forced logits, against transformers' float32, are as close as transformers'
own bfloat16 (the error measure of tests/handler/kernels/test_engine_cpu_kernels.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from handler.engine.params import SamplingParams
from handler.model.config import ModelConfig
from handler.model.kv_layout import KVLayout
from snapshot.architectures import required_tensors
from tests.support.engine_fixtures import (
    EOS_ID,
    TinyModel,
    build_tiny,
    kl_divergence,
    random_prompts,
    run_staggered,
    teacher_forced_logits,
)
from tests.support.families import FAMILIES

MAX_NEW = 48
ARRIVALS = [0, 0, 1, 3, 4, 7]
# Mean-free float32 differences (SDPA against eager attention, summation orders) move
# log-probabilities by far less than this.
LOGPROB_TOLERANCE = 2e-4
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0)
# The families whose bfloat16 CPU path is torch ops rather than the fused kernels.
NOT_FUSED = {"qwen3-moe", "qwen2-moe", "mixtral", "phi3-longrope", "phi4-mini"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, TinyModel]:
    architecture, overrides = FAMILIES[request.param]
    return request.param, build_tiny(architecture, seed=3, **overrides)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # A shared first block of 8 (prefix-cache hits for later arrivals), then 1 to 32 tokens:
    # lengths 9 to 40 cross the windows and, some of them, LongRoPE's original context.
    system = random_prompts(1, 8, 8, seed=5)[0]
    tails = random_prompts(len(ARRIVALS), 1, 32, seed=6)
    tails[-1] = random_prompts(1, 32, 32, seed=7)[0]
    return [system + tail for tail in tails]


def hf_greedy_with_logprobs(tiny: TinyModel, prompt: list[int]) -> tuple[list[int], list[float]]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = tiny.hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    if EOS_ID in tokens:
        tokens = tokens[: tokens.index(EOS_ID) + 1]
    logprobs = [
        float(step[0].float().log_softmax(-1)[token])
        for step, token in zip(out.logits, tokens, strict=False)
    ]
    return tokens, logprobs


@pytest.fixture(scope="module")
def references(
    family: tuple[str, TinyModel], prompts: list[list[int]]
) -> list[tuple[list[int], list[float]]]:
    return [hf_greedy_with_logprobs(family[1], p) for p in prompts]


def test_staggered_arrivals_and_prefix_hits_match_transformers(
    family: tuple[str, TinyModel],
    prompts: list[list[int]],
    references: list[tuple[list[int], list[float]]],
) -> None:
    name, tiny = family
    engine = tiny.engine(block_size=8)
    per_request: dict[int, list[float]] = {i: [] for i in range(len(prompts))}
    outputs: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = 0
    while step <= max(ARRIVALS) or engine.has_unfinished():
        for i, arrival in enumerate(ARRIVALS):
            if arrival == step:
                engine.add_request(i, prompts[i], GREEDY)
        for out in engine.step():
            outputs[out.request_id].append(out.token_id)
            per_request[out.request_id].append(out.logprob)
        step += 1
    for i, (tokens, logprobs) in enumerate(references):
        assert outputs[i] == tokens, f"{name}: prompt {i} (length {len(prompts[i])})"
        assert per_request[i] == pytest.approx(logprobs, abs=LOGPROB_TOLERANCE), f"prompt {i}"
    stats = engine.stats()
    if tiny.model_config.exact_prefix_caching:
        assert stats.prefix_hit_tokens >= 8 * (len(ARRIVALS) - 2)
    else:
        # LongRoPE: a token's KV depends on its sequence's length, so no prefix is shared.
        assert stats.prefix_hit_tokens == 0
    assert stats.kv_used_blocks == 0


def test_chunked_prefill_and_preemption_match_transformers(
    family: tuple[str, TinyModel],
    prompts: list[list[int]],
    references: list[tuple[list[int], list[float]]],
) -> None:
    name, tiny = family
    # Room for the longest sequence and little more: sliding-window layers hold only their
    # window's blocks, so a windowed model needs fewer for the same squeeze.
    longest = max(len(p) for p in prompts) + MAX_NEW
    layout = KVLayout.of(tiny.model_config, longest)
    blocks = layout.blocks_for(longest, 4, 7) + 2
    engine = tiny.engine(max_num_batched_tokens=7, block_size=4, num_kv_blocks=blocks)
    assert engine.max_model_len >= longest
    outputs = run_staggered(engine, prompts, GREEDY, ARRIVALS)
    for i, (tokens, _) in enumerate(references):
        assert outputs[i] == tokens, f"{name}: prompt {i} (length {len(prompts[i])})"
    stats = engine.stats()
    assert stats.preemptions > 0
    assert stats.steps > len(ARRIVALS) + MAX_NEW
    assert stats.kv_used_blocks == 0


@pytest.mark.parametrize("name", ["mistral-window", "gemma3", "qwen2-window"])
def test_sliding_window_layers_hold_only_their_windows_blocks(name: str) -> None:
    architecture, overrides = FAMILIES[name]
    tiny = build_tiny(architecture, seed=3, **overrides)
    bs, chunk, window = 4, 6, overrides["sliding_window"]
    engine = tiny.engine(block_size=bs, max_num_batched_tokens=chunk)
    groups = engine.block_manager.group_windows
    assert any(w == window for w in groups), groups
    prompt = random_prompts(1, 30, 30, seed=9)[0]
    engine.add_request(0, prompt, SamplingParams(max_new_tokens=40, temperature=0.0))
    most = (window - 1 + chunk) // bs + 2  # blocks reaching back a window, plus a step's
    held: list[list[int]] = []
    while engine.has_unfinished():
        engine.step()
        if engine.scheduler.running:
            seq = engine.scheduler.running[0]
            held.append([len(table) for table in seq.block_tables])
            covered = -(-seq.num_computed_tokens // bs)
            for group, table in enumerate(seq.block_tables):
                # Every group's table reaches the last computed token ...
                assert seq.block_offsets[group] + len(table) == covered
                # ... from the first block for a global group, from the window for the others.
                assert (
                    seq.block_offsets[group] == 0 if groups[group] is None else len(table) <= most
                )
    # At its last step the sequence had 68 tokens computed: global tables grew to 17 blocks,
    # window tables stayed at the window's (and the next token's) blocks.
    for group, window_of_group in enumerate(groups):
        sizes = [h[group] for h in held]
        if window_of_group is None:
            assert sizes[-1] == -(-(len(prompt) + 38) // bs)
        else:
            assert max(sizes[len(sizes) // 2 :]) <= -(-window // bs) + 1
    assert engine.stats().kv_used_blocks == 0


def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(
    family: tuple[str, TinyModel],
) -> None:
    name, tiny = family
    sequences = random_prompts(4, 20, 44, seed=8)
    decodes = 8
    reference = hf_teacher_forced(tiny.hf_model, sequences, decodes)
    hf_bf16 = hf_teacher_forced(copy.deepcopy(tiny.hf_model).to(torch.bfloat16), sequences, decodes)
    engine = tiny.engine(dtype=torch.bfloat16)
    config = tiny.model_config
    # The fused CPU kernels serve every dense family, windows and soft-caps included (Mistral
    # with a window, Gemma 2/3, Qwen3); mixture-of-experts and LongRoPE models run torch ops.
    fused = config.fused_cpu_supported
    assert engine.attention_backend == ("cpu" if fused else "torch")
    assert fused == (name not in NOT_FUSED), name
    thaw = teacher_forced_logits(engine, sequences, decodes)
    thaw_err, hf_err = (thaw - reference).abs(), (hf_bf16 - reference).abs()
    assert float(thaw_err.mean()) <= 1.25 * float(hf_err.mean()), name
    assert kl_divergence(reference, thaw) <= 1.5 * kl_divergence(reference, hf_bf16), name
    agree = (thaw.argmax(-1) == reference.argmax(-1)).float().mean()
    hf_agree = (hf_bf16.argmax(-1) == reference.argmax(-1)).float().mean()
    assert float(agree) >= float(hf_agree) - 0.03, name


def hf_teacher_forced(model: object, sequences: list[list[int]], decodes: int) -> torch.Tensor:
    """float32 logits in teacher_forced_logits' row order: every sequence's prefill rows, then
    one row per sequence for each decode step."""
    with torch.no_grad():
        full = [model(torch.tensor([s])).logits[0].float() for s in sequences]  # type: ignore[operator]
    rows = [logits[: len(s) - decodes] for logits, s in zip(full, sequences, strict=True)]
    for j in range(decodes):
        rows.append(
            torch.stack(
                [logits[len(s) - decodes + j] for logits, s in zip(full, sequences, strict=True)]
            )
        )
    return torch.cat(rows)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_spec_names_exactly_the_tensors_transformers_has(name: str) -> None:
    architecture, overrides = FAMILIES[name]
    tiny = build_tiny(architecture, **overrides)
    required = required_tensors(tiny.hf_config)
    assert required == {n: tuple(t.shape) for n, t in tiny.weights.items()}


def test_what_makes_each_family_differ_is_read_from_its_config() -> None:
    configs = {
        name: build_tiny(arch, **overrides).model_config
        for name, (arch, overrides) in FAMILIES.items()
        if name in ("gemma2", "gemma3", "mixtral", "qwen2-moe", "phi4-mini", "qwen3")
    }
    gemma2, gemma3 = configs["gemma2"], configs["gemma3"]
    assert gemma2.layer_windows == (8, None)
    assert (gemma2.attn_softcap, gemma2.final_softcap) == (3.0, 6.0)
    assert gemma2.scale == 24**-0.5 and gemma2.embed_scale == 64**0.5
    assert gemma2.activation == "gelu_tanh" and gemma2.norm_plus_one and gemma2.sandwich_norms
    assert gemma3.layer_windows == (8, 8, None) and gemma3.attn_softcap is None
    assert gemma3.local_rope is not None and gemma3.local_rope.theta == 10000.0
    assert (gemma3.rope.rope_type, gemma3.rope.factor, gemma3.rope.theta) == ("linear", 4.0, 1e6)
    assert configs["qwen3"].layer_windows == (None, 8) and configs["qwen3"].qk_norm
    mixtral = configs["mixtral"].moe
    assert mixtral is not None and (mixtral.num_experts, mixtral.top_k) == (5, 2)
    assert mixtral.normalise and mixtral.float32_weights
    qwen2_moe = configs["qwen2-moe"].moe
    assert qwen2_moe is not None and qwen2_moe.shared_expert_size == 48
    assert not qwen2_moe.normalise and not qwen2_moe.float32_weights
    phi4 = configs["phi4-mini"].rope
    assert phi4.rope_type == "longrope" and phi4.partial_rotary_factor == 0.75
    assert phi4.attention_factor == pytest.approx(
        (1 + torch.log(torch.tensor(8.0)).item() / torch.log(torch.tensor(32.0)).item()) ** 0.5
    )
    assert not configs["phi4-mini"].exact_prefix_caching


def test_hub_style_gemma3_and_phi3_configs_are_read() -> None:
    # config.json as the Hub ships them: rope_theta + rope_local_base_freq, no layer_types
    # (sliding_window_pattern), Phi-3's "su" scaling with original_max_position_embeddings.
    base = {
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 6,
        "num_attention_heads": 2,
        "max_position_embeddings": 4096,
    }
    gemma3 = ModelConfig.from_hf_config(
        {
            **base,
            "architectures": ["Gemma3ForCausalLM"],
            "head_dim": 4,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 4,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "rope_scaling": None,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
        }
    )
    assert gemma3.layer_windows == (512, 512, 512, 512, 512, None)
    assert gemma3.rope.theta == 1e6 and gemma3.local_rope is not None
    assert gemma3.local_rope.theta == 1e4
    phi3 = ModelConfig.from_hf_config(
        {
            **base,
            "architectures": ["Phi3ForCausalLM"],
            "original_max_position_embeddings": 1024,
            "rope_scaling": {"type": "su", "short_factor": [1.0, 1.0], "long_factor": [2.0, 3.0]},
            "sliding_window": 2047,
        }
    )
    assert phi3.rope.rope_type == "longrope" and phi3.rope.factor == 4.0
    assert phi3.rope.original_max_position_embeddings == 1024
    assert phi3.layer_windows == (2047,) * 6

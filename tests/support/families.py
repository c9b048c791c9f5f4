"""Every supported family at the tiny shape with its distinguishing features switched on: the
configs the family tests (tests/handler/model/, tests/snapshot/) build with build_tiny.

Windows are shorter than the test prompts, soft-caps small enough to bite, several experts with
top-k routing, LongRoPE's original context shorter than the longer prompts.
"""

from __future__ import annotations

from typing import Any

WINDOW = 8
ORIGINAL_CONTEXT = 32  # LongRoPE: prompts and generations run past it
HEAD_DIM = 16  # hidden 64 / 4 heads


def _factors(count: int, low: float, high: float) -> list[float]:
    return [low + (high - low) * i / max(count - 1, 1) for i in range(count)]


def _longrope(rotary_dim: int) -> dict[str, Any]:
    half = rotary_dim // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": _factors(half, 1.0, 1.5),
        "long_factor": _factors(half, 1.0, 6.0),
    }


FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-rope": (
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2-window": (
        "Qwen2ForCausalLM",
        # Only the second layer slides: one global and one window KV group.
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": (
        "Qwen3ForCausalLM",
        # The second layer slides (layers from max_window_layers on).
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3-moe": (
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 6,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "norm_topk_prob": False,
        },
    ),
    "mixtral": (
        "MixtralForCausalLM",
        {"num_local_experts": 5, "num_experts_per_tok": 2, "sliding_window": WINDOW},
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "head_dim": HEAD_DIM,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 6.0,
        },
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        {
            "head_dim": HEAD_DIM,
            "num_hidden_layers": 3,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        },
    ),
    "phi3-longrope": (
        "Phi3ForCausalLM",
        {
            "rope_parameters": _longrope(HEAD_DIM),
            "original_max_position_embeddings": ORIGINAL_CONTEXT,
            "sliding_window": 3 * WINDOW,
        },
    ),
    "phi4-mini": (
        # Phi-4-mini: LongRoPE over a partial rotary (three quarters of each head), tied head.
        "Phi3ForCausalLM",
        {
            "rope_parameters": {**_longrope(12), "partial_rotary_factor": 0.75},
            "original_max_position_embeddings": ORIGINAL_CONTEXT,
            "tie_word_embeddings": True,
        },
    ),
}

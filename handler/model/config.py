"""The model's shape, layer layout and rotary settings, derived from a Hugging Face config.json
dict through its family's spec (snapshot/architectures.py): the model code reads only this."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from handler.attention.base import LOGIT_SOFTCAP, SLIDING_WINDOW
from snapshot.architectures import (
    BY_MODEL_TYPE,
    SUPPORTED,
    ArchitectureSpec,
    head_dim_of,
    moe_layers,
    num_experts,
    supported_list,
)
from snapshot.errors import SnapshotError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# transformers' names for the activations, and the one thaw calls each.
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedModelError(ValueError):
    """The config describes a model this engine cannot run (yet)."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # Llama-3 frequency smoothing; unused for the other rope types.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # LongRoPE (Phi-3): per-frequency divisors for short and long contexts, and the factor cos
    # and sin are scaled by.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    # Phi-4-mini rotates only the first part of each head.
    partial_rotary_factor: float = 1.0

    @property
    def has_long_variant(self) -> bool:
        """LongRoPE with different long factors: a token's rotation depends on the sequence."""
        return self.rope_type == "longrope" and self.long_factor != self.short_factor


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    expert_size: int  # one expert's intermediate size
    normalise: bool  # renormalise the top-k probabilities to sum to one
    float32_weights: bool  # keep the routing weights in float32 (Mixtral) or round them (Qwen)
    shared_expert_size: int  # 0: no shared expert
    layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: RopeConfig = field(default_factory=RopeConfig)
    activation: str = "silu"  # "silu" or "gelu_tanh": the gated MLP's activation
    norm_plus_one: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    qk_norm: bool = False  # RMS norm over each q and k head before rotary
    sandwich_norms: bool = False  # norms after attention and around the MLP (Gemma)
    fused_projections: bool = False  # qkv_proj / gate_up_proj stored fused (Phi-3)
    embed_scale: float | None = None  # embeddings are multiplied by this (Gemma)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap before the mask
    final_softcap: float | None = None  # the same on the logits
    # Per layer: attention window in tokens (a query sees itself and window - 1 keys before
    # it), None for global attention. Empty: every layer global.
    layer_windows: tuple[int | None, ...] = ()
    local_rope: RopeConfig | None = None  # sliding layers' own rotary settings (Gemma 3)
    moe: MoeConfig | None = None

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    def window_of(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    def attention_needs(self, context: int) -> frozenset[str]:
        """What the attention backend must support for contexts up to `context` tokens: a
        window at least as long as the context changes nothing."""
        needs = set()
        if any(w is not None and w < context for w in self.layer_windows):
            needs.add(SLIDING_WINDOW)
        if self.attn_softcap is not None:
            needs.add(LOGIT_SOFTCAP)
        return frozenset(needs)

    @property
    def fused_cpu_supported(self) -> bool:
        """The fused CPU kernel path (llama.py) runs this model: dense gated MLPs and full
        rotary without LongRoPE; Gemma's and Qwen3's norms, GeGLU, scaled embeddings, windows
        and soft-caps included. Mixture-of-experts models run torch ops."""
        ropes = [self.rope] if self.local_rope is None else [self.rope, self.local_rope]
        return self.moe is None and all(
            r.partial_rotary_factor == 1.0 and r.rope_type != "longrope" for r in ropes
        )

    @property
    def exact_prefix_caching(self) -> bool:
        """Whether a token's KV depends on its prefix alone. Not with LongRoPE, whose rotation
        depends on the prompt's length (transformers rotates a whole long prompt with the long
        factors)."""
        return not self.rope.has_long_variant

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        spec = _spec_of(hf)
        try:
            return _from_spec(spec, hf)
        except SnapshotError as exc:
            raise UnsupportedModelError(str(exc)) from exc


def _from_spec(spec: ArchitectureSpec, hf: dict[str, Any]) -> ModelConfig:
    act = hf.get(spec.activation_key, "silu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{spec.activation_key} {act!r} is not supported (only {', '.join(ACTIVATIONS)})"
        )
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(f"{spec.name} with bidirectional attention is not supported")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = head_dim_of(hf)
    biases = spec.biases(hf)
    rope, local_rope = _rope_configs(spec, hf)
    windows = tuple(spec.layer_windows(hf))
    return ModelConfig(
        architecture=spec.name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=biases.qkv,
        o_bias=biases.o,
        mlp_bias=biases.mlp,
        rope=rope,
        activation=ACTIVATIONS[act],
        norm_plus_one=spec.norm_plus_one,
        qk_norm=spec.qk_norm,
        sandwich_norms=spec.sandwich_norms,
        fused_projections=spec.fused_projections,
        embed_scale=hidden**0.5 if spec.scaled_embeddings else None,
        attention_scale=(
            float(hf.get("query_pre_attn_scalar") or head_dim) ** -0.5
            if spec.query_pre_attn_scalar
            else None
        ),
        attn_softcap=_optional_float(hf, "attn_logit_softcapping", spec.attention_softcap),
        final_softcap=_optional_float(hf, "final_logit_softcapping", spec.final_softcap),
        layer_windows=windows if any(w is not None for w in windows) else (),
        local_rope=local_rope,
        moe=_moe_config(spec, hf),
    )


def _optional_float(hf: dict[str, Any], key: str, used: bool) -> float | None:
    value = hf.get(key) if used else None
    return None if value is None else float(value)


def _moe_config(spec: ArchitectureSpec, hf: dict[str, Any]) -> MoeConfig | None:
    moe = spec.moe
    layers = tuple(moe_layers(spec, hf))
    if moe is None or not any(layers):
        return None
    return MoeConfig(
        num_experts=num_experts(moe, hf),
        top_k=int(hf["num_experts_per_tok"]),
        expert_size=int(hf[moe.expert_size_key]),
        normalise=moe.always_normalise or bool(hf.get("norm_topk_prob", False)),
        float32_weights=moe.float32_weights,
        shared_expert_size=int(hf["shared_expert_intermediate_size"]) if moe.shared_expert else 0,
        layers=layers,
    )


def _spec_of(hf: dict[str, Any]) -> ArchitectureSpec:
    archs = hf.get("architectures") or []
    spec = SUPPORTED.get(archs[0]) if archs else BY_MODEL_TYPE.get(hf.get("model_type") or "")
    if spec is None:
        name = archs[0] if archs else f"<model_type {hf.get('model_type')!r}>"
        raise UnsupportedModelError(
            f"architecture {name!r} is not supported; supported: {supported_list()}"
        )
    return spec


def _rope_configs(
    spec: ArchitectureSpec, hf: dict[str, Any]
) -> tuple[RopeConfig, RopeConfig | None]:
    """The rotary settings of global layers, and of sliding layers where they differ."""
    # transformers >= 5 writes `rope_parameters` (nested by layer type for Gemma 3); config.json
    # files on the Hub use `rope_theta` + `rope_scaling` (+ `rope_local_base_freq`).
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    if not spec.local_rope:
        return _rope_config(spec, hf, {**scaling, **params}, 10000.0), None
    if "full_attention" in params:
        full = {**scaling, **(params.get("full_attention") or {})}
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**scaling, **params}
        local = {}
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    return _rope_config(spec, hf, full, 1_000_000.0), _rope_config(spec, hf, local, 10000.0)


def _rope_config(
    spec: ArchitectureSpec, hf: dict[str, Any], merged: dict[str, Any], default_theta: float
) -> RopeConfig:
    theta = float(merged.get("rope_theta", hf.get("rope_theta", default_theta)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    # Phi-3's older configs call LongRoPE "su" (and "yarn"): transformers reads both as longrope.
    if rope_type == "su" or (rope_type == "yarn" and spec.top_level_original_max):
        rope_type = "longrope"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    max_pos = int(hf.get("max_position_embeddings", 8192))
    original = int(merged.get("original_max_position_embeddings", max_pos))
    if spec.top_level_original_max and rope_type in ("llama3", "longrope"):
        original = int(hf.get("original_max_position_embeddings", original))
    partial = float(merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rope = RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        partial_rotary_factor=partial,
    )
    if rope_type != "longrope":
        return rope
    short = tuple(float(f) for f in merged.get("short_factor") or ())
    long = tuple(float(f) for f in merged.get("long_factor") or ())
    rotary_dim = int(head_dim_of(hf) * partial)
    if len(short) != rotary_dim // 2 or len(long) != rotary_dim // 2:
        raise UnsupportedModelError(
            f"longrope needs short_factor and long_factor of length {rotary_dim // 2}"
        )
    # transformers: factor defaults to the context extension, attention_factor to the paper's.
    factor = merged.get("factor")
    factor = max_pos / original if factor is None else float(factor)
    attention = merged.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=factor,
        original_max_position_embeddings=original,
        short_factor=short,
        long_factor=long,
        attention_factor=float(attention),
        partial_rotary_factor=partial,
    )

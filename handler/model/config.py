"""The model's shape and rotary settings, read from a Hugging Face config.json dict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snapshot.architectures import BY_MODEL_TYPE, SUPPORTED, ArchitectureSpec, supported_list

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        spec = _spec_of(hf)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        max_pos = int(hf.get("max_position_embeddings", 2048))
        window = spec.sliding_window(hf)
        if window is not None and window < max_pos:
            raise UnsupportedModelError(
                f"{spec.name} with sliding-window attention (sliding_window={window} < "
                f"max_position_embeddings={max_pos}) is not supported yet"
            )
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        biases = spec.biases(hf)
        return cls(
            architecture=spec.name,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=biases.qkv,
            o_bias=biases.o,
            mlp_bias=biases.mlp,
            rope=_rope_config(hf),
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


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; config.json files on the Hub use
    # `rope_theta` + `rope_scaling`. Accept both.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )

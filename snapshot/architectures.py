"""The architectures thaw serves: one spec per family, read by the snapshot checks (which tensors
with which shapes) and by the model code (handler/model/config.py: biases, sliding window).

Everything here follows from config.json alone, so verify can catch a wrong or foreign tensor
without importing any model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapshot.errors import SnapshotError

Shape = tuple[int, ...]
HFConfig = dict[str, Any]


@dataclass(frozen=True)
class Biases:
    qkv: bool
    o: bool
    mlp: bool


@dataclass(frozen=True)
class ArchitectureSpec:
    """What makes one family differ from the plain Llama layout."""

    name: str  # config.json's architectures[0]
    model_type: str  # config.json's model_type (all a GGUF file carries)
    biases: Callable[[HFConfig], Biases]
    # The attention window in tokens when the config switches one on, else None.
    sliding_window: Callable[[HFConfig], int | None]


def _llama_biases(config: HFConfig) -> Biases:
    attention = bool(config.get("attention_bias", False))
    return Biases(qkv=attention, o=attention, mlp=bool(config.get("mlp_bias", False)))


def _window(config: HFConfig) -> int | None:
    window = config.get("sliding_window")
    return None if window is None else int(window)


def _qwen2_window(config: HFConfig) -> int | None:
    return _window(config) if config.get("use_sliding_window", False) else None


SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("LlamaForCausalLM", "llama", _llama_biases, _window),
    # transformers' Mistral has no bias anywhere, whatever the config says.
    ArchitectureSpec(
        "MistralForCausalLM", "mistral", lambda _c: Biases(False, False, False), _window
    ),
    # Qwen2 always has q/k/v biases and none elsewhere.
    ArchitectureSpec(
        "Qwen2ForCausalLM", "qwen2", lambda _c: Biases(True, False, False), _qwen2_window
    ),
)
SUPPORTED: dict[str, ArchitectureSpec] = {spec.name: spec for spec in SPECS}
BY_MODEL_TYPE: dict[str, ArchitectureSpec] = {spec.model_type: spec for spec in SPECS}


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED))


def check_supported(architecture: str) -> ArchitectureSpec:
    spec = SUPPORTED.get(architecture)
    if spec is None:
        raise SnapshotError(
            f"architecture {architecture} is not supported (thaw serves {supported_list()})"
        )
    return spec


def spec_for_model_type(model_type: str | None) -> ArchitectureSpec:
    spec = BY_MODEL_TYPE.get(model_type or "")
    if spec is None:
        raise SnapshotError(
            f"model type {model_type} is not supported (thaw serves {supported_list()})"
        )
    return spec


def architecture_of(config: HFConfig) -> str:
    names = config.get("architectures")
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise SnapshotError(f"config.json: 'architectures' is {names!r}, expected one name")
    return names[0]


def _int(config: HFConfig, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SnapshotError(f"config.json: '{key}' is {value!r}, expected a positive integer")
    return value


def required_tensors(config: HFConfig) -> dict[str, Shape]:
    """Every tensor the architecture in `config` needs, by Hugging Face name, with its shape."""
    spec = check_supported(architecture_of(config))
    bias = spec.biases(config)
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    layers = _int(config, "num_hidden_layers")
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    shapes: dict[str, Shape] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_out, hidden),
            p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
        if bias.qkv:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if bias.o:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if bias.mlp:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (hidden,),
            }
    return shapes

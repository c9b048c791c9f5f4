"""The architectures a snapshot may hold, and the tensors (with shapes) each one needs.

The shapes follow from config.json alone, so verify can catch a wrong or foreign tensor
without importing any model code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from snapshot.errors import SnapshotError

Shape = tuple[int, ...]


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SnapshotError(f"config.json: '{key}' is {value!r}, expected a positive integer")
    return value


def _llama_family(config: dict[str, Any], qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> dict:
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
        if qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (hidden,),
            }
    return shapes


def _llama(config: dict[str, Any]) -> dict[str, Shape]:
    bias = bool(config.get("attention_bias", False))
    return _llama_family(config, bias, bias, bool(config.get("mlp_bias", False)))


def _mistral(config: dict[str, Any]) -> dict[str, Shape]:
    return _llama_family(config, False, False, False)


def _qwen2(config: dict[str, Any]) -> dict[str, Shape]:
    # Qwen2 always has q/k/v biases and none elsewhere.
    return _llama_family(config, True, False, False)


SUPPORTED: dict[str, Callable[[dict[str, Any]], dict[str, Shape]]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
}


def architecture_of(config: dict[str, Any]) -> str:
    names = config.get("architectures")
    if not isinstance(names, list) or len(names) != 1 or not isinstance(names[0], str):
        raise SnapshotError(f"config.json: 'architectures' is {names!r}, expected one name")
    return names[0]


def check_supported(architecture: str) -> None:
    if architecture not in SUPPORTED:
        raise SnapshotError(
            f"architecture {architecture} is not supported"
            f" (thaw serves {', '.join(sorted(SUPPORTED))})"
        )


def required_tensors(config: dict[str, Any]) -> dict[str, Shape]:
    """Every tensor the architecture in `config` needs, by Hugging Face name, with its shape."""
    architecture = architecture_of(config)
    check_supported(architecture)
    return SUPPORTED[architecture](config)

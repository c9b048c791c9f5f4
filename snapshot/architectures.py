"""The architectures thaw serves: one spec per family, read by the snapshot checks (which tensors
with which shapes) and by the model code (handler/model/config.py: biases, norms, attention
windows, soft-caps, rotary variants, experts).

Everything here follows from config.json alone, so verify can catch a wrong or foreign tensor
without importing any model code. Tensor names are the ones transformers' state_dict() uses
(what a snapshot stores): MoE experts as stacked [experts, out, in] tensors, Phi-3's fused
projections as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from snapshot.errors import SnapshotError

Shape = tuple[int, ...]
HFConfig = dict[str, Any]
Windows = list[int | None]  # per layer: the attention window in tokens, None for global


@dataclass(frozen=True)
class Biases:
    qkv: bool
    o: bool
    mlp: bool


@dataclass(frozen=True)
class MoeSpec:
    """How a family routes tokens to experts."""

    # config keys of the number of routed experts, first present wins (transformers 5 writes
    # Qwen's num_experts as num_local_experts).
    num_experts_keys: tuple[str, ...]
    expert_size_key: str  # config key of one expert's intermediate size
    # Mixtral always renormalises the top-k probabilities; Qwen only with norm_topk_prob.
    always_normalise: bool
    # Mixtral keeps the routing weights in float32; Qwen rounds them to the model's dtype.
    float32_weights: bool
    shared_expert: bool = False  # Qwen2-MoE: a dense expert for every token, sigmoid-gated
    # Qwen: only layers (i + 1) % decoder_sparse_step == 0 outside mlp_only_layers have experts.
    sparse_step: bool = False


@dataclass(frozen=True)
class ArchitectureSpec:
    """What makes one family differ from the plain Llama layout."""

    name: str  # config.json's architectures[0]
    model_type: str  # config.json's model_type (all a GGUF file carries)
    biases: Callable[[HFConfig], Biases]
    # Per layer, the attention window when the config switches one on, else None.
    layer_windows: Callable[[HFConfig], Windows]
    activation_key: str = "hidden_act"
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMS norm per head on q and k, before rotary
    # Gemma: norms after attention and around the MLP (pre_/post_feedforward_layernorm).
    sandwich_norms: bool = False
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    scaled_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: bool = False  # Gemma: attention scale from query_pre_attn_scalar
    attention_softcap: bool = False  # Gemma 2: attn_logit_softcapping
    final_softcap: bool = False  # Gemma 2 and 3: final_logit_softcapping
    local_rope: bool = False  # Gemma 3: sliding layers rotate with their own rope base
    # Phi-3 keeps original_max_position_embeddings beside the rope parameters.
    top_level_original_max: bool = False
    moe: MoeSpec | None = None
    # Families that differ only in this release of a config (e.g. Gemma 3 text from a GGUF).
    other_model_types: tuple[str, ...] = ()


def _llama_biases(config: HFConfig) -> Biases:
    attention = bool(config.get("attention_bias", False))
    return Biases(qkv=attention, o=attention, mlp=bool(config.get("mlp_bias", False)))


def _no_biases(_config: HFConfig) -> Biases:
    return Biases(False, False, False)


def _qkv_biases(_config: HFConfig) -> Biases:
    return Biases(True, False, False)


def _qwen2_moe_biases(config: HFConfig) -> Biases:
    return Biases(bool(config.get("qkv_bias", True)), False, False)


def _window_value(config: HFConfig) -> int | None:
    window = config.get("sliding_window")
    # Qwen2-MoE writes 0 for "no window".
    return int(window) if window else None


def _num_layers(config: HFConfig) -> int:
    return _int(config, "num_hidden_layers")


def _no_windows(config: HFConfig) -> Windows:
    # transformers' Llama ignores any sliding_window a config carries.
    return [None] * _num_layers(config)


def _every_layer(config: HFConfig) -> Windows:
    # Mistral, Mixtral, Phi-3, Qwen3-MoE: one window (or none) for every layer.
    return [_window_value(config)] * _num_layers(config)


def _by_layer_types(config: HFConfig, default: Callable[[int], bool]) -> Windows:
    """Windows from config.json's layer_types, else from the family's default pattern
    (default(i): layer i slides)."""
    window = _window_value(config)
    layers = _num_layers(config)
    types = config.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers:
            raise SnapshotError(f"config.json: 'layer_types' is {types!r}, expected {layers} names")
        unknown = set(types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise SnapshotError(f"config.json: unknown layer types {sorted(unknown)}")
        sliding = [t == "sliding_attention" for t in types]
    else:
        sliding = [default(i) for i in range(layers)]
    return [window if slides else None for slides in sliding]


def _qwen_windows(config: HFConfig) -> Windows:
    # Qwen2/Qwen3: the window only with use_sliding_window, on layers from max_window_layers on.
    if not config.get("use_sliding_window", False):
        return [None] * _num_layers(config)
    first = int(config.get("max_window_layers", 28))
    return _by_layer_types(config, lambda i: i >= first)


def _qwen3_moe_windows(config: HFConfig) -> Windows:
    if not config.get("use_sliding_window", False):
        return [None] * _num_layers(config)
    return _every_layer(config)


def _qwen2_moe_windows(config: HFConfig) -> Windows:
    if not config.get("use_sliding_window", False):
        return [None] * _num_layers(config)
    last = int(config.get("max_window_layers", 28))
    return _by_layer_types(config, lambda i: (i + 1) % 2 == 1 and i < last)


def _gemma2_windows(config: HFConfig) -> Windows:
    return _by_layer_types(config, lambda i: (i + 1) % 2 == 1)


def _gemma3_windows(config: HFConfig) -> Windows:
    # Hub configs still carry the older sliding_window_pattern (every n-th layer is global).
    pattern = int(config.get("sliding_window_pattern", 6))
    return _by_layer_types(config, lambda i: (i + 1) % pattern != 0)


_QWEN_MOE = dict(
    num_experts_keys=("num_experts", "num_local_experts"), expert_size_key="moe_intermediate_size"
)
_GEMMA = dict(
    activation_key="hidden_activation",
    norm_plus_one=True,
    sandwich_norms=True,
    scaled_embeddings=True,
    query_pre_attn_scalar=True,
    final_softcap=True,
)

SPECS: tuple[ArchitectureSpec, ...] = (
    ArchitectureSpec("LlamaForCausalLM", "llama", _llama_biases, _no_windows),
    # transformers' Mistral has no bias anywhere, whatever the config says.
    ArchitectureSpec("MistralForCausalLM", "mistral", _no_biases, _every_layer),
    # Qwen2 always has q/k/v biases and none elsewhere.
    ArchitectureSpec("Qwen2ForCausalLM", "qwen2", _qkv_biases, _qwen_windows),
    ArchitectureSpec("Qwen3ForCausalLM", "qwen3", _llama_biases, _qwen_windows, qk_norm=True),
    ArchitectureSpec(
        "Qwen3MoeForCausalLM",
        "qwen3_moe",
        _llama_biases,
        _qwen3_moe_windows,
        qk_norm=True,
        moe=MoeSpec(**_QWEN_MOE, always_normalise=False, float32_weights=False, sparse_step=True),
    ),
    ArchitectureSpec(
        "Qwen2MoeForCausalLM",
        "qwen2_moe",
        _qwen2_moe_biases,
        _qwen2_moe_windows,
        moe=MoeSpec(
            **_QWEN_MOE,
            always_normalise=False,
            float32_weights=False,
            shared_expert=True,
            sparse_step=True,
        ),
    ),
    ArchitectureSpec(
        "MixtralForCausalLM",
        "mixtral",
        _no_biases,
        _every_layer,
        moe=MoeSpec(("num_local_experts",), "intermediate_size", True, True),
    ),
    ArchitectureSpec(
        "Gemma2ForCausalLM",
        "gemma2",
        _llama_biases,
        _gemma2_windows,
        attention_softcap=True,
        **_GEMMA,
    ),
    ArchitectureSpec(
        "Gemma3ForCausalLM",
        "gemma3_text",
        _llama_biases,
        _gemma3_windows,
        qk_norm=True,
        local_rope=True,
        other_model_types=("gemma3",),
        **_GEMMA,
    ),
    ArchitectureSpec(
        "Phi3ForCausalLM",
        "phi3",
        _no_biases,
        _every_layer,
        fused_projections=True,
        top_level_original_max=True,
    ),
)
SUPPORTED: dict[str, ArchitectureSpec] = {spec.name: spec for spec in SPECS}
BY_MODEL_TYPE: dict[str, ArchitectureSpec] = {
    model_type: spec for spec in SPECS for model_type in (spec.model_type, *spec.other_model_types)
}


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


def head_dim_of(config: HFConfig) -> int:
    return int(
        config.get("head_dim") or _int(config, "hidden_size") // _int(config, "num_attention_heads")
    )


def num_experts(moe: MoeSpec, config: HFConfig) -> int:
    for key in moe.num_experts_keys:
        if config.get(key) is not None:
            return _int(config, key)
    return 0


def moe_layers(spec: ArchitectureSpec, config: HFConfig) -> list[bool]:
    """Per layer: whether its MLP is a mixture of experts."""
    layers = _num_layers(config)
    moe = spec.moe
    if moe is None:
        return [False] * layers
    if not num_experts(moe, config):
        return [False] * layers
    if not moe.sparse_step:
        return [True] * layers
    step = int(config.get("decoder_sparse_step", 1))
    dense = set(config.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def required_tensors(config: HFConfig) -> dict[str, Shape]:
    """Every tensor the architecture in `config` needs, by Hugging Face name, with its shape."""
    spec = check_supported(architecture_of(config))
    bias = spec.biases(config)
    hidden = _int(config, "hidden_size")
    heads = _int(config, "num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = head_dim_of(config)
    inter = _int(config, "intermediate_size")
    vocab = _int(config, "vocab_size")
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    shapes: dict[str, Shape] = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i, has_experts in enumerate(moe_layers(spec, config)):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.o_proj.weight": (hidden, q_out),
        }
        if spec.fused_projections:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_out + 2 * kv_out, hidden)
        else:
            shapes |= {
                p + "self_attn.q_proj.weight": (q_out, hidden),
                p + "self_attn.k_proj.weight": (kv_out, hidden),
                p + "self_attn.v_proj.weight": (kv_out, hidden),
            }
        if spec.qk_norm:
            shapes |= {
                p + "self_attn.q_norm.weight": (head_dim,),
                p + "self_attn.k_norm.weight": (head_dim,),
            }
        if spec.sandwich_norms:
            shapes |= {
                p + "pre_feedforward_layernorm.weight": (hidden,),
                p + "post_feedforward_layernorm.weight": (hidden,),
            }
        if has_experts:
            shapes |= _expert_tensors(spec, config, p + "mlp.", hidden)
        elif spec.fused_projections:
            shapes |= {
                p + "mlp.gate_up_proj.weight": (2 * inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        else:
            shapes |= _dense_mlp(p + "mlp.", hidden, inter)
        if bias.qkv:
            shapes |= {
                p + "self_attn.q_proj.bias": (q_out,),
                p + "self_attn.k_proj.bias": (kv_out,),
                p + "self_attn.v_proj.bias": (kv_out,),
            }
        if bias.o:
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if bias.mlp and not has_experts:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (hidden,),
            }
    return shapes


def _dense_mlp(prefix: str, hidden: int, inter: int) -> dict[str, Shape]:
    return {
        prefix + "gate_proj.weight": (inter, hidden),
        prefix + "up_proj.weight": (inter, hidden),
        prefix + "down_proj.weight": (hidden, inter),
    }


def _expert_tensors(
    spec: ArchitectureSpec, config: HFConfig, prefix: str, hidden: int
) -> dict[str, Shape]:
    moe = spec.moe
    assert moe is not None
    experts = num_experts(moe, config)
    size = _int(config, moe.expert_size_key)
    shapes: dict[str, Shape] = {
        prefix + "gate.weight": (experts, hidden),
        # Gate and up projections of every expert, stacked: [experts, 2 * size, hidden].
        prefix + "experts.gate_up_proj": (experts, 2 * size, hidden),
        prefix + "experts.down_proj": (experts, hidden, size),
    }
    if moe.shared_expert:
        shared = _int(config, "shared_expert_intermediate_size")
        shapes |= _dense_mlp(prefix + "shared_expert.", hidden, shared)
        shapes[prefix + "shared_expert_gate.weight"] = (1, hidden)
    return shapes

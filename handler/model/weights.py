"""Hugging Face tensor names -> the fused per-layer tensors the forward pass uses.

The names follow snapshot/architectures.py's required_tensors (tests check the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handler.kernels.cpu import CpuKernels
from handler.model.config import ModelConfig
from handler.model.linear import Linear, make_linear, make_quantized_linear, make_stacked_linear
from handler.model.moe import ExpertWeights, SharedExpert
from handler.model.norms import norm_weight
from snapshot.quant.format import QuantizedTensor


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # q, k and v projections stacked: one matmul instead of three
    o: Linear
    post_norm: torch.Tensor  # the norm before the MLP
    gate_up: Linear | None  # gate and up projections stacked; None for experts
    down: Linear | None
    q_norm: torch.Tensor | None = None  # per-head norms (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma: norms of the attention and MLP outputs
    mlp_out_norm: torch.Tensor | None = None
    experts: ExpertWeights | None = None


@dataclass
class ModelWeights:
    embed: torch.Tensor | QuantizedTensor  # quantized tables de-quantize the rows looked up
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear


class MissingWeightError(ValueError):
    """A tensor the config calls for is absent from the weights."""


def embed_tokens(
    embed: torch.Tensor | QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The embedding rows of `ids`, in `dtype`."""
    if isinstance(embed, QuantizedTensor):
        return embed.rows(ids, dtype)
    return torch.nn.functional.embedding(ids, embed)


def load_weights(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor | QuantizedTensor],
    dtype: torch.dtype,
    device: torch.device,
    pack: bool = True,
    kernels: CpuKernels | None = None,
) -> ModelWeights:
    """pack: let linear layers pack their weights where that is faster (see linear.py);
    kernels: the CPU kernels, whose matrix multiply is the fastest packing where it runs."""

    def stored(name: str) -> torch.Tensor | QuantizedTensor:
        """A weight on the device: dense in dtype, or quantized as stored."""
        if name not in tensors:
            raise MissingWeightError(f"weight {name!r} is missing")
        tensor = tensors[name]
        if isinstance(tensor, QuantizedTensor):
            return tensor.to(device)
        return tensor.to(device=device, dtype=dtype)

    def take(name: str) -> torch.Tensor:
        tensor = stored(name)
        if isinstance(tensor, QuantizedTensor):
            return tensor.dequantize(torch.float32).to(dtype)
        return tensor

    def maybe(name: str, wanted: bool) -> torch.Tensor | None:
        return take(name) if wanted else None

    def linear(weight: torch.Tensor | QuantizedTensor, bias: torch.Tensor | None) -> Linear:
        if isinstance(weight, QuantizedTensor):
            return make_quantized_linear(weight, bias, dtype, pack, kernels)
        return make_linear(weight, bias, pack, kernels)

    def stacked_linear(prefixes: list[str], bias: bool) -> Linear:
        biases = [take(f"{p}.bias") for p in prefixes] if bias else None
        parts = [stored(f"{p}.weight") for p in prefixes]
        return make_stacked_linear(parts, biases, dtype, pack, kernels)

    def norm(name: str) -> torch.Tensor:
        return norm_weight(take(name), config.norm_plus_one)

    def dense(prefix: str, bias: bool) -> tuple[Linear, Linear]:
        if config.fused_projections:
            gate_up = linear(stored(f"{prefix}.gate_up_proj.weight"), None)
        else:
            gate_up = stacked_linear([f"{prefix}.gate_proj", f"{prefix}.up_proj"], bias)
        down = linear(stored(f"{prefix}.down_proj.weight"), maybe(f"{prefix}.down_proj.bias", bias))
        return gate_up, down

    def experts(prefix: str) -> ExpertWeights:
        shared = None
        if config.moe is not None and config.moe.shared_expert_size:
            gate_up, down = dense(f"{prefix}.shared_expert", False)
            shared = SharedExpert(gate_up, down, take(f"{prefix}.shared_expert_gate.weight"))
        return ExpertWeights(
            router=take(f"{prefix}.gate.weight"),
            gate_up=take(f"{prefix}.experts.gate_up_proj").contiguous(),
            down=take(f"{prefix}.experts.down_proj").contiguous(),
            shared=shared,
        )

    layers = []
    moe_layers = config.moe.layers if config.moe is not None else (False,) * config.num_layers
    for i, has_experts in enumerate(moe_layers):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        if config.fused_projections:
            qkv = linear(stored(f"{attn}.qkv_proj.weight"), None)
        else:
            qkv = stacked_linear([f"{attn}.{x}_proj" for x in "qkv"], config.qkv_bias)
        gate_up, down = (None, None) if has_experts else dense(mlp, config.mlp_bias)
        sandwich = config.sandwich_norms
        layers.append(
            LayerWeights(
                input_norm=norm(f"{p}.input_layernorm.weight"),
                qkv=qkv,
                o=linear(
                    stored(f"{attn}.o_proj.weight"), maybe(f"{attn}.o_proj.bias", config.o_bias)
                ),
                # Gemma's post_attention_layernorm normalises the attention output; its MLP
                # input norm is pre_feedforward_layernorm.
                post_norm=norm(
                    f"{p}.pre_feedforward_layernorm.weight"
                    if sandwich
                    else f"{p}.post_attention_layernorm.weight"
                ),
                gate_up=gate_up,
                down=down,
                q_norm=norm(f"{attn}.q_norm.weight") if config.qk_norm else None,
                k_norm=norm(f"{attn}.k_norm.weight") if config.qk_norm else None,
                attn_out_norm=norm(f"{p}.post_attention_layernorm.weight") if sandwich else None,
                mlp_out_norm=norm(f"{p}.post_feedforward_layernorm.weight") if sandwich else None,
                experts=experts(mlp) if has_experts else None,
            )
        )
    embed = stored("model.embed_tokens.weight")
    return ModelWeights(
        embed=embed,
        layers=layers,
        norm=norm("model.norm.weight"),
        lm_head=linear(embed if config.tie_word_embeddings else stored("lm_head.weight"), None),
    )

"""Hugging Face tensor names -> the fused per-layer tensors the forward pass uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handler.kernels.cpu import CpuKernels
from handler.model.config import ModelConfig
from handler.model.linear import Linear, make_linear


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Linear  # q, k and v projections stacked: one matmul instead of three
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear  # gate and up projections stacked
    down: Linear


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: Linear


class MissingWeightError(ValueError):
    """A tensor the config calls for is absent from the weights."""


def load_weights(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    pack: bool = True,
    kernels: CpuKernels | None = None,
) -> ModelWeights:
    """pack: let linear layers pack their weights where that is faster (see linear.py);
    kernels: the CPU kernels, whose matrix multiply is the fastest packing where it runs."""

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise MissingWeightError(f"weight {name!r} is missing")
        return tensors[name].to(device=device, dtype=dtype)

    def maybe(name: str, wanted: bool) -> torch.Tensor | None:
        return take(name) if wanted else None

    def stacked(names: list[str]) -> torch.Tensor:
        return torch.cat([take(n) for n in names], dim=0).contiguous()

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        return make_linear(weight, bias, pack, kernels)

    layers = []
    for i in range(config.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = [f"{attn}.{p}_proj" for p in "qkv"]
        gate_up = [f"{mlp}.gate_proj", f"{mlp}.up_proj"]
        layers.append(
            LayerWeights(
                input_norm=take(f"model.layers.{i}.input_layernorm.weight"),
                qkv=linear(
                    stacked([f"{n}.weight" for n in qkv]),
                    stacked([f"{n}.bias" for n in qkv]) if config.qkv_bias else None,
                ),
                o=linear(
                    take(f"{attn}.o_proj.weight"), maybe(f"{attn}.o_proj.bias", config.o_bias)
                ),
                post_norm=take(f"model.layers.{i}.post_attention_layernorm.weight"),
                gate_up=linear(
                    stacked([f"{n}.weight" for n in gate_up]),
                    stacked([f"{n}.bias" for n in gate_up]) if config.mlp_bias else None,
                ),
                down=linear(
                    take(f"{mlp}.down_proj.weight"), maybe(f"{mlp}.down_proj.bias", config.mlp_bias)
                ),
            )
        )
    embed = take("model.embed_tokens.weight")
    return ModelWeights(
        embed=embed,
        layers=layers,
        norm=take("model.norm.weight"),
        lm_head=linear(embed if config.tie_word_embeddings else take("lm_head.weight"), None),
    )

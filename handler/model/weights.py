"""Hugging Face tensor names -> the fused per-layer tensors the forward pass uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handler.model.config import ModelConfig


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


class MissingWeightError(ValueError):
    """A tensor the config calls for is absent from the weights."""


def load_weights(
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> ModelWeights:
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise MissingWeightError(f"weight {name!r} is missing")
        return tensors[name].to(device=device, dtype=dtype)

    def maybe(name: str, wanted: bool) -> torch.Tensor | None:
        return take(name) if wanted else None

    def stacked(names: list[str]) -> torch.Tensor:
        return torch.cat([take(n) for n in names], dim=0).contiguous()

    layers = []
    for i in range(config.num_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        qkv = [f"{attn}.{p}_proj" for p in "qkv"]
        gate_up = [f"{mlp}.gate_proj", f"{mlp}.up_proj"]
        layers.append(
            LayerWeights(
                input_norm=take(f"model.layers.{i}.input_layernorm.weight"),
                qkv=stacked([f"{n}.weight" for n in qkv]),
                qkv_bias=stacked([f"{n}.bias" for n in qkv]) if config.qkv_bias else None,
                o=take(f"{attn}.o_proj.weight"),
                o_bias=maybe(f"{attn}.o_proj.bias", config.o_bias),
                post_norm=take(f"model.layers.{i}.post_attention_layernorm.weight"),
                gate_up=stacked([f"{n}.weight" for n in gate_up]),
                gate_up_bias=stacked([f"{n}.bias" for n in gate_up]) if config.mlp_bias else None,
                down=take(f"{mlp}.down_proj.weight"),
                down_bias=maybe(f"{mlp}.down_proj.bias", config.mlp_bias),
            )
        )
    embed = take("model.embed_tokens.weight")
    return ModelWeights(
        embed=embed,
        layers=layers,
        norm=take("model.norm.weight"),
        lm_head=embed if config.tie_word_embeddings else take("lm_head.weight"),
    )

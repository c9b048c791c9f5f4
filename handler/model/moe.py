"""Mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE): routing and a plain reference expert
loop. Tokens are grouped by expert, each expert runs one matmul pair over its tokens, and the
weighted outputs are added back in ascending expert order, as transformers does (so float32
results match it bit for bit). On CUDA the grouped Triton kernel (moe_triton.py) replaces
`run_experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handler.model.config import MoeConfig
from handler.model.linear import Linear


@dataclass
class SharedExpert:
    """Qwen2-MoE: a dense MLP every token goes through, scaled by sigmoid(gate · x)."""

    gate_up: Linear
    down: Linear
    gate: torch.Tensor  # [1, hidden]


@dataclass
class ExpertWeights:
    router: torch.Tensor  # [experts, hidden]
    gate_up: torch.Tensor  # [experts, 2 * expert_size, hidden]: gate rows, then up rows
    down: torch.Tensor  # [experts, hidden, expert_size]
    shared: SharedExpert | None = None


def route(
    hidden: torch.Tensor, router: torch.Tensor, moe: MoeConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights: softmax over the router logits in float32,
    top k, renormalised where the family does."""
    logits = F.linear(hidden, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, moe.top_k, dim=-1)
    if moe.normalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not moe.float32_weights:
        weights = weights.to(logits.dtype)
    return weights, experts


def run_experts(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w: ExpertWeights,
    activation: str,
) -> torch.Tensor:
    """sum over each token's k experts of weight * down(act(gate(x)) * up(x))."""
    num_experts, top_k = w.gate_up.shape[0], experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    out = torch.zeros_like(hidden)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        picks = order[start : start + count]
        start += count
        tokens, slots = picks // top_k, picks % top_k
        gate, up = F.linear(hidden[tokens], w.gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(activate(gate, activation) * up, w.down[expert])
        y = y * weights[tokens, slots, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def moe_mlp(
    hidden: torch.Tensor, w: ExpertWeights, moe: MoeConfig, activation: str
) -> torch.Tensor:
    weights, experts = route(hidden, w.router, moe)
    if hidden.is_cuda:
        # The grouped Triton kernel (imported only here: triton is a GPU dependency).
        from handler.model.moe_triton import run_experts_grouped

        out = run_experts_grouped(hidden, weights, experts, w, activation)
    else:
        out = run_experts(hidden, weights, experts, w, activation)
    if w.shared is not None:
        gate, up = w.shared.gate_up(hidden).chunk(2, dim=-1)
        shared = w.shared.down(activate(gate, activation) * up)
        out = out + torch.sigmoid(F.linear(hidden, w.shared.gate)) * shared
    return out


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.silu(x)

"""Forward pass of the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) over a flat token batch.

Plain functions over weight tensors rather than nn.Modules: the step loop is Python-bound on
small batches, and every avoided module call and reshape counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.model.config import ModelConfig
from handler.model.rope import RotaryEmbedding, apply_rotary
from handler.model.weights import LayerWeights, load_weights

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        backend: AttentionBackend,
        max_positions: int,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.weights = load_weights(config, tensors, dtype, device)
        self.rope = RotaryEmbedding(config.rope, config.head_dim, max_positions, dtype, device)
        self.scale = config.head_dim**-0.5
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self._qk_size = q_size + kv_size
        self._kv_size = kv_size

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm; writes this step's KV."""
        self.backend.prepare(meta)
        cos, sin = self.rope.lookup(positions)
        hidden = F.embedding(input_ids, self.weights.embed)
        # The residual stream is this step's own tensor (embedding output): adding in place
        # saves an allocation per add, with bit-identical results.
        for layer, (k_cache, v_cache) in zip(self.weights.layers, kv_caches, strict=True):
            hidden.add_(self._attention(layer, hidden, cos, sin, meta, k_cache, v_cache))
            hidden.add_(self._mlp(layer, hidden))
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [rows, vocab] for the given rows of forward()'s output."""
        normed = self._rms_norm(hidden, self.weights.norm)
        return F.linear(normed, self.weights.lm_head).float()

    def _attention(
        self,
        layer: LayerWeights,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        num_tokens = hidden.shape[0]
        qkv = F.linear(self._rms_norm(hidden, layer.input_norm), layer.qkv, layer.qkv_bias)
        # q and k heads rotate together in one pass.
        qk = qkv[:, : self._qk_size].view(num_tokens, cfg.num_heads + cfg.num_kv_heads, -1)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = qkv[:, self._qk_size :].view(num_tokens, cfg.num_kv_heads, -1)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return F.linear(out.reshape(num_tokens, -1), layer.o, layer.o_bias)

    def _mlp(self, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        normed = self._rms_norm(hidden, layer.post_norm)
        gate_up = F.linear(normed, layer.gate_up, layer.gate_up_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate).mul_(up), layer.down, layer.down_bias)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One fused op; bit-identical to HF's formula in float32, and in bfloat16 it scales by
        # the weight before the final rounding (HF rounds first), a difference of one ulp.
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)

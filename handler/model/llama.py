"""Forward pass of the Llama family (Llama 2/3, SmolLM, Mistral, Qwen2) over a flat token batch.

Plain functions over weight tensors rather than nn.Modules: the step loop is Python-bound on
small batches, and every avoided module call and reshape counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.kernels.cpu import CpuKernels, check_range
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
        pack_weights: bool = True,
        kernels: CpuKernels | None = None,
    ) -> None:
        """kernels: run norms, rotary, SiLU and (where built) the linear layers' matrix multiply
        with the fused CPU kernels (bfloat16 on the CPU); compute_logits then returns bfloat16
        logits for their sampler."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self.weights = load_weights(config, tensors, dtype, device, pack_weights, kernels)
        self.rope = RotaryEmbedding(config.rope, config.head_dim, max_positions, dtype, device)
        self.scale = config.head_dim**-0.5
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self._qk_size = q_size + kv_size
        self.kernels = kernels

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm (float32 with the CPU
        kernels, else the model's dtype); writes this step's KV."""
        if self.kernels is not None:
            return self._forward_fused(input_ids, positions, meta, kv_caches, self.kernels)
        self.backend.prepare(meta)
        cos, sin = self.rope.lookup(positions)
        hidden = F.embedding(input_ids, self.weights.embed)
        # The residual stream is this step's own tensor (embedding output): adding in place
        # saves an allocation per add, with bit-identical results.
        for layer, (k_cache, v_cache) in zip(self.weights.layers, kv_caches, strict=True):
            hidden.add_(self._attention(layer, hidden, cos, sin, meta, k_cache, v_cache))
            hidden.add_(self._mlp(layer, hidden))
        return hidden

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
        kernels: CpuKernels,
    ) -> torch.Tensor:
        # forward() with each residual add fused into the norm that follows it, rotary in place
        # on the projection output, SiLU fused with its product: 4 kernel calls per layer where
        # torch takes about 15 ops.
        cfg = self.config
        eps = cfg.rms_norm_eps
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        check_range(positions, "positions", 0, self.rope.cos_half.shape[0])
        self.backend.prepare(meta)
        # The residual stream stays float32 (each layer's bf16 outputs added unrounded): the
        # rounding of bf16 residual adds is the main drift from float32 results otherwise.
        hidden = F.embedding(input_ids, self.weights.embed).float()
        num_tokens = hidden.shape[0]
        delta: torch.Tensor | None = None
        rope = self.rope
        for index, (layer, (k_cache, v_cache)) in enumerate(
            zip(self.weights.layers, kv_caches, strict=True)
        ):
            check = index == 0  # every layer has the first one's shapes and dtypes
            normed = kernels.add_rms_norm(hidden, delta, layer.input_norm, eps, check)
            qkv = layer.qkv(normed, check)
            kernels.rotary(
                qkv, heads + kv_heads, cfg.head_dim, positions, rope.cos_half, rope.sin_half, check
            )
            q = qkv[:, : heads * cfg.head_dim].view(num_tokens, heads, -1)
            k = qkv[:, heads * cfg.head_dim : self._qk_size].view(num_tokens, kv_heads, -1)
            v = qkv[:, self._qk_size :].view(num_tokens, kv_heads, -1)
            out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
            attended = layer.o(out.reshape(num_tokens, -1), check)
            normed = kernels.add_rms_norm(hidden, attended, layer.post_norm, eps, check)
            delta = layer.down(kernels.silu_mul(layer.gate_up(normed, check), check), check)
        if delta is not None:
            hidden.add_(delta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given rows of forward()'s output: float32, or the
        model's bfloat16 with the CPU kernels (whose sampler reads them as they are)."""
        if self.kernels is not None:
            normed = self.kernels.add_rms_norm(
                hidden.contiguous(), None, self.weights.norm, self.config.rms_norm_eps
            )
            return self.weights.lm_head(normed)
        normed = self._rms_norm(hidden, self.weights.norm)
        return self.weights.lm_head(normed).float()

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
        qkv = layer.qkv(self._rms_norm(hidden, layer.input_norm))
        # q and k heads rotate together in one pass.
        qk = qkv[:, : self._qk_size].view(num_tokens, cfg.num_heads + cfg.num_kv_heads, -1)
        qk = apply_rotary(qk, cos, sin)
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        v = qkv[:, self._qk_size :].view(num_tokens, cfg.num_kv_heads, -1)
        out = self.backend.forward(q, k, v, k_cache, v_cache, meta, self.scale)
        return layer.o(out.reshape(num_tokens, -1))

    def _mlp(self, layer: LayerWeights, hidden: torch.Tensor) -> torch.Tensor:
        normed = self._rms_norm(hidden, layer.post_norm)
        gate_up = layer.gate_up(normed)
        gate, up = gate_up.chunk(2, dim=-1)
        return layer.down(F.silu(gate).mul_(up))

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # One fused op; bit-identical to HF's formula in float32, and in bfloat16 it scales by
        # the weight before the final rounding (HF rounds first), a difference of one ulp.
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.config.rms_norm_eps)

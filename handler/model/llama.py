"""The engine's model: the generic decoder (decoder.py) for every family, plus the fused CPU
kernel path for the plain Llama layout (Llama 2/3, SmolLM, Mistral without a window, Qwen2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.kernels.cpu import CpuKernels, check_range
from handler.model.config import ModelConfig
from handler.model.decoder import DecoderModel, KVCaches

__all__ = ["KVCaches", "LlamaModel"]


class LlamaModel(DecoderModel):
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
        logits for their sampler. Only for models with ModelConfig.fused_cpu_supported."""
        if kernels is not None and not config.fused_cpu_supported:
            raise ValueError(
                f"the fused CPU kernels run the plain Llama layout only, not {config.architecture}"
            )
        super().__init__(
            config, tensors, dtype, device, backend, max_positions, pack_weights, kernels
        )

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
        return super().forward(input_ids, positions, meta, kv_caches)

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
            assert layer.gate_up is not None and layer.down is not None
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
        return super().compute_logits(hidden)

"""The engine's model: the generic decoder (decoder.py) for every family, plus the fused CPU
kernel path for the dense families (ModelConfig.fused_cpu_supported): Llama 2/3, SmolLM,
Mistral, Qwen2/3, Gemma 2/3, Phi-3 without LongRoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.kernels.cpu import CpuKernels, check_range
from handler.model.config import ModelConfig
from handler.model.decoder import DecoderModel, KVCaches
from handler.model.weights import LayerWeights, embed_tokens

__all__ = ["KVCaches", "LlamaModel"]


@dataclass
class _LayerNorms:
    """A layer's norm weights as the kernels take them: float32 (Gemma's 1 + weight already
    is; Llama's bf16 weights widen exactly)."""

    input: torch.Tensor
    post: torch.Tensor  # before the MLP
    q: torch.Tensor | None
    k: torch.Tensor | None
    attn_out: torch.Tensor | None  # Gemma: norms of the attention and MLP outputs
    mlp_out: torch.Tensor | None


def _f32(weight: torch.Tensor | None) -> torch.Tensor | None:
    return None if weight is None else weight.float().contiguous()


def _layer_norms(layer: LayerWeights) -> _LayerNorms:
    return _LayerNorms(
        input=layer.input_norm.float().contiguous(),
        post=layer.post_norm.float().contiguous(),
        q=_f32(layer.q_norm),
        k=_f32(layer.k_norm),
        attn_out=_f32(layer.attn_out_norm),
        mlp_out=_f32(layer.mlp_out_norm),
    )


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
        """kernels: run norms, rotary, the gated activation and (where built) the linear
        layers' matrix multiply with the fused CPU kernels (bfloat16 on the CPU);
        compute_logits then returns bfloat16 logits for their sampler. Only for models with
        ModelConfig.fused_cpu_supported."""
        if kernels is not None and not config.fused_cpu_supported:
            raise ValueError(
                f"the fused CPU kernels do not run {config.architecture} with this config "
                "(mixture of experts, partial rotary or LongRoPE)"
            )
        super().__init__(
            config, tensors, dtype, device, backend, max_positions, pack_weights, kernels
        )
        fused = kernels is not None
        self._norms = [_layer_norms(layer) for layer in self.weights.layers] if fused else []
        self._final_norm = self.weights.norm.float().contiguous() if fused else None

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
        # forward() with each residual add fused into the norm that follows it (Gemma's norm
        # of the added output too), q/k norms and rotary in place on the projection output,
        # the activation fused with its product: 4 kernel calls per layer where torch takes
        # about 15 ops (Gemma's sandwich norms, about 25).
        cfg = self.config
        eps = cfg.rms_norm_eps
        heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
        check_range(positions, "positions", 0, self.rope.cos_half.shape[0])
        layout = self.kv_layout
        metas = [meta] if layout.num_groups == 1 else meta.by_group(layout.num_groups)
        for backend, group_meta in zip(self.backends, metas, strict=True):
            backend.prepare(group_meta)
        # The residual stream stays float32 (each layer's bf16 outputs added unrounded): the
        # rounding of bf16 residual adds is the main drift from float32 results otherwise.
        hidden = embed_tokens(self.weights.embed, input_ids, self.dtype).float()
        if self._embed_scale is not None:
            hidden.mul_(float(self._embed_scale))  # the scale rounded as transformers rounds it
        num_tokens = hidden.shape[0]
        delta: torch.Tensor | None = None
        delta_norm: torch.Tensor | None = None
        for index, (layer, norms, (k_cache, v_cache)) in enumerate(
            zip(self.weights.layers, self._norms, kv_caches, strict=True)
        ):
            check = index == 0  # every layer has the first one's shapes and dtypes
            window = cfg.window_of(index)
            rope = self.rope
            if window is not None and self.local_rope is not None:
                rope = self.local_rope  # Gemma 3's sliding layers rotate with their own base
            group = layout.layer_groups[index]
            normed = kernels.add_rms_norm(hidden, delta, norms.input, eps, check, delta_norm)
            qkv = layer.qkv(normed, check)
            kernels.rotary(
                qkv,
                heads + kv_heads,
                cfg.head_dim,
                positions,
                rope.cos_half,
                rope.sin_half,
                check,
                norms.q,
                norms.k,
                heads,
                eps,
            )
            q = qkv[:, : heads * cfg.head_dim].view(num_tokens, heads, -1)
            k = qkv[:, heads * cfg.head_dim : self._qk_size].view(num_tokens, kv_heads, -1)
            v = qkv[:, self._qk_size :].view(num_tokens, kv_heads, -1)
            out = self.backends[group].forward(
                q, k, v, k_cache, v_cache, metas[group], self.scale, window, cfg.attn_softcap
            )
            attended = layer.o(out.reshape(num_tokens, -1), check)
            normed = kernels.add_rms_norm(hidden, attended, norms.post, eps, check, norms.attn_out)
            assert layer.gate_up is not None and layer.down is not None
            activated = kernels.gated_mul(layer.gate_up(normed, check), cfg.activation, check)
            delta, delta_norm = layer.down(activated, check), norms.mlp_out
        if delta is not None:
            if delta_norm is not None:
                delta = F.rms_norm(delta.float(), (delta.shape[-1],), delta_norm, eps=eps)
            hidden.add_(delta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the given rows of forward()'s output: float32, or the
        model's bfloat16 with the CPU kernels (whose sampler reads them as they are)."""
        if self.kernels is not None:
            assert self._final_norm is not None
            normed = self.kernels.add_rms_norm(
                hidden.contiguous(), None, self._final_norm, self.config.rms_norm_eps
            )
            logits = self.weights.lm_head(normed)
            cap = self.config.final_softcap
            if cap is not None:
                # In float32, rounded once, like the kernels' other outputs.
                logits = (torch.tanh(logits.float() / cap) * cap).to(logits.dtype)
            return logits
        return super().compute_logits(hidden)

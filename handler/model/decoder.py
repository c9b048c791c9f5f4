"""The decoder-only forward pass of every family, in plain torch ops over weight tensors.

One layer loop driven by ModelConfig (derived from the family's spec): norms (Llama's or
Gemma's 1 + weight), optional per-head q/k norms, rotary per layer kind (Gemma 3's sliding
layers have their own base), per-layer attention windows and soft-capping handed to the
attention backend, Gemma's norms around attention and MLP outputs, dense or mixture-of-experts
MLPs, scaled embeddings and a soft-capped LM head.

Plain functions over weight tensors rather than nn.Modules: the step loop is Python-bound on
small batches, and every avoided module call and reshape counts.
"""

from __future__ import annotations

import torch

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.kernels.cpu import CpuKernels
from handler.model.config import ModelConfig
from handler.model.kv_layout import KVLayout
from handler.model.moe import activate, moe_mlp
from handler.model.norms import apply_norm
from handler.model.rope import RotaryEmbedding, apply_rotary
from handler.model.weights import LayerWeights, embed_tokens, load_weights

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
RopeRows = tuple[torch.Tensor, torch.Tensor]


class DecoderModel:
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
        self.config = config
        self.dtype = dtype
        self.device = device
        self.backend = backend
        # Which layers share block tables (the engine sizes and allocates the KV cache by it);
        # a group's attention reads its own tables through its own backend instance.
        self.kv_layout = KVLayout.of(config, max_positions)
        self.backends = [backend] + [backend.fresh() for _ in range(self.kv_layout.num_groups - 1)]
        self.weights = load_weights(config, tensors, dtype, device, pack_weights, kernels)
        self.rope = RotaryEmbedding(config.rope, config.head_dim, max_positions, dtype, device)
        self.local_rope = (
            RotaryEmbedding(config.local_rope, config.head_dim, max_positions, dtype, device)
            if config.local_rope is not None
            else None
        )
        self.scale = config.scale
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self._qk_size = q_size + kv_size
        self.kernels = kernels
        # Rounded to the model's dtype first, as transformers' scaled embedding does.
        self._embed_scale = (
            None
            if config.embed_scale is None
            else torch.tensor(config.embed_scale, dtype=dtype, device=device)
        )

    @property
    def supports_cuda_graphs(self) -> bool:
        """A decode step can be captured: the expert loop reads per-expert token counts on the
        host, so mixture-of-experts models run eagerly."""
        return self.config.moe is None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: KVCaches,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] before the final norm, in the model's dtype;
        writes this step's KV."""
        cfg = self.config
        layout = self.kv_layout
        metas = [meta] if layout.num_groups == 1 else meta.by_group(layout.num_groups)
        for backend, group_meta in zip(self.backends, metas, strict=True):
            backend.prepare(group_meta)
        spans = _sequence_spans(meta) if self.rope.has_long else []
        rope = self.rope.lookup(self.rope.rows(positions, spans))
        local = rope
        if self.local_rope is not None:
            local = self.local_rope.lookup(self.local_rope.rows(positions, spans))
        hidden = embed_tokens(self.weights.embed, input_ids, self.dtype)
        if self._embed_scale is not None:
            hidden = hidden * self._embed_scale
        # The residual stream is this step's own tensor (embedding output): adding in place
        # saves an allocation per add, with bit-identical results.
        for index, (layer, (k_cache, v_cache)) in enumerate(
            zip(self.weights.layers, kv_caches, strict=True)
        ):
            window = cfg.window_of(index)
            cos_sin = local if window is not None else rope
            group = layout.layer_groups[index]
            attended = self._attention(
                layer, hidden, cos_sin, metas[group], k_cache, v_cache, window, group
            )
            if layer.attn_out_norm is not None:
                attended = self._norm(attended, layer.attn_out_norm)
            hidden.add_(attended)
            out = self._mlp(layer, self._norm(hidden, layer.post_norm))
            if layer.mlp_out_norm is not None:
                out = self._norm(out, layer.mlp_out_norm)
            hidden.add_(out)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [rows, vocab] for the given rows of forward()'s output."""
        normed = self._norm(hidden, self.weights.norm)
        logits = self.weights.lm_head(normed)
        cap = self.config.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _attention(
        self,
        layer: LayerWeights,
        hidden: torch.Tensor,
        cos_sin: RopeRows,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        window: int | None,
        group: int,
    ) -> torch.Tensor:
        cfg = self.config
        num_tokens = hidden.shape[0]
        cos, sin = cos_sin
        qkv = layer.qkv(self._norm(hidden, layer.input_norm))
        v = qkv[:, self._qk_size :].view(num_tokens, cfg.num_kv_heads, -1)
        if layer.q_norm is None or layer.k_norm is None:
            # q and k heads rotate together in one pass.
            qk = qkv[:, : self._qk_size].view(num_tokens, cfg.num_heads + cfg.num_kv_heads, -1)
            q, k = apply_rotary(qk, cos, sin).split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        else:
            q_size = cfg.num_heads * cfg.head_dim
            q = qkv[:, :q_size].view(num_tokens, cfg.num_heads, -1)
            k = qkv[:, q_size : self._qk_size].view(num_tokens, cfg.num_kv_heads, -1)
            q = apply_rotary(self._norm(q, layer.q_norm), cos, sin)
            k = apply_rotary(self._norm(k, layer.k_norm), cos, sin)
        out = self.backends[group].forward(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta,
            self.scale,
            sliding_window=window,
            logit_softcap=cfg.attn_softcap,
        )
        return layer.o(out.reshape(num_tokens, -1))

    def _mlp(self, layer: LayerWeights, normed: torch.Tensor) -> torch.Tensor:
        if layer.experts is not None:
            assert self.config.moe is not None
            return moe_mlp(normed, layer.experts, self.config.moe, self.config.activation)
        assert layer.gate_up is not None and layer.down is not None
        gate, up = layer.gate_up(normed).chunk(2, dim=-1)
        return layer.down(activate(gate, self.config.activation).mul_(up))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return apply_norm(x, weight, self.config.rms_norm_eps, self.config.norm_plus_one)


def _sequence_spans(meta: AttentionMetadata) -> list[tuple[int, int, int]]:
    """(start, end, sequence length) of each sequence's tokens in the step."""
    starts = meta.query_start_loc_host
    lengths = meta.seq_lens_host or meta.context_lens_host
    return [(starts[i], starts[i + 1], lengths[i]) for i in range(meta.num_seqs)]

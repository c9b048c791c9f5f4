"""flash-attn backend, used only where the `flash_attn` package is importable (it has no wheels on
PyPI, so most images lack it; the Triton backend covers them).

flash-attn reads the same paged cache layout ([num_blocks, block_size, num_kv_heads, head_dim],
int32 block tables) but only for block sizes divisible by 256. New keys/values are written with
the Triton store kernel, which skips padding slots (-1). flash-attn's causal mask is aligned to the
end of the keys when there are more keys than queries, which is exactly "the new tokens are the
last ones of the context". Sliding windows and soft-capping are flash-attn's own arguments:
window_size=(window - 1, 0) (a query sees itself and window - 1 keys before it) and softcap.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from handler.attention.base import AttentionBackend, AttentionMetadata

FLASH_BLOCK_MULTIPLE = 256


def flash_attn_available() -> bool:
    """True when flash_attn can be imported (checked without importing it)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_block_size(block_size: int) -> None:
    if block_size <= 0 or block_size % FLASH_BLOCK_MULTIPLE:
        raise ValueError(
            f"flash-attn's paged KV cache needs a block size divisible by {FLASH_BLOCK_MULTIPLE}, "
            f"got {block_size}; use the triton backend or --block-size 256"
        )


def flash_features(window: int | None, softcap: float | None) -> dict[str, object]:
    """flash-attn's arguments for a layer's window and soft-cap; only those a layer uses, so a
    plain layer calls flash-attn exactly as before (and versions without softcap still serve it)."""
    features: dict[str, object] = {}
    if window is not None:
        features["window_size"] = (window - 1, 0)
    if softcap is not None:
        features["softcap"] = float(softcap)
    return features


class FlashAttentionBackend(AttentionBackend):
    """Decode through flash_attn_with_kvcache, prefill chunks through flash_attn_varlen_func."""

    name = "flash"

    def __init__(self) -> None:
        if not flash_attn_available():
            raise RuntimeError("the flash backend needs the flash_attn package, which is missing")
        self._flash: ModuleType = importlib.import_module("flash_attn")
        # Imported here, not at module level: the Triton store kernel is only needed on a GPU.
        from handler.attention.triton_paged import store_kvcache

        self._store = store_kvcache

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        check_block_size(k_cache.shape[1])
        features = flash_features(sliding_window, logit_softcap)
        self._store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        num_decode = meta.num_decode_tokens
        if num_decode:
            decoded = self._flash.flash_attn_with_kvcache(
                q[:num_decode].unsqueeze(1),  # [B, 1, Hq, D]
                k_cache,
                v_cache,
                cache_seqlens=meta.context_lens[:num_decode],
                block_table=meta.block_tables[:num_decode],
                softmax_scale=scale,
                causal=True,
                **features,
            )
            out[:num_decode] = decoded.squeeze(1)
        if meta.num_prefill_tokens:
            context_lens = meta.context_lens[num_decode:]
            cu_seqlens_k = torch.zeros(
                context_lens.shape[0] + 1, dtype=torch.int32, device=context_lens.device
            )
            torch.cumsum(context_lens, 0, out=cu_seqlens_k[1:])
            out[num_decode:] = self._flash.flash_attn_varlen_func(
                q[num_decode:],
                k_cache,
                v_cache,
                cu_seqlens_q=meta.query_start_loc[num_decode:] - num_decode,
                cu_seqlens_k=cu_seqlens_k,
                max_seqlen_q=meta.max_query_len,
                max_seqlen_k=meta.max_context_len,
                softmax_scale=scale,
                causal=True,
                block_table=meta.block_tables[num_decode:],
                **features,
            )
        return out

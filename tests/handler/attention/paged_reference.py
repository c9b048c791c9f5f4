"""Plain torch versions of the paged-KV operations: the oracle the Triton kernels must match.

Slow on purpose: one sequence at a time, gathering its context through the block table and doing
the arithmetic in float64 unless told otherwise, so that a mismatch points at the kernel. The
layouts are those of handler/attention/base.py: caches [num_blocks, block_size, num_kv_heads,
head_dim], block tables int32 [batch, max_blocks_per_seq], slot = block * block_size + offset,
slot -1 = padding.
"""

from __future__ import annotations

import torch


def store_kvcache_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key[t] / value[t] ([T, Hkv, D]) into slot slot_mapping[t]; slots < 0 write nowhere."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep].to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence's cache, in order: [length, Hkv, D]."""
    block_size = cache.shape[1]
    positions = torch.arange(length, device=cache.device)
    blocks = block_table.long()[positions // block_size]
    return cache[blocks, positions % block_size]


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float64,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (the last ones of its context) over its
    whole cached context. q: [T, Hq, D]; returns [T, Hq, D] in q's dtype. window: a query at
    position p sees keys p - window + 1 .. p only; softcap: scores -> tanh(scores / cap) * cap
    before the mask (transformers' order)."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k_cache.shape[2]
    starts = cu_seqlens_q.tolist()
    for seq, context_len in enumerate(context_lens.tolist()):
        q_start, q_end = starts[seq], starts[seq + 1]
        q_len = q_end - q_start
        if q_len == 0 or context_len == 0:
            continue
        keys = gather_context(k_cache, block_tables[seq], context_len).to(compute_dtype)
        values = gather_context(v_cache, block_tables[seq], context_len).to(compute_dtype)
        keys = keys.repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        values = values.repeat_interleave(group, dim=1)
        queries = q[q_start:q_end].to(compute_dtype)  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        key_pos = torch.arange(context_len, device=q.device)
        visible = key_pos[None, :] <= query_pos[:, None]
        if window is not None:
            visible &= key_pos[None, :] > query_pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    compute_dtype: torch.dtype = torch.float64,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query token per sequence (the last of its context). q: [B, Hq, D] -> [B, Hq, D]."""
    batch = q.shape[0]
    cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_reference(
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        context_lens,
        scale,
        compute_dtype,
        window,
        softcap,
    )

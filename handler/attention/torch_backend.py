"""Reference attention backend in plain torch: runs on CPU and GPU.

Decodes are batched: their keys/values are gathered from the paged cache, whole blocks at a
time, into one padded tensor and attended with two batched matmuls, the GQA group folded into
the query rows so K/V are never repeated. Prefill chunks are attended with SDPA, one sequence
at a time, except that fresh prompts of equal length side by side go in one batched call; a
chunk with no earlier context uses its fresh K/V directly instead of reading them back from the
cache.
Padding slots (-1) are not supported here; padded batches need a backend that skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from handler.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class PrefillPlan:
    start: int
    end: int
    kv_slots: torch.Tensor | None  # [context_len] when earlier context is in the cache
    mask: torch.Tensor | None  # [query_len, context_len] bool, True = may attend
    # Fresh prompts (no earlier context) of one length side by side in the step are attended
    # in one batched call: tokens start:end hold `count` of them.
    count: int = 1


@dataclass
class _DecodePlan:
    blocks: torch.Tensor  # [num_decodes * blocks_per_seq] cache blocks, in context order
    mask: torch.Tensor  # [num_decodes, 1, 1, blocks_per_seq * block_size] bool
    context_width: int  # blocks_per_seq * block_size
    # -inf past each context, [num_decodes * kv_heads, group, width]; built by the first layer.
    bias: torch.Tensor | None = None


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._decode: _DecodePlan | None = None
        self._prefills: list[PrefillPlan] = []

    def prepare(self, meta: AttentionMetadata) -> None:
        # Indices and masks depend only on the step, not the layer: build them once.
        self._decode = _plan_decodes(meta) if meta.num_decode_tokens else None
        self._prefills = plan_prefills(meta)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)

        if not self._prefills and self._decode is not None:
            return _attend_decodes(q, k_cache, v_cache, self._decode, scale)
        out = torch.empty_like(q)
        if self._decode is not None:
            nd = meta.num_decode_tokens
            out[:nd] = _attend_decodes(q[:nd], k_cache, v_cache, self._decode, scale)
        for plan in self._prefills:
            out[plan.start : plan.end] = attend_prefill(q, k, v, k_flat, v_flat, plan, scale)
        return out


def _plan_decodes(meta: AttentionMetadata) -> _DecodePlan:
    # Whole blocks are gathered (contiguous copies, far cheaper than slot by slot); the slots
    # past each context length are masked out.
    nd = meta.num_decode_tokens
    num_blocks = -(-max(meta.context_lens_host[:nd]) // meta.block_size)
    blocks = meta.block_tables[:nd, :num_blocks].reshape(-1).to(torch.int64)
    width = num_blocks * meta.block_size
    positions = torch.arange(width, device=blocks.device)
    mask = positions.unsqueeze(0) < meta.context_lens[:nd].unsqueeze(1)
    return _DecodePlan(blocks=blocks, mask=mask.view(nd, 1, 1, width), context_width=width)


def plan_prefills(meta: AttentionMetadata) -> list[PrefillPlan]:
    plans = []
    starts = meta.query_start_loc_host
    bs = meta.block_size
    for i in range(meta.num_decode_tokens, meta.num_seqs):
        start, end = starts[i], starts[i + 1]
        query_len, context_len = end - start, meta.context_lens_host[i]
        if context_len == query_len:
            last = plans[-1] if plans else None
            if (
                last is not None
                and last.kv_slots is None
                and last.end == start
                and (last.end - last.start) == last.count * query_len
            ):
                last.end, last.count = end, last.count + 1
            else:
                plans.append(PrefillPlan(start, end, None, None))
            continue
        device = meta.block_tables.device
        positions = torch.arange(context_len, device=device)
        blocks = meta.block_tables[i, positions // bs].to(torch.int64)
        slots = blocks * bs + positions % bs
        query_pos = torch.arange(context_len - query_len, context_len, device=device)
        mask = positions.unsqueeze(0) <= query_pos.unsqueeze(1)
        plans.append(PrefillPlan(start, end, slots, mask))
    return plans


def _attend_decodes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: _DecodePlan, scale: float
) -> torch.Tensor:
    # Batched matmuls rather than SDPA: with one query row per head, CPU SDPA kernels spend
    # more time on setup than on math. The GQA group is folded into the query rows, so each
    # KV head is read once and never repeated.
    nd, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    width = plan.context_width
    if plan.bias is None or plan.bias.dtype != q.dtype:
        bias = torch.zeros(plan.mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~plan.mask, float("-inf"))
        plan.bias = bias.expand(nd, num_kv_heads, group, width).reshape(-1, group, width)
    shape = (nd, width, num_kv_heads, head_dim)
    keys = k_cache.index_select(0, plan.blocks).view(shape).transpose(1, 2)
    values = v_cache.index_select(0, plan.blocks).view(shape).transpose(1, 2)
    keys = keys.reshape(-1, width, head_dim)
    values = values.reshape(-1, width, head_dim)
    grouped = q.reshape(-1, group, head_dim)
    scores = torch.baddbmm(plan.bias, grouped, keys.transpose(1, 2), alpha=scale)
    # Softmax kernels accumulate in float32 even for bfloat16 inputs: no upcast needed.
    probs = scores.softmax(dim=-1)
    return torch.bmm(probs, values).view(nd, num_heads, head_dim)


def attend_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    plan: PrefillPlan,
    scale: float,
) -> torch.Tensor:
    count = plan.count

    def batched(x: torch.Tensor) -> torch.Tensor:  # [count * n, h, d] -> [count, h, n, d]
        return x.view(count, -1, x.shape[1], x.shape[2]).transpose(1, 2)

    query = batched(q[plan.start : plan.end])
    if plan.kv_slots is None:
        keys = batched(k[plan.start : plan.end])
        values = batched(v[plan.start : plan.end])
    else:
        keys = batched(k_flat.index_select(0, plan.kv_slots))
        values = batched(v_flat.index_select(0, plan.kv_slots))
    out = F.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=plan.mask,
        is_causal=plan.mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).reshape(plan.end - plan.start, q.shape[1], q.shape[2])

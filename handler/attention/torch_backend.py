"""Reference attention backend in plain torch: runs on CPU and GPU.

Decodes are batched: their keys/values are gathered from the paged cache, whole blocks at a
time, into one padded tensor and attended with two batched matmuls, the GQA group folded into
the query rows so K/V are never repeated. Prefill chunks are attended with SDPA, one sequence
at a time, except that fresh prompts of equal length side by side go in one batched call; a
chunk with no earlier context uses its fresh K/V directly instead of reading them back from the
cache.
Padding slots (-1) are not supported here; padded batches need a backend that skips them.

This is the reference for the per-layer features (base.py): a sliding window masks keys more
than window - 1 positions before each query (decodes gather only the blocks the window reaches,
so a windowed layer's decode costs its window, not the context, and never reads the blocks a
window group released); logit soft-capping turns the scaled scores into
tanh(scores / cap) * cap before the mask, in the order transformers' eager attention uses (SDPA
has no soft-cap, so soft-capped layers attend with explicit matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # Masks of the sliding windows shorter than the context, by window, built on first use.
    window_masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def mask_for(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """The mask for a layer with this window (None: causal, from is_causal)."""
        query_len = (self.end - self.start) // self.count
        context_len = query_len if self.kv_slots is None else self.kv_slots.shape[0]
        if window is None or window >= context_len:
            return self.mask
        mask = self.window_masks.get(window)
        if mask is None:
            keys = torch.arange(context_len, device=device)
            queries = torch.arange(context_len - query_len, context_len, device=device)
            offset = queries.unsqueeze(1) - keys.unsqueeze(0)
            mask = (offset >= 0) & (offset < window)
            self.window_masks[window] = mask
        return mask


@dataclass
class _DecodePlan:
    blocks: torch.Tensor  # [num_decodes * blocks_per_seq] cache blocks, in context order
    mask: torch.Tensor  # [num_decodes, 1, 1, blocks_per_seq * block_size] bool
    context_width: int  # blocks_per_seq * block_size
    context_lens: torch.Tensor  # [num_decodes, 1]
    # -inf outside each context (or window), [num_decodes * kv_heads, group, width], by
    # (window, dtype); built by the first layer that needs it.
    biases: dict[tuple[int | None, torch.dtype], torch.Tensor] = field(default_factory=dict)
    tables: torch.Tensor | None = None  # [num_decodes, blocks_per_seq] int64
    block_size: int = 0
    # Plans over only the blocks a window reaches back to, by window (None: no fewer blocks).
    windowed: dict[int, _DecodePlan | None] = field(default_factory=dict)

    def for_window(self, window: int) -> _DecodePlan | None:
        """A plan gathering each sequence's last `window` tokens' blocks only, its mask holding
        the window; None when that is not fewer blocks than the whole context."""
        if window in self.windowed:
            return self.windowed[window]
        assert self.tables is not None
        bs, num_blocks = self.block_size, self.tables.shape[1]
        span = -(-window // bs) + 1  # a window starting anywhere in a block covers this many
        plan = None
        if span < num_blocks:
            first = (self.context_lens - window).clamp(min=0) // bs  # [nd, 1]
            columns = first + torch.arange(span, device=first.device)
            blocks = self.tables.gather(1, columns.clamp(max=num_blocks - 1)).reshape(-1)
            width = span * bs
            positions = first * bs + torch.arange(width, device=first.device)
            mask = (positions < self.context_lens) & (positions >= self.context_lens - window)
            nd = self.context_lens.shape[0]
            plan = _DecodePlan(blocks, mask.view(nd, 1, 1, width), width, self.context_lens)
        self.windowed[window] = plan
        return plan


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
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)

        window, cap = sliding_window, logit_softcap
        decode, decode_window = self._decode, window
        if decode is not None and window is not None:
            # A window shorter than the contexts: read only its blocks (the mask holds it).
            windowed = decode.for_window(window)
            if windowed is not None:
                decode, decode_window = windowed, None
        if not self._prefills and decode is not None:
            return _attend_decodes(q, k_cache, v_cache, decode, scale, decode_window, cap)
        out = torch.empty_like(q)
        if decode is not None:
            nd = meta.num_decode_tokens
            out[:nd] = _attend_decodes(q[:nd], k_cache, v_cache, decode, scale, decode_window, cap)
        for plan in self._prefills:
            out[plan.start : plan.end] = attend_prefill(
                q, k, v, k_flat, v_flat, plan, scale, window, cap
            )
        return out


def _plan_decodes(meta: AttentionMetadata) -> _DecodePlan:
    # Whole blocks are gathered (contiguous copies, far cheaper than slot by slot); the slots
    # past each context length are masked out.
    nd = meta.num_decode_tokens
    num_blocks = -(-max(meta.context_lens_host[:nd]) // meta.block_size)
    tables = meta.block_tables[:nd, :num_blocks].to(torch.int64)
    blocks = tables.reshape(-1)
    width = num_blocks * meta.block_size
    positions = torch.arange(width, device=blocks.device)
    context_lens = meta.context_lens[:nd].unsqueeze(1)
    mask = positions.unsqueeze(0) < context_lens
    return _DecodePlan(
        blocks=blocks,
        mask=mask.view(nd, 1, 1, width),
        context_width=width,
        context_lens=context_lens,
        tables=tables,
        block_size=meta.block_size,
    )


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


def _decode_bias(
    plan: _DecodePlan, window: int | None, dtype: torch.dtype, num_kv_heads: int, group: int
) -> torch.Tensor:
    bias = plan.biases.get((window, dtype))
    if bias is None:
        mask = plan.mask
        if window is not None:
            # The query is the context's last token: keys from context_len - window on.
            positions = torch.arange(plan.context_width, device=mask.device)
            first = plan.context_lens - window
            mask = mask & (positions.unsqueeze(0) >= first).view(mask.shape)
        nd, width = mask.shape[0], plan.context_width
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias = bias.masked_fill(~mask, float("-inf"))
        bias = bias.expand(nd, num_kv_heads, group, width).reshape(-1, group, width)
        plan.biases[(window, dtype)] = bias
    return bias


def _attend_decodes(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: _DecodePlan,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    # Batched matmuls rather than SDPA: with one query row per head, CPU SDPA kernels spend
    # more time on setup than on math. The GQA group is folded into the query rows, so each
    # KV head is read once and never repeated.
    nd, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    width = plan.context_width
    bias = _decode_bias(plan, window, q.dtype, num_kv_heads, group)
    shape = (nd, width, num_kv_heads, head_dim)
    keys = k_cache.index_select(0, plan.blocks).view(shape).transpose(1, 2)
    values = v_cache.index_select(0, plan.blocks).view(shape).transpose(1, 2)
    keys = keys.reshape(-1, width, head_dim)
    values = values.reshape(-1, width, head_dim)
    grouped = q.reshape(-1, group, head_dim)
    if softcap is None:
        scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=scale)
    else:
        scores = torch.bmm(grouped, keys.transpose(1, 2)) * scale
        scores = torch.tanh(scores / softcap) * softcap + bias
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
    window: int | None = None,
    softcap: float | None = None,
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
    mask = plan.mask_for(window, q.device)
    if softcap is None:
        out = F.scaled_dot_product_attention(
            query,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
    else:
        out = _attend_softcapped(query, keys, values, mask, scale, softcap)
    return out.transpose(1, 2).reshape(plan.end - plan.start, q.shape[1], q.shape[2])


def _attend_softcapped(
    query: torch.Tensor,  # [batch, heads, queries, head_dim]
    keys: torch.Tensor,  # [batch, kv_heads, keys, head_dim]
    values: torch.Tensor,
    mask: torch.Tensor | None,  # [queries, keys] bool, True = may attend; None: causal
    scale: float,
    softcap: float,
) -> torch.Tensor:
    group = query.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        n = query.shape[2]
        mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, values)

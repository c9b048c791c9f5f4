"""Triton kernels for the paged KV cache: store new keys/values, decode and prefill attention.

Layouts (handler/attention/base.py): per layer k_cache / v_cache [num_blocks, block_size,
num_kv_heads, head_dim], contiguous; block tables int32 [batch, max_blocks_per_seq]; a slot is
block * block_size + offset and slot -1 marks a padding token that writes nowhere.

The kernels gather keys token by token through the block table, so the key tile (BLOCK_N) is
independent of the cache's block size. Softmax is the online (flash) form in float32 with exp2.
Slot and block ids are not range-checked on the device (that would need a host sync per call);
the shapes, dtypes and devices are checked here.

Per layer a sliding window (a query at position p sees keys p - window + 1 .. p) and logit
soft-capping (scores -> tanh(scores / cap) * cap before the mask) are compile-time switches
(HAS_WINDOW, HAS_SOFTCAP) with their values as arguments: with a window the key loop starts at
the first tile the window reaches, so a windowed layer reads only its window's keys (the
blocks before it may have been released: their table entries are never read unmasked).

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on the CPU,
which is how CI tests them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from handler.attention.base import AttentionBackend, AttentionMetadata

# tl.dot needs every tile dimension to be at least 16.
MIN_DOT_DIM = 16
# Warps and pipeline stages of both attention kernels. test_triton_paged.py compiles them for
# sm_90 on the CPU and checks that they do not spill with these.
ATTENTION_LAUNCH = {"num_warps": 4, "num_stages": 2}
LOG2_E = 1.4426950408889634


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # The interpreter multiplies bfloat16 tiles as their raw uint16 bits, so under it the operands
    # are widened first (UPCAST); compiled kernels keep half-precision tensor-core products.
    if UPCAST:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=DOT_PRECISION)
    return product


@triton.jit
def _store_kvcache_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    key_stride_t,
    value_stride_t,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding
        return
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW  # all true, and compiled away, when the row is a power of two
    k = tl.load(key_ptr + token * key_stride_t + offs, mask=mask)
    v = tl.load(value_ptr + token * value_stride_t + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, k, mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, v, mask=mask)


@triton.jit
def _attend_paged(
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_row,
    kv_head,
    context_len,
    kv_start,
    kv_end,
    query_pos,
    scale_log2,
    window,
    softcap_log2,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Online softmax of q's rows ([ROWS, BLOCK_D]) over keys kv_start .. kv_end of one sequence's
    # kv head, read token by token through its block table row; with CAUSAL, row r sees keys up
    # to query_pos[r] (without, the context's last token is the query); with HAS_WINDOW, only
    # the last `window` of those.
    ROWS: tl.constexpr = q.shape[0]
    BLOCK_D: tl.constexpr = q.shape[1]
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    # A finite floor instead of -inf keeps exp2(m - m_new) defined when a tile is all masked.
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(kv_start, kv_end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < context_len
        block = tl.load(table_row + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + n % BLOCK_SIZE
        kv_offs = (slot[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), UPCAST_DOT, DOT_PRECISION) * scale_log2
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (e^2x + 1), in the log2 units the softmax works in; |x| > 15 is
            # +-1 in float32 already, and the clamp keeps e^2x finite.
            x = tl.minimum(tl.maximum(qk / softcap_log2, -15.0), 15.0)
            qk = (1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)) * softcap_log2
        if CAUSAL:
            visible = (n[None, :] <= query_pos[:, None]) & n_mask[None, :]
            if HAS_WINDOW:
                visible = visible & (n[None, :] > query_pos[:, None] - window)
        else:
            visible = n_mask[None, :]
            if HAS_WINDOW:
                visible = visible & (n[None, :] >= context_len - window)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    # A row that saw no key (an empty context: a padded CUDA-graph row) yields zeros, not 0/0.
    return tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_table,
    scale_log2,
    window,
    softcap_log2,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program per (sequence, kv head): the GQA group's query heads share each key tile.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_offs = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(context_len - window, 0) // BLOCK_N * BLOCK_N
    out = _attend_paged(
        q,
        k_cache_ptr,
        v_cache_ptr,
        table_row,
        kv_head,
        context_len,
        kv_start,
        context_len,
        None,
        scale_log2,
        window,
        softcap_log2,
        False,
        HAS_WINDOW,
        HAS_SOFTCAP,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        DOT_PRECISION,
        UPCAST_DOT,
    )
    o_offs = seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask)


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    scale_log2,
    window,
    softcap_log2,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    GROUP: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program per (tile of BLOCK_M new tokens, sequence, query head).
    m_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len

    m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_mask = m < q_len
    d_mask = d < HEAD_DIM
    rows = (q_start + m).to(tl.int64)
    q_offs = rows[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table
    # Causality: this tile's last query sees keys up to prefix_len + its index; nothing beyond.
    # A tile past the sequence's new tokens gets an empty loop and stores nothing.
    kv_end = tl.minimum(context_len, prefix_len + (m_tile + 1) * BLOCK_M)
    kv_end = tl.where(m_tile * BLOCK_M < q_len, kv_end, 0)
    kv_start = 0
    if HAS_WINDOW:
        # The tile's first query sees keys from its position - window + 1 on.
        first = prefix_len + m_tile * BLOCK_M - window + 1
        kv_start = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
    out = _attend_paged(
        q,
        k_cache_ptr,
        v_cache_ptr,
        table_row,
        kv_head,
        context_len,
        kv_start,
        kv_end,
        prefix_len + m,
        scale_log2,
        window,
        softcap_log2,
        True,
        HAS_WINDOW,
        HAS_SOFTCAP,
        NUM_KV_HEADS,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        DOT_PRECISION,
        UPCAST_DOT,
    )
    o_offs = rows[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 caches get exact float32 products (the CPU-equality tests run in float32). For half
    # types "tf32" is tl.dot's own default and means nothing: their products are native.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(
            "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_int_vector(name: str, t: torch.Tensor, length: int) -> None:
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}], got {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_queries(q: torch.Tensor, k_cache: torch.Tensor, what: str) -> int:
    """Validate q against the cache and return the GQA group size (query heads per kv head)."""
    if q.dim() != 3:
        raise ValueError(f"q must be {what}, got shape {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")
    if q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {k_cache.shape[3]}")
    if q.stride(2) != 1:
        raise ValueError("q's head_dim must be contiguous")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    return num_heads // num_kv_heads


def _tile(name: str, value: int) -> int:
    if value < MIN_DOT_DIM or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT_DIM}, got {value}")
    return value


def _check_features(window: int | None, softcap: float | None) -> None:
    if window is not None and (isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive number of tokens, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap!r}")


def _check_block_tables(block_tables: torch.Tensor, batch: int) -> None:
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be [{batch}, max_blocks_per_seq], got {tuple(block_tables.shape)}"
        )
    if block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be int32, got {block_tables.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")


def _launch_attention(
    kernel: triton.JITFunction,
    grid: tuple[int, ...],
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: tuple[torch.Tensor, ...],
    out: torch.Tensor,
    scale: float,
    group: int,
    block_n: int,
    window: int | None,
    softcap: float | None,
    **row_tile: int,
) -> None:
    """Launch a paged attention kernel on checked arguments. The decode and prefill kernels take
    the same arguments but for their per-sequence lengths (seq_lens) and their query-row tile."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    kernel[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        *seq_lens,
        out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        scale * LOG2_E,
        window or 0,
        (softcap or 1.0) * LOG2_E,
        HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None,
        GROUP=group,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_D=max(MIN_DOT_DIM, triton.next_power_of_2(head_dim)),
        BLOCK_N=_tile("block_n", block_n),
        DOT_PRECISION=_dot_precision(q.dtype),
        UPCAST_DOT=_interpreting(),
        **row_tile,
        **ATTENTION_LAUNCH,
    )


def store_kvcache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's key/value ([T, Hkv, D]) into its cache slot; slot -1 writes nowhere.

    key and value may be views with a token stride (e.g. slices of a fused qkv projection) as long
    as each token's [Hkv, D] row is contiguous. Their dtype must equal the cache's.
    """
    _check_cache(k_cache, v_cache)
    if key.dim() != 3 or key.shape != value.shape:
        raise ValueError(
            f"key and value must both be [T, Hkv, D], got {tuple(key.shape)} and "
            f"{tuple(value.shape)}"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key heads/dim {tuple(key.shape[1:])} != cache heads/dim {tuple(k_cache.shape[2:])}"
        )
    if key.dtype != k_cache.dtype or value.dtype != k_cache.dtype:
        raise ValueError(
            f"key/value dtypes {key.dtype}/{value.dtype} must equal the cache's {k_cache.dtype}"
        )
    row = key.shape[1] * key.shape[2]
    for name, t in (("key", key), ("value", value)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"each token's [Hkv, D] row of {name} must be contiguous")
    _check_int_vector("slot_mapping", slot_mapping, key.shape[0])
    _check_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    if key.shape[0] == 0:
        return
    _store_kvcache_kernel[(key.shape[0],)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        value.stride(0),
        ROW=row,
        BLOCK=triton.next_power_of_2(row),
    )


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_n: int = 64,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its whole cached context (its last
    `window` tokens with a window; scores soft-capped at `softcap`).

    q: [B, Hq, D]; block_tables: int32 [B, max_blocks]; context_lens: int32 [B], the number of
    cached tokens including this step's (already stored). Returns [B, Hq, D] in q's dtype; a row
    with context length 0 (a padded CUDA-graph row) comes back as zeros.
    """
    _check_features(window, softcap)
    _check_cache(k_cache, v_cache)
    group = _check_queries(q, k_cache, "[batch, num_heads, head_dim]")
    batch = q.shape[0]
    _check_block_tables(block_tables, batch)
    _check_int_vector("context_lens", context_lens, batch)
    _check_same_device(q=q, k_cache=k_cache, block_tables=block_tables, context_lens=context_lens)
    num_kv_heads = k_cache.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out
    _launch_attention(
        _paged_decode_kernel,
        (batch, num_kv_heads),
        q,
        k_cache,
        v_cache,
        block_tables,
        (context_lens,),
        out,
        scale,
        group,
        block_n,
        window,
        softcap,
        BLOCK_G=max(MIN_DOT_DIM, triton.next_power_of_2(group)),
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over all of its cached tokens.

    q: [T, Hq, D], the new tokens of B sequences laid end to end; sequence i owns rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1] and they are the last tokens of its context_lens[i] cached
    tokens (prefix blocks already cached plus the new ones, stored before this call). New token j of
    a sequence with q_len new tokens sees keys 0 .. context_len - q_len + j. max_seqlen_q (the
    longest q_len) sizes the grid; it is read from cu_seqlens_q when not given, which syncs.
    With a window, token j sees only the last `window` of those keys; softcap soft-caps scores.
    """
    _check_features(window, softcap)
    _check_cache(k_cache, v_cache)
    group = _check_queries(q, k_cache, "[num_tokens, num_heads, head_dim]")
    if context_lens.dim() != 1:
        raise ValueError(f"context_lens must be [batch], got shape {tuple(context_lens.shape)}")
    batch = context_lens.shape[0]
    _check_int_vector("context_lens", context_lens, batch)
    _check_int_vector("cu_seqlens_q", cu_seqlens_q, batch + 1)
    _check_block_tables(block_tables, batch)
    _check_same_device(
        q=q,
        k_cache=k_cache,
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        context_lens=context_lens,
    )
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or max_seqlen_q <= 0 or q.shape[0] == 0:
        return out
    block_m = _tile("block_m", block_m)
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, q.shape[1])
    _launch_attention(
        _paged_prefill_kernel,
        grid,
        q,
        k_cache,
        v_cache,
        block_tables,
        (cu_seqlens_q, context_lens),
        out,
        scale,
        group,
        block_n,
        window,
        softcap,
        BLOCK_M=block_m,
    )
    return out


class TritonPagedBackend(AttentionBackend):
    """The attention backend for CUDA devices built on the kernels above.

    Decodes (which come first in a step) go through the decode kernel, prefill chunks through the
    prefill kernel. Only device tensors and the metadata's Python ints are used, so a decode step
    through this backend can be captured in a CUDA graph.
    """

    name = "triton"

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
        store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        num_decode = meta.num_decode_tokens
        features = {"window": sliding_window, "softcap": logit_softcap}
        if meta.num_prefill_tokens == 0:
            return paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, **features
            )
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if num_decode:
            out[:num_decode] = paged_decode_attention(
                q[:num_decode],
                k_cache,
                v_cache,
                meta.block_tables[:num_decode],
                meta.context_lens[:num_decode],
                scale,
                **features,
            )
        # Decode sequences own one query token each, so prefill sequences start at num_decode.
        cu_seqlens_q = meta.query_start_loc[num_decode:] - num_decode
        out[num_decode:] = paged_prefill_attention(
            q[num_decode:],
            k_cache,
            v_cache,
            meta.block_tables[num_decode:],
            cu_seqlens_q,
            meta.context_lens[num_decode:],
            scale,
            max_seqlen_q=meta.max_query_len,
            **features,
        )
        return out

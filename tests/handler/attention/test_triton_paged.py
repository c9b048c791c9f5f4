"""The Triton paged-attention kernels against the torch reference, on random inputs of many shapes.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1 is set while the
kernel module is imported, then restored so the rest of the session is unaffected); with CUDA they
run compiled on the GPU (scripts/gpu_check.sh). flash-attn is tested only where it is importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from handler.attention.base import AttentionMetadata
from tests.handler.attention import paged_reference as ref
from tests.support.triton_interpreter import fresh_process_test, import_kernels

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


tp = import_kernels("handler.attention.triton_paged")
in_process = pytest.mark.skipif(
    tp is None,
    reason="triton was imported without TRITON_INTERPRET earlier in this session; "
    "test_kernels_in_a_fresh_interpreter_process runs these tests instead",
)

if tp is None:
    test_kernels_in_a_fresh_interpreter_process = fresh_process_test(__file__, "-k", "not flash")


# Relative error bounds by dtype (‖out - ref‖ / ‖ref‖ against a float64 reference).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def rel_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in the kernel output"
    diff = (out.double() - expected.double()).norm()
    return float(diff / expected.double().norm().clamp_min(1e-12))


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k.to(DEVICE), v.to(DEVICE)


def random_block_tables(context_lens, block_size, num_blocks, gen):
    """Disjoint, shuffled blocks per sequence; unused table entries are 0 (as the engine pads)."""
    needed = [-(-n // block_size) for n in context_lens]
    width = max(max(needed), 1)
    assert sum(needed) <= num_blocks
    order = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(context_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        table[i, :n] = order[used : used + n]
        used += n
    return table.to(DEVICE)


@in_process
def test_kernels_run_on_the_expected_path():
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [tp._store_kvcache_kernel, tp._paged_decode_kernel, tp._paged_prefill_kernel]
    interpreted = [isinstance(k, InterpretedFunction) for k in kernels]
    assert interpreted == [not ON_CUDA] * 3


@in_process
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_matches_reference(block_size, num_kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(block_size * 1000 + num_kv_heads * 10 + head_dim)
    num_blocks, num_tokens = 6, 23
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[:5]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    # Keys and values as strided slices of one fused projection, the way the model produces them.
    fused = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    key, value = fused[:, 1], fused[:, 2]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ref.store_kvcache_reference(key, value, expected_k, expected_v, slots)
    tp.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


@in_process
def test_store_kvcache_padding_writes_nowhere():
    k_cache = torch.full((2, 16, 1, 64), 7.0, device=DEVICE)
    v_cache = k_cache.clone()
    key = torch.randn(4, 1, 64, device=DEVICE)
    slots = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    tp.store_kvcache(key, key, k_cache, v_cache, slots)
    assert bool((k_cache == 7.0).all()) and bool((v_cache == 7.0).all())


DECODE_CASES = [
    # block_size, head_dim, group (Hq / Hkv), num_kv_heads, context lengths
    (16, 64, 1, 2, [1, 17, 40]),
    (16, 128, 3, 1, [16, 5, 33]),
    (32, 64, 4, 2, [31, 64, 65]),
    (32, 128, 1, 1, [100]),
    (16, 64, 3, 3, [2, 48, 47, 9]),
]


@in_process
@pytest.mark.parametrize("block_size,head_dim,group,num_kv_heads,lens", DECODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(block_size, head_dim, group, num_kv_heads, lens, dtype):
    gen = torch.Generator().manual_seed(hash((block_size, head_dim, group, len(lens))) % 2**31)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(lens, block_size, num_blocks, gen)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = tp.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, scale, block_n=32)
    expected = ref.paged_decode_attention_reference(
        q, k_cache, v_cache, tables, context_lens, scale
    )
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_error(out, expected) < TOLERANCE[dtype]


@in_process
def test_decode_empty_context_gives_zeros():
    """A padded CUDA-graph row (context length 0) must not produce NaN."""
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = random_cache(4, 16, 1, 64, torch.float32, gen)
    tables = torch.tensor([[2, 0], [0, 0]], dtype=torch.int32, device=DEVICE)
    context_lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 2, 64, generator=gen).to(DEVICE)
    tables[0, 1] = 1
    out = tp.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125)
    expected = ref.paged_decode_attention_reference(
        q, k_cache, v_cache, tables, context_lens, 0.125
    )
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel_error(out[0], expected[0]) < TOLERANCE[torch.float32]


PREFILL_CASES = [
    # block_size, head_dim, group, num_kv_heads, per sequence (cached prefix, new tokens)
    (16, 64, 1, 2, [(0, 7), (0, 33)]),
    (16, 128, 3, 1, [(16, 10), (5, 1), (0, 20)]),
    (32, 64, 4, 1, [(40, 25), (0, 0), (31, 2)]),
    (32, 128, 1, 2, [(0, 70)]),
    (16, 64, 3, 2, [(1, 16), (47, 17), (0, 1)]),
]


@in_process
@pytest.mark.parametrize("block_size,head_dim,group,num_kv_heads,seqs", PREFILL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(block_size, head_dim, group, num_kv_heads, seqs, dtype):
    gen = torch.Generator().manual_seed(hash((block_size, head_dim, group, len(seqs))) % 2**31)
    lens = [prefix + new for prefix, new in seqs]
    num_blocks = sum(-(-n // block_size) for n in lens) + 2
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(lens, block_size, num_blocks, gen)
    new_counts = [new for _, new in seqs]
    cu = torch.tensor([0] + new_counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(new_counts), group * num_kv_heads, head_dim, generator=gen)
    q = q.to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, tables, cu, context_lens, scale, block_m=16, block_n=32
    )
    expected = ref.paged_prefill_attention_reference(
        q, k_cache, v_cache, tables, cu, context_lens, scale
    )
    assert out.shape == q.shape
    assert rel_error(out, expected) < TOLERANCE[dtype]


def release_before(tables, first_needed, block_size, k_cache, v_cache):
    """Point each sequence's table entries wholly before first_needed[i] at one garbage block, as
    a released window block reads (block 0 in the engine, holding someone else's keys): the
    kernels must mask them out. The garbage is large but finite, like real keys."""
    garbage = k_cache.shape[0] - 1
    k_cache[garbage] = 1.0e3
    v_cache[garbage] = -1.0e3
    for i, first in enumerate(first_needed):
        tables[i, : max(first, 0) // block_size] = garbage


WINDOW_DECODE_CASES = [
    # block_size, head_dim, group, num_kv_heads, context lengths, window, soft-cap
    (16, 64, 2, 2, [1, 17, 40, 100], 24, None),
    (16, 128, 1, 1, [33, 70], 16, 30.0),
    (32, 64, 4, 1, [65, 5], None, 20.0),
    (16, 64, 3, 2, [90, 47], 5, 2.0),
]


@in_process
@pytest.mark.parametrize(
    "block_size,head_dim,group,num_kv_heads,lens,window,softcap", WINDOW_DECODE_CASES
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_window_and_softcap_matches_reference(
    block_size, head_dim, group, num_kv_heads, lens, window, softcap, dtype
):
    gen = torch.Generator().manual_seed(hash((block_size, head_dim, group, window)) % 2**31)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(lens, block_size, num_blocks - 1, gen)
    if window is not None:
        release_before(tables, [n - window for n in lens], block_size, k_cache, v_cache)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # Large queries, so that a soft-cap bites.
    q = 3 * torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen)
    q = q.to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    features = {"window": window, "softcap": softcap}
    out = tp.paged_decode_attention(
        q, k_cache, v_cache, tables, context_lens, scale, block_n=32, **features
    )
    expected = ref.paged_decode_attention_reference(
        q, k_cache, v_cache, tables, context_lens, scale, **features
    )
    assert rel_error(out, expected) < TOLERANCE[dtype]


WINDOW_PREFILL_CASES = [
    # block_size, head_dim, group, num_kv_heads, (cached prefix, new tokens), window, soft-cap
    (16, 64, 1, 2, [(0, 40), (20, 30)], 8, None),
    (16, 128, 3, 1, [(40, 25), (5, 1)], 24, 30.0),
    (32, 64, 4, 1, [(0, 70)], None, 5.0),
    (16, 64, 2, 2, [(70, 17), (0, 33)], 33, 2.0),
]


@in_process
@pytest.mark.parametrize(
    "block_size,head_dim,group,num_kv_heads,seqs,window,softcap", WINDOW_PREFILL_CASES
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_with_window_and_softcap_matches_reference(
    block_size, head_dim, group, num_kv_heads, seqs, window, softcap, dtype
):
    gen = torch.Generator().manual_seed(hash((block_size, head_dim, group, window, 1)) % 2**31)
    lens = [prefix + new for prefix, new in seqs]
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = random_block_tables(lens, block_size, num_blocks - 1, gen)
    if window is not None:
        first = [prefix - window + 1 for prefix, _ in seqs]
        release_before(tables, first, block_size, k_cache, v_cache)
    new_counts = [new for _, new in seqs]
    cu = torch.tensor([0] + new_counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    context_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = 3 * torch.randn(sum(new_counts), group * num_kv_heads, head_dim, generator=gen)
    q = q.to(dtype).to(DEVICE)
    scale = head_dim**-0.5
    features = {"window": window, "softcap": softcap}
    out = tp.paged_prefill_attention(
        q, k_cache, v_cache, tables, cu, context_lens, scale, block_m=16, block_n=32, **features
    )
    expected = ref.paged_prefill_attention_reference(
        q, k_cache, v_cache, tables, cu, context_lens, scale, **features
    )
    assert rel_error(out, expected) < TOLERANCE[dtype]


@in_process
def test_store_then_prefill_then_decode_round_trip():
    """The engine's order: store a prompt, attend over it, then decode one more token."""
    gen = torch.Generator().manual_seed(11)
    block_size, num_kv_heads, head_dim, group = 16, 2, 64, 2
    k_cache, v_cache = random_cache(8, block_size, num_kv_heads, head_dim, torch.float32, gen)
    prompt = 21
    table = torch.tensor([[5, 2]], dtype=torch.int32, device=DEVICE)
    positions = torch.arange(prompt + 1)
    slots = table[0].cpu().long()[positions // block_size] * block_size + positions % block_size
    slots = slots.to(DEVICE)
    keys = torch.randn(prompt + 1, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    values = torch.randn(prompt + 1, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    queries = torch.randn(prompt + 1, num_kv_heads * group, head_dim, generator=gen).to(DEVICE)

    tp.store_kvcache(keys[:prompt], values[:prompt], k_cache, v_cache, slots[:prompt])
    cu = torch.tensor([0, prompt], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([prompt], dtype=torch.int32, device=DEVICE)
    prefill = tp.paged_prefill_attention(queries[:prompt], k_cache, v_cache, table, cu, lens, 0.1)
    tp.store_kvcache(keys[prompt:], values[prompt:], k_cache, v_cache, slots[prompt:])
    decode = tp.paged_decode_attention(queries[prompt:], k_cache, v_cache, table, lens + 1, 0.1)

    # Dense causal attention over the same keys/values, no paging involved.
    k = keys.repeat_interleave(group, dim=1).double()
    v = values.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", queries.double(), k) * 0.1
    causal = torch.ones(prompt + 1, prompt + 1, dtype=torch.bool, device=DEVICE).tril()
    dense = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, -torch.inf).softmax(-1), v)
    assert rel_error(prefill, dense[:prompt]) < 2e-5
    assert rel_error(decode, dense[prompt:]) < 2e-5


def _mixed_step_metadata(decode_lens, prefill_seqs, block_size, tables):
    """Metadata for a step with decodes first, then prefill chunks, as the engine builds it."""
    q_lens = [1] * len(decode_lens) + [new for _, new in prefill_seqs]
    context = decode_lens + [prefix + new for prefix, new in prefill_seqs]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    slots = []
    table_cpu = tables.cpu()
    for seq, (n_new, total) in enumerate(zip(q_lens, context, strict=True)):
        for pos in range(total - n_new, total):
            slots.append(int(table_cpu[seq, pos // block_size]) * block_size + pos % block_size)
    return AttentionMetadata(
        num_seqs=len(context),
        num_decode_tokens=len(decode_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=tables,
        context_lens=torch.tensor(context, dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        max_query_len=max(q_lens),
        max_context_len=max(context),
        block_size=block_size,
        query_start_loc_host=starts,
        context_lens_host=context,
    )


@in_process
@pytest.mark.parametrize("decode_lens,prefill_seqs", [([9, 30], [(0, 12), (20, 5)]), ([4], [])])
def test_backend_mixed_step_matches_reference(decode_lens, prefill_seqs):
    gen = torch.Generator().manual_seed(5)
    block_size, num_kv_heads, head_dim, group = 16, 2, 64, 3
    lens = decode_lens + [p + n for p, n in prefill_seqs]
    k_cache, v_cache = random_cache(12, block_size, num_kv_heads, head_dim, torch.float32, gen)
    tables = random_block_tables(lens, block_size, 12, gen)
    meta = _mixed_step_metadata(decode_lens, prefill_seqs, block_size, tables)
    tokens = meta.num_tokens
    q = torch.randn(tokens, num_kv_heads * group, head_dim, generator=gen).to(DEVICE)
    k = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    v = torch.randn(tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ref.store_kvcache_reference(k, v, expected_k, expected_v, meta.slot_mapping)
    expected = ref.paged_prefill_attention_reference(
        q, expected_k, expected_v, tables, meta.query_start_loc, meta.context_lens, 0.125
    )
    out = tp.TritonPagedBackend().forward(q, k, v, k_cache, v_cache, meta, 0.125)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
    # A windowed, soft-capped layer through the same step.
    expected = ref.paged_prefill_attention_reference(
        q,
        expected_k,
        expected_v,
        tables,
        meta.query_start_loc,
        meta.context_lens,
        0.125,
        window=7,
        softcap=0.5,
    )
    out = tp.TritonPagedBackend().forward(
        q, k, v, k_cache, v_cache, meta, 0.125, sliding_window=7, logit_softcap=0.5
    )
    assert rel_error(out, expected) < TOLERANCE[torch.float32]


@in_process
def test_bad_inputs_are_refused_with_clear_errors():
    k_cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    v_cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        tp.paged_decode_attention(
            torch.randn(2, 3, 64, device=DEVICE), k_cache, v_cache, tables, lens, 1.0
        )
    with pytest.raises(ValueError, match="int32"):
        tp.paged_decode_attention(q, k_cache, v_cache, tables.long(), lens, 1.0)
    with pytest.raises(ValueError, match="head_dim"):
        tp.paged_decode_attention(
            torch.randn(2, 4, 32, device=DEVICE), k_cache, v_cache, tables, lens, 1.0
        )
    with pytest.raises(ValueError, match="dtype"):
        tp.paged_decode_attention(q.double(), k_cache, v_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        tp.paged_prefill_attention(q, k_cache, v_cache, tables, lens, lens, 1.0)
    with pytest.raises(ValueError, match="v_cache"):
        tp.store_kvcache(
            q[:, :2],
            q[:, :2],
            k_cache,
            v_cache[:, :8],
            torch.zeros(2, dtype=torch.int64, device=DEVICE),
        )
    with pytest.raises(ValueError, match="power of two"):
        tp.paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0, block_n=48)
    with pytest.raises(ValueError, match="context_lens"):
        tp.paged_prefill_attention(q, k_cache, v_cache, tables, lens, lens[None], 1.0)
    with pytest.raises(ValueError, match="slot_mapping"):
        tp.store_kvcache(
            q[:, :2], q[:, :2], k_cache, v_cache, torch.zeros(3, dtype=torch.int64, device=DEVICE)
        )
    with pytest.raises(ValueError, match="window"):
        tp.paged_decode_attention(q, k_cache, v_cache, tables, lens, 1.0, window=0)
    with pytest.raises(ValueError, match="softcap"):
        tp.paged_prefill_attention(
            q, k_cache, v_cache, tables, lens[:1], lens[:0], 1.0, softcap=0.0
        )


HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.skipif(not (HAS_FLASH and ON_CUDA), reason="flash_attn is not installed (or no CUDA)")
@pytest.mark.parametrize("decode_lens,prefill_seqs", [([9, 300], [(0, 12), (260, 5)]), ([4], [])])
def test_flash_backend_matches_reference(decode_lens, prefill_seqs):
    from handler.attention.flash import FlashAttentionBackend

    gen = torch.Generator().manual_seed(9)
    block_size, num_kv_heads, head_dim, group = 256, 2, 64, 3
    lens = decode_lens + [p + n for p, n in prefill_seqs]
    k_cache, v_cache = random_cache(8, block_size, num_kv_heads, head_dim, torch.bfloat16, gen)
    tables = random_block_tables(lens, block_size, 8, gen)
    meta = _mixed_step_metadata(decode_lens, prefill_seqs, block_size, tables)
    shape = (meta.num_tokens, num_kv_heads, head_dim)
    q = torch.randn(meta.num_tokens, num_kv_heads * group, head_dim, generator=gen)
    q, k, v = (t.to(torch.bfloat16).to(DEVICE) for t in (q, torch.randn(shape), torch.randn(shape)))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ref.store_kvcache_reference(k, v, expected_k, expected_v, meta.slot_mapping)
    expected = ref.paged_prefill_attention_reference(
        q, expected_k, expected_v, tables, meta.query_start_loc, meta.context_lens, 0.125
    )
    out = FlashAttentionBackend().forward(q, k, v, k_cache, v_cache, meta, 0.125)
    assert rel_error(out, expected) < TOLERANCE[torch.bfloat16]


def test_flash_backend_refuses_what_it_cannot_serve():
    from handler.attention import flash

    with pytest.raises(ValueError, match="divisible by 256"):
        flash.check_block_size(16)
    flash.check_block_size(512)
    if not HAS_FLASH:
        with pytest.raises(RuntimeError, match="flash_attn"):
            flash.FlashAttentionBackend()


@in_process
def test_engine_model_through_the_decode_graph_runner_matches_eager():
    """The engine's Llama model on this backend, replayed by the graph runner (an eager stand-in
    for capture off CUDA), equals a plain eager step, padded rows included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from handler.engine.kv_cache import allocate_kv_caches
    from handler.model import LlamaModel, ModelConfig
    from warmup.cuda_graphs import (
        CudaGraphDecodeRunner,
        DecodeInputs,
        capture_cuda_graph,
        capture_eagerly,
    )

    hf = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    weights = LlamaForCausalLM(LlamaConfig(**hf)).state_dict()
    cfg = ModelConfig.from_hf_config({**hf, "architectures": ["LlamaForCausalLM"]})
    model = LlamaModel(
        cfg, weights, torch.float32, torch.device(DEVICE), tp.TritonPagedBackend(), 256
    )
    caches = allocate_kv_caches(cfg, 12, 16, torch.float32, torch.device(DEVICE))
    for k_cache, v_cache in caches:
        k_cache.normal_()
        v_cache.normal_()

    class Bound:
        def forward(self, input_ids, positions, attn_metadata):
            return model.forward(input_ids, positions, attn_metadata, caches)

    capture = capture_cuda_graph if ON_CUDA else capture_eagerly
    runner = CudaGraphDecodeRunner(
        Bound(), AttentionMetadata.for_decode_graph, 4, 4, 16, DEVICE, capture
    )
    runner.capture()
    tables = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([40, 17, 33], dtype=torch.int32, device=DEVICE)
    positions = (lens - 1).long()
    slots = tables.long().gather(1, (positions // 16)[:, None])[:, 0] * 16 + positions % 16
    step = DecodeInputs(torch.tensor([3, 4, 5], device=DEVICE), positions, slots, tables, lens)
    before = [(k.clone(), v.clone()) for k, v in caches]
    graphed = runner.run(step).clone()
    graphed_caches = [(k.clone(), v.clone()) for k, v in caches]
    for (k_cache, v_cache), (k_old, v_old) in zip(caches, before, strict=True):
        k_cache.copy_(k_old)
        v_cache.copy_(v_old)
    meta = _mixed_step_metadata([40, 17, 33], [], 16, tables)
    eager = model.forward(step.input_ids, positions, meta, caches)
    assert rel_error(graphed, eager) < 1e-5
    # Same KV written (up to GEMM rounding at another batch size), and only at the real slots.
    for (k_graph, v_graph), (k_eager, v_eager), (k_old, _) in zip(
        graphed_caches, caches, before, strict=True
    ):
        assert torch.allclose(k_graph, k_eager, atol=1e-5)
        assert torch.allclose(v_graph, v_eager, atol=1e-5)
        changed = (k_graph != k_old).any(-1).any(-1).flatten().nonzero().flatten()
        assert sorted(changed.tolist()) == sorted(slots.tolist())


@in_process
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_engine_with_windows_and_softcaps_on_triton_matches_transformers(name):
    """Gemma 2 (soft-capping, alternating windows) and Gemma 3 (5:1-style local and global
    layers, here 2:1) through the engine on this backend: per-group block tables, released
    window blocks, chunked prefill and preemption; greedy ids equal transformers' float32."""
    from handler.engine.params import SamplingParams
    from tests.support.engine_fixtures import build_tiny, random_prompts, run_staggered
    from tests.support.families import FAMILIES

    architecture, overrides = FAMILIES[name]
    tiny = build_tiny(architecture, seed=3, **overrides)
    prompts = random_prompts(3, 10, 30, seed=4)
    expected = [tiny.hf_greedy(p, 16) for p in prompts]
    engine = tiny.engine(
        attention_backend="triton",
        device=DEVICE,
        block_size=4,
        max_num_batched_tokens=7,
        num_kv_blocks=24,
    )
    assert engine.attention_backend == "triton"
    assert engine.runner.model.kv_layout.num_groups > 1
    if not ON_CUDA:
        # Decode steps replay "graphs" holding every group's block tables (an eager stand-in
        # for capture off CUDA; on CUDA the engine captured real ones).
        from warmup.cuda_graphs import capture_eagerly

        engine.runner.capture_decode_graphs(
            4, -(-engine.max_model_len // 4), [1, 2, 4], capture_eagerly
        )
    outputs = run_staggered(
        engine, prompts, SamplingParams(max_new_tokens=16, temperature=0.0), [0, 0, 2]
    )
    assert [outputs[i] for i in range(3)] == expected
    assert engine.stats().preemptions > 0
    assert engine.runner.graph_steps > 0


# Compiles the kernels for an H100/H200 (sm_90) with the ptxas and cuobjdump that the triton wheel
# ships, no GPU needed, and prints one JSON line per kernel: registers, stack (spills) and the
# instructions that matter. It runs in a fresh process: the interpreter must be off there.
SM90_REPORT = r"""
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from handler.attention import triton_paged as tp

cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
common = {"k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32"}
shapes = {"GROUP": 4, "NUM_KV_HEADS": 8, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_D": 128,
          "BLOCK_N": 64, "DOT_PRECISION": "tf32", "UPCAST_DOT": False}
attention = {"q_ptr": "*bf16", **common, "context_lens_ptr": "*i32", "out_ptr": "*bf16",
             "stride_table": "i32", "scale_log2": "fp32", "window": "i32", "softcap_log2": "fp32"}
kernels = {
    "store": (tp._store_kvcache_kernel,
              {"key_ptr": "*bf16", "value_ptr": "*bf16", "k_cache_ptr": "*bf16",
               "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64", "key_stride_t": "i32",
               "value_stride_t": "i32"}, {"ROW": 1024, "BLOCK": 1024}),
}
# Plain attention, and with a sliding window and soft-capping switched on.
for suffix, on in (("", False), ("+features", True)):
    flags = {"HAS_WINDOW": on, "HAS_SOFTCAP": on}
    kernels["decode" + suffix] = (
        tp._paged_decode_kernel,
        {**attention, "stride_qb": "i32", "stride_qh": "i32", "stride_ob": "i32",
         "stride_oh": "i32"}, {**shapes, **flags, "BLOCK_G": 16})
    kernels["prefill" + suffix] = (
        tp._paged_prefill_kernel,
        {**attention, "cu_seqlens_q_ptr": "*i32", "stride_qt": "i32", "stride_qh": "i32",
         "stride_ot": "i32", "stride_oh": "i32"}, {**shapes, **flags, "BLOCK_M": 64})
for name, (fn, signature, constants) in kernels.items():
    signature = {**signature, **{k: "constexpr" for k in constants}}
    # What a launch with torch's aligned allocations specializes: pointers and strides % 16.
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
               for a, kind in signature.items() if kind.startswith("*") or "stride" in a}
    options = {} if name == "store" else tp.ATTENTION_LAUNCH
    kernel = triton.compile(ASTSource(fn, signature, constants, aligned),
                            target=GPUTarget("cuda", 90, 32), options=options)
    path = f"{sys.argv[1]}/{name}.cubin"
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True,
                          check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    local = len(re.findall(r"\b(LDL|STL)\b", sass))
    wide = len(re.findall(r"(LDG|LDGSTS)\.E[.\w]*\.128", sass))
    print(json.dumps({"kernel": name, "regs": int(regs), "stack": int(stack),
                      "wgmma": sass.count("HGMMA"), "local": local, "wide_loads": wide}))
"""


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """The compiled path, checked without a GPU: every kernel builds for sm_90, spills nothing,
    reads the cache in 16-byte accesses, and prefill's products are wgmma."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run(
        [sys.executable, "-c", SM90_REPORT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = {r["kernel"]: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert set(report) == {"store", "decode", "prefill", "decode+features", "prefill+features"}
    for name, kernel in report.items():
        assert kernel["stack"] == 0 and kernel["local"] == 0, f"{name} spills: {kernel}"
        assert kernel["regs"] <= 255
        assert kernel["wide_loads"] > 0, f"{name} reads in narrow accesses: {kernel}"
    assert report["prefill"]["wgmma"] > 0 and report["prefill+features"]["wgmma"] > 0

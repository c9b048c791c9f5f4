"""The torch attention backend against naive causal attention, on a mixed step."""

from __future__ import annotations

import pytest
import torch

from handler.attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from handler.attention.cpu_paged import CpuPagedBackend
from handler.attention.torch_backend import plan_prefills
from handler.kernels.build import compiler

BLOCK = 4
KV_HEADS, GROUP, HEAD_DIM = 2, 3, 8
HEADS = KV_HEADS * GROUP


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, heads, d] are the last n positions of k/v [ctx, kv_heads, d]; causal."""
    n, ctx = q.shape[0], k.shape[0]
    k = k.repeat_interleave(GROUP, dim=1)
    v = v.repeat_interleave(GROUP, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM**0.5
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


# (tokens already cached, tokens computed this step), decodes first.
STEPS = {
    # two decodes, then a chunk with earlier context and a fresh prompt
    "mixed": [(9, 1), (3, 1), (6, 5), (0, 7)],
    # fresh prompts of one length side by side (attended in one batched call), then others
    "equal-prompts": [(9, 1), (0, 5), (0, 5), (0, 5), (6, 5), (0, 7), (0, 7)],
}


def _backend(name: str) -> AttentionBackend:
    if name == "cpu":
        if compiler() is None:
            pytest.skip("the cpu backend needs a C compiler")
        return CpuPagedBackend()
    return TorchAttentionBackend()


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize(
    ("dtype", "backend_name"),
    # The cpu backend runs bfloat16 only.
    [(torch.float32, "torch"), (torch.bfloat16, "torch"), (torch.bfloat16, "cpu")],
)
def test_mixed_decodes_and_prefill_chunks_match_naive_attention(
    dtype: torch.dtype, backend_name: str, step: str
) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = STEPS[step]
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, starts, lens, full_k, full_v = [], [], [0], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        tables.append(table + [0] * (5 - len(table)))
        k_all = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v_all = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        for pos in range(cached):  # earlier steps wrote these
            k_cache[table[pos // BLOCK], pos % BLOCK] = k_all[pos]
            v_cache[table[pos // BLOCK], pos % BLOCK] = v_all[pos]
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, total)]
        starts.append(starts[-1] + new)
        lens.append(total)
        full_k.append(k_all)
        full_v.append(v_all)
    meta = AttentionMetadata(
        num_seqs=len(shapes),
        num_decode_tokens=sum(1 for _, new in shapes if new == 1),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(new for _, new in shapes),
        max_context_len=max(lens),
        block_size=BLOCK,
        query_start_loc_host=starts,
        context_lens_host=lens,
    )
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, generator=gen).to(dtype)
    k_new = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes, strict=True)])
    v_new = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes, strict=True)])

    backend = _backend(backend_name)
    backend.prepare(meta)
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, HEAD_DIM**-0.5)

    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    )
    for i in range(len(shapes)):
        s, e = starts[i], starts[i + 1]
        expected = _naive(q[s:e].float(), full_k[i].float(), full_v[i].float())
        torch.testing.assert_close(out[s:e].float(), expected, **tolerance)
        # This step's keys/values landed in the cache at their slots.
        table = tables[i]
        for pos in range(shapes[i][0], lens[i]):
            assert torch.equal(k_cache[table[pos // BLOCK], pos % BLOCK], full_k[i][pos])


def test_equal_fresh_prompts_side_by_side_share_one_prefill_call() -> None:
    # Lengths 5, 5, 5 fresh; 5 with context; 7, 7 fresh; 3 fresh: four SDPA calls, not seven.
    shapes = [(0, 5), (0, 5), (0, 5), (6, 5), (0, 7), (0, 7), (0, 3)]
    starts = [0]
    for _, new in shapes:
        starts.append(starts[-1] + new)
    lens = [cached + new for cached, new in shapes]
    meta = AttentionMetadata(
        num_seqs=len(shapes),
        num_decode_tokens=0,
        slot_mapping=torch.arange(starts[-1]),
        block_tables=torch.arange(len(shapes) * 4, dtype=torch.int32).view(len(shapes), 4),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=7,
        max_context_len=max(lens),
        block_size=BLOCK,
        query_start_loc_host=starts,
        context_lens_host=lens,
    )
    plans = plan_prefills(meta)
    assert [(p.start, p.end, p.count) for p in plans] == [
        (0, 15, 3),
        (15, 20, 1),
        (20, 34, 2),
        (34, 37, 1),
    ]
    assert plans[1].kv_slots is not None and all(p.kv_slots is None for p in plans[::2])

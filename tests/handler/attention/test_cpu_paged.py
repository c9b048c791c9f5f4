"""The fused CPU backend with sliding windows and soft-capping, on mixed steps, against the
float64 paged reference: decodes in the C kernel, prefill chunks (with and without earlier
context) through the torch path, released window blocks read as block 0 as the runner lays
them out."""

from __future__ import annotations

import pytest
import torch

from handler.attention import AttentionMetadata
from handler.attention.cpu_paged import CpuPagedBackend
from handler.kernels.build import compiler
from tests.handler.attention.paged_reference import paged_prefill_attention_reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="the cpu backend needs a C compiler")

BLOCK = 4
KV_HEADS, GROUP, HEAD_DIM = 2, 3, 64
HEADS = KV_HEADS * GROUP
# (tokens already cached, tokens computed this step), decodes first: long decodes whose
# windows released blocks, a chunk with earlier context past the window, fresh prompts.
SHAPES = [(30, 1), (9, 1), (2, 1), (17, 6), (0, 7), (0, 7), (0, 3)]


def _step(window: int | None, gen: torch.Generator):
    num_blocks = 64
    # Block 0 holds someone else's keys: a released window block reads it, masked or skipped.
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    free = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables, slots, starts, lens = [], [], [0], []
    k_new, v_new = [], []
    for cached, new in SHAPES:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BLOCK))]
        if window is not None:
            # A window group keeps the blocks its next queries can see: the rest read as 0.
            released = max(0, cached - window + 1) // BLOCK
            table[:released] = [0] * released
        tables.append(table + [0] * (13 - len(table)))
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, total)]
        starts.append(starts[-1] + new)
        lens.append(total)
        k_new.append(torch.randn(new, KV_HEADS, HEAD_DIM, generator=gen))
        v_new.append(torch.randn(new, KV_HEADS, HEAD_DIM, generator=gen))
    meta = AttentionMetadata(
        num_seqs=len(SHAPES),
        num_decode_tokens=sum(1 for _, new in SHAPES if new == 1),
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(new for _, new in SHAPES),
        max_context_len=max(lens),
        block_size=BLOCK,
        query_start_loc_host=starts,
        context_lens_host=lens,
    )
    k = torch.cat(k_new).to(torch.bfloat16)
    v = torch.cat(v_new).to(torch.bfloat16)
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("window", [5, 12, 1000, None])
@pytest.mark.parametrize("softcap", [1.5, None])
def test_windows_and_softcaps_on_a_mixed_step_match_the_reference(
    window: int | None, softcap: float | None
) -> None:
    q, k, v, k_cache, v_cache, meta = _step(window, torch.Generator().manual_seed(11))
    scale = HEAD_DIM**-0.5 * 3  # scores of a few units: a cap of 1.5 bends them
    backend = CpuPagedBackend()
    backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    expected = paged_prefill_attention_reference(
        q.double(),
        k_cache.double(),
        v_cache.double(),
        meta.block_tables,
        meta.query_start_loc,
        meta.context_lens,
        scale,
        window=window,
        softcap=softcap,
    )
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)
    if window is not None and window < 30:
        plain = paged_prefill_attention_reference(
            q.double(),
            k_cache.double(),
            v_cache.double(),
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            scale,
            softcap=softcap,
        )
        assert float((plain - expected).abs().max()) > 0.1  # the window mattered

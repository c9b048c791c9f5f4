"""Decode-graph scheduling, padding and replay, on the CPU with an eager stand-in for capture."""

from __future__ import annotations

import pytest
import torch

from handler.attention.base import AttentionMetadata
from tests.handler.attention.paged_reference import (
    paged_decode_attention_reference,
    store_kvcache_reference,
)
from warmup.cuda_graphs import (
    CudaGraphDecodeRunner,
    DecodeInputs,
    StaticDecodeBuffers,
    capture_eagerly,
    capture_sizes,
    pick_graph_size,
)

BLOCK_SIZE = 4
HIDDEN = 8


def test_capture_sizes_follow_the_schedule():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]  # the maximum itself is always captured
    assert capture_sizes(50)[-3:] == [40, 48, 50]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            capture_sizes(bad)


def test_pick_graph_size_takes_the_smallest_that_fits():
    sizes = capture_sizes(32)
    assert [pick_graph_size(sizes, b) for b in (1, 2, 3, 5, 8, 9, 17, 24, 25, 32)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        24,
        32,
        32,
    ]
    assert pick_graph_size(sizes, 33) is None
    with pytest.raises(ValueError):
        pick_graph_size(sizes, 0)


def _step(batch: int, width: int, seed: int = 0) -> DecodeInputs:
    gen = torch.Generator().manual_seed(seed)
    return DecodeInputs(
        input_ids=torch.randint(0, 50, (batch,), generator=gen),
        positions=torch.randint(0, 9, (batch,), generator=gen),
        slot_mapping=torch.randint(0, 40, (batch,), generator=gen),
        block_tables=torch.randint(1, 10, (batch, width), generator=gen, dtype=torch.int32),
        context_lens=torch.randint(1, 9, (batch,), generator=gen, dtype=torch.int32),
    )


def test_fill_copies_rows_and_pads_the_rest_to_write_nowhere():
    buffers = StaticDecodeBuffers.allocate(max_batch=8, max_blocks_per_seq=4, device="cpu")
    buffers.fill(_step(6, 4, seed=1), graph_batch=8)  # leave stale data behind
    step = _step(3, 2, seed=2)
    buffers.fill(step, graph_batch=4)
    assert torch.equal(buffers.input_ids[:3], step.input_ids)
    assert torch.equal(buffers.slot_mapping[:3], step.slot_mapping)
    assert torch.equal(buffers.block_tables[:3, :2], step.block_tables)
    assert bool((buffers.block_tables[:3, 2:] == 0).all())  # stale columns cleared
    assert buffers.slot_mapping[3].item() == -1
    assert buffers.context_lens[3].item() == 0
    assert buffers.input_ids[3].item() == 0 and buffers.positions[3].item() == 0
    meta = AttentionMetadata.for_decode_graph(buffers.view(4, BLOCK_SIZE))
    assert meta.num_decode_tokens == 4 and meta.max_context_len == 4 * BLOCK_SIZE
    assert meta.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()


def test_fill_refuses_what_does_not_fit():
    buffers = StaticDecodeBuffers.allocate(max_batch=4, max_blocks_per_seq=2, device="cpu")
    with pytest.raises(ValueError, match="exceed"):
        buffers.fill(_step(2, 3), graph_batch=2)
    with pytest.raises(ValueError, match="graph batch"):
        buffers.fill(_step(3, 2), graph_batch=2)
    with pytest.raises(ValueError, match="graph batch"):
        buffers.fill(_step(5, 2), graph_batch=8)


def test_every_kv_groups_tables_and_slots_have_static_buffers():
    buffers = StaticDecodeBuffers.allocate(8, 4, "cpu", kv_groups=3)
    step = _step(3, 2, seed=3)
    other = [_step(3, 2, seed=s) for s in (4, 5)]
    step.group_block_tables = [o.block_tables for o in other]
    step.group_slot_mappings = [o.slot_mapping for o in other]
    buffers.fill(step, graph_batch=4)
    meta = AttentionMetadata.for_decode_graph(buffers.view(4, BLOCK_SIZE))
    assert meta.group_block_tables is not None and meta.group_slot_mappings is not None
    assert len(meta.group_block_tables) == 3
    for g, o in enumerate(other, start=1):
        assert torch.equal(meta.group_block_tables[g][:3, :2], o.block_tables)
        assert torch.equal(meta.group_slot_mappings[g][:3], o.slot_mapping)
        assert meta.group_slot_mappings[g][3].item() == -1  # padding writes nowhere
        # The views are the buffers a graph reads.
        assert meta.group_block_tables[g].data_ptr() == buffers.group_block_tables[g - 1].data_ptr()
    with pytest.raises(ValueError, match="3 KV groups"):
        buffers.fill(_step(3, 2), graph_batch=4)
    # A one-group model's metadata has no group tables.
    single = StaticDecodeBuffers.allocate(8, 4, "cpu")
    assert AttentionMetadata.for_decode_graph(single.view(4, BLOCK_SIZE)).group_block_tables is None


class ToyDecoder:
    """One attention layer over a paged cache: embeds, stores KV by slot, attends."""

    def __init__(self, num_blocks: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.embed = torch.randn(64, HIDDEN, generator=gen)
        self.pos_embed = torch.randn(64, HIDDEN, generator=gen)
        self.k_cache = torch.zeros(num_blocks, BLOCK_SIZE, 1, HIDDEN)
        self.v_cache = torch.zeros(num_blocks, BLOCK_SIZE, 1, HIDDEN)
        self.calls = 0

    def forward(self, input_ids, positions, attn_metadata: AttentionMetadata):
        self.calls += 1
        x = (self.embed[input_ids] + self.pos_embed[positions]).view(-1, 1, HIDDEN)
        store_kvcache_reference(x, -x, self.k_cache, self.v_cache, attn_metadata.slot_mapping)
        out = paged_decode_attention_reference(
            x,
            self.k_cache,
            self.v_cache,
            attn_metadata.block_tables,
            attn_metadata.context_lens,
            0.5,
            compute_dtype=torch.float32,
        )
        return out.view(-1, HIDDEN)


class EagerCapture:
    """Stands in for CUDA-graph capture: 'replay' re-runs the recorded step into its output."""

    def __init__(self) -> None:
        self.pools: list[object] = []

    def __call__(self, step, pool):
        self.pools.append(pool)
        replay, output, _ = capture_eagerly(step, pool)
        return replay, output, pool or "shared-pool"


def test_runner_captures_largest_first_in_one_pool_and_writes_no_kv_doing_so():
    model = ToyDecoder(num_blocks=10)
    capture = EagerCapture()
    runner = CudaGraphDecodeRunner(
        model, AttentionMetadata.for_decode_graph, 16, 3, BLOCK_SIZE, "cpu", capture_fn=capture
    )
    timings = runner.capture()
    assert [t.batch for t in timings] == [16, 8, 4, 2, 1]
    assert all(t.seconds >= 0 for t in timings)
    assert capture.pools == [None] + ["shared-pool"] * 4
    assert runner.sizes == [1, 2, 4, 8, 16]
    assert not model.k_cache.any() and not model.v_cache.any()


def _eager_reference(step: DecodeInputs, num_blocks: int) -> tuple[torch.Tensor, ToyDecoder]:
    model = ToyDecoder(num_blocks)
    meta = AttentionMetadata(
        num_seqs=step.batch,
        num_decode_tokens=step.batch,
        slot_mapping=step.slot_mapping,
        block_tables=step.block_tables,
        context_lens=step.context_lens,
        query_start_loc=torch.arange(step.batch + 1, dtype=torch.int32),
        max_query_len=1,
        max_context_len=int(step.context_lens.max()),
        block_size=BLOCK_SIZE,
        query_start_loc_host=list(range(step.batch + 1)),
        context_lens_host=step.context_lens.tolist(),
    )
    return model.forward(step.input_ids, step.positions, meta), model


def test_replay_matches_eager_and_padded_rows_write_nowhere():
    num_blocks = 12
    model = ToyDecoder(num_blocks)
    runner = CudaGraphDecodeRunner(
        model,
        AttentionMetadata.for_decode_graph,
        8,
        3,
        BLOCK_SIZE,
        "cpu",
        capture_fn=EagerCapture(),
    )
    runner.capture()
    # Three sequences, each on its own blocks, decoding the last token of its context.
    tables = torch.tensor([[1, 2, 0], [3, 0, 0], [4, 5, 6]], dtype=torch.int32)
    lens = torch.tensor([6, 2, 11], dtype=torch.int32)
    last = lens.long() - 1
    slots = tables.long().gather(1, (last // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE
    step = DecodeInputs(
        input_ids=torch.tensor([5, 9, 13]),
        positions=last,
        slot_mapping=slots + last % BLOCK_SIZE,
        block_tables=tables,
        context_lens=lens,
    )
    assert runner.graph_size_for(step) == 4
    hidden = runner.run(step)
    expected, eager_model = _eager_reference(step, num_blocks)
    assert hidden.shape == (3, HIDDEN)
    assert torch.allclose(hidden, expected, atol=1e-6)
    # The padded fourth row stored nothing: the caches equal the eager run's exactly.
    assert torch.equal(model.k_cache, eager_model.k_cache)
    assert torch.equal(model.v_cache, eager_model.v_cache)


def test_run_without_a_fitting_graph_is_a_clear_error():
    runner = CudaGraphDecodeRunner(
        ToyDecoder(4), AttentionMetadata.for_decode_graph, 4, 2, BLOCK_SIZE, "cpu", EagerCapture()
    )
    with pytest.raises(ValueError, match="eagerly"):
        runner.run(_step(2, 2))  # nothing captured yet
    runner.capture([1, 2])
    assert runner.graph_size_for(_step(3, 2)) is None
    assert runner.graph_size_for(_step(2, 3)) is None
    with pytest.raises(ValueError, match="eagerly"):
        runner.run(_step(3, 2))
    with pytest.raises(ValueError, match="capture sizes"):
        runner.capture([8])

"""The block manager: allocation, the hash-chained prefix cache, eviction."""

from __future__ import annotations

from handler.engine.block_manager import BlockManager, PrefixHit, chain_hash
from handler.engine.params import SamplingParams
from handler.engine.sequence import Sequence


def _seq(tokens: list[int]) -> Sequence:
    return Sequence(0, tokens, SamplingParams(), None)


def _computed(manager: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence whose whole prompt was computed and registered."""
    seq = _seq(tokens)
    assert manager.allocate_new(seq, manager.find_cached_prefix(seq), len(tokens))
    seq.num_computed_tokens = len(tokens)
    manager.register_full_blocks(seq)
    return seq


def test_chain_hash_depends_on_the_whole_prefix() -> None:
    first = chain_hash(None, [1, 2, 3, 4])
    assert chain_hash(first, [5, 6, 7, 8]) != chain_hash(
        chain_hash(None, [9, 2, 3, 4]), [5, 6, 7, 8]
    )
    assert chain_hash(None, [1, 2, 3, 4]) == first


def test_shared_full_blocks_are_reused_and_counted() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    owner = _computed(manager, list(range(10)))  # blocks: [0-3] [4-7] [8, 9]
    reader = _seq(list(range(8)) + [50, 51, 52])
    hit = manager.find_cached_prefix(reader)
    assert hit.num_blocks == 2 and hit.blocks == [owner.block_table[:2]]
    assert manager.allocate_new(reader, hit, len(reader) - 8)
    assert reader.num_computed_tokens == 8 and manager.prefix_hit_tokens == 8
    assert manager.num_used_blocks == 3 + 1  # the two shared blocks are not counted twice
    manager.free(owner)
    manager.free(reader)
    assert manager.num_used_blocks == 0


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    first = _computed(manager, list(range(8)))
    manager.free(first)
    again = _seq(list(range(8)))
    assert (
        manager.find_cached_prefix(again).num_blocks == 1
    )  # the second block holds the last token


def test_different_earlier_tokens_never_match() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    _computed(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.find_cached_prefix(_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])).num_blocks == 0
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 0, 9])).num_blocks == 1


def test_freed_blocks_stay_cached_until_reused_least_recent_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old = _computed(manager, [1, 2, 3, 4])
    manager.free(old)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5])).num_blocks == 2
    # Two fresh blocks come from the never-used ones; the cached pair survives.
    fresh = _seq([9, 9, 9, 9])
    assert manager.allocate_new(fresh, PrefixHit(), 4)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5])).num_blocks == 2
    # Now the pool is only the cached pair: the next allocation evicts them.
    more = _seq([8, 8, 8])
    assert manager.allocate_new(more, PrefixHit(), 3)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5])).num_blocks == 0


def test_allocation_is_all_or_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    big = _seq(list(range(20)))
    assert not manager.allocate_new(big, PrefixHit(), 20)
    assert manager.num_free_blocks == 3 and big.block_table == []
    small = _seq(list(range(6)))
    assert manager.allocate_new(small, PrefixHit(), 6)
    small.num_computed_tokens = 6
    assert not manager.allocate_more(small, 8)  # would need 14 tokens = 4 blocks
    assert len(small.block_table) == 2
    assert manager.find_cached_prefix(_seq(list(range(6)))).num_blocks == 0  # caching is off


def test_a_failed_sequences_blocks_are_forgotten_unless_still_shared() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    failed = _computed(manager, list(range(13)))  # three full blocks and one token
    sharer = _seq(list(range(4)) + [70, 71])
    assert manager.allocate_new(sharer, manager.find_cached_prefix(sharer), 2)
    manager.free(failed, forget=True)
    assert manager.num_used_blocks == 2  # the shared first block and the sharer's own
    # Only the block the sharer still holds can be found again.
    assert manager.find_cached_prefix(_seq(list(range(13)))).num_blocks == 1


def _grow(manager: BlockManager, seq: Sequence, count: int) -> None:
    """Compute `count` more tokens of seq one at a time, as decode steps would."""
    for _ in range(count):
        assert manager.allocate_more(seq, 1)
        seq.num_computed_tokens += 1
        manager.register_full_blocks(seq)


def test_a_window_groups_blocks_stop_growing_at_the_window() -> None:
    # Group 0 global, group 1 a window of 8 tokens, blocks of 4.
    manager = BlockManager(24, 4, enable_prefix_caching=True, group_windows=(None, 8))
    seq = _seq(list(range(100)))
    assert manager.allocate_new(seq, manager.find_cached_prefix(seq), 1)
    held = []
    for _ in range(60):
        _grow(manager, seq, 1)
        held.append((len(seq.block_tables[0]), len(seq.block_tables[1])))
    # The global table covers every computed token; the window table never more than the
    # blocks from (next position - 7) to the next position: at most 3 blocks of 4.
    assert seq.num_computed_tokens == 60 and held[-1][0] == 15
    assert [g for g, _ in held] == [-(-n // 4) for n in range(1, 61)]
    assert max(window for _, window in held) == 3
    # The last step computed token 59, which sees tokens 52 to 59: blocks 13 and 14.
    assert seq.block_offsets[1] == 13
    assert manager.num_used_blocks == len(seq.block_tables[0]) + len(seq.block_tables[1])
    manager.free(seq)
    assert manager.num_used_blocks == 0


def test_a_window_prefix_hit_needs_only_the_blocks_its_first_query_sees() -> None:
    manager = BlockManager(40, 4, enable_prefix_caching=True, group_windows=(None, 8))
    owner = _seq(list(range(40)))
    assert manager.allocate_new(owner, manager.find_cached_prefix(owner), 1)
    _grow(manager, owner, 39)  # the window group released blocks 0 to 7, still cached
    reader = _seq(list(range(30)) + [77])
    hit = manager.find_cached_prefix(reader)
    # 7 leading blocks (28 tokens): the first query (position 28) sees positions 21 on, so the
    # window group attaches blocks 5 and 6 only.
    assert hit.num_blocks == 7 and hit.offsets == [0, 5]
    assert hit.blocks[0] == owner.block_tables[0][:7] and len(hit.blocks[1]) == 2

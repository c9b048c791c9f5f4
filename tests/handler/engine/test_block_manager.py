"""The block manager: allocation, the hash-chained prefix cache, eviction."""

from __future__ import annotations

from handler.engine.block_manager import BlockManager, chain_hash
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
    cached = manager.find_cached_prefix(reader)
    assert cached == owner.block_table[:2]
    assert manager.allocate_new(reader, cached, len(reader) - 8)
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
    assert len(manager.find_cached_prefix(again)) == 1  # the second block holds the last token


def test_different_earlier_tokens_never_match() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    _computed(manager, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert manager.find_cached_prefix(_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []
    assert len(manager.find_cached_prefix(_seq([1, 2, 3, 4, 5, 6, 7, 0, 9]))) == 1


def test_freed_blocks_stay_cached_until_reused_least_recent_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old = _computed(manager, [1, 2, 3, 4])
    manager.free(old)
    assert len(manager.find_cached_prefix(_seq([1, 2, 3, 4, 5]))) == 2
    # Two fresh blocks come from the never-used ones; the cached pair survives.
    fresh = _seq([9, 9, 9, 9])
    assert manager.allocate_new(fresh, [], 4)
    assert len(manager.find_cached_prefix(_seq([1, 2, 3, 4, 5]))) == 2
    # Now the pool is only the cached pair: the next allocation evicts them.
    more = _seq([8, 8, 8])
    assert manager.allocate_new(more, [], 3)
    assert manager.find_cached_prefix(_seq([1, 2, 3, 4, 5])) == []


def test_allocation_is_all_or_nothing() -> None:
    manager = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    big = _seq(list(range(20)))
    assert not manager.allocate_new(big, [], 20)
    assert manager.num_free_blocks == 3 and big.block_table == []
    small = _seq(list(range(6)))
    assert manager.allocate_new(small, [], 6)
    small.num_computed_tokens = 6
    assert not manager.allocate_more(small, 8)  # would need 14 tokens = 4 blocks
    assert len(small.block_table) == 2
    assert manager.find_cached_prefix(_seq(list(range(6)))) == []  # caching is off

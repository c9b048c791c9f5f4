"""KV-cache blocks: allocation, per-sequence block tables and the hash-chained prefix cache.

A full block whose KV is computed is registered under hash(previous block's hash, its tokens), so
two prompts that share leading full blocks share those blocks. Freed blocks keep their hash and
stay findable until they are handed out again, least recently freed first.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import xxhash

from handler.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


def chain_hash(previous: int | None, token_ids: tuple[int, ...] | list[int]) -> int:
    h = xxhash.xxh64()
    if previous is not None:
        h.update(previous.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_to_cover(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching seq's leading full blocks; one token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found: list[int] = []
        previous: int | None = None
        for start in range(0, len(seq) - bs, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            previous = chain_hash(previous, tokens)
            block_id = self._by_hash.get(previous)
            # Compare tokens too: a hash collision must never serve someone else's KV.
            if block_id is None or self._blocks[block_id].token_ids != tokens:
                break
            found.append(block_id)
        return found

    def allocate_new(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Give a sequence with no blocks the cached prefix plus blocks for num_new_tokens."""
        num_cached_tokens = len(cached) * self.block_size
        fresh = self.blocks_to_cover(num_cached_tokens + num_new_tokens) - len(cached)
        revived = sum(1 for b in cached if self._blocks[b].ref_count == 0)
        if fresh + revived > len(self._free):
            return False
        for block_id in cached:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        seq.block_table = list(cached) + [self._take_free() for _ in range(fresh)]
        seq.num_computed_tokens = num_cached_tokens
        seq.num_hashed_blocks = len(cached)
        seq.last_block_hash = self._blocks[cached[-1]].hash if cached else None
        self.prefix_hit_tokens += num_cached_tokens
        return True

    def allocate_more(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow a sequence's block table to hold num_new_tokens more tokens."""
        needed = self.blocks_to_cover(seq.num_computed_tokens + num_new_tokens)
        missing = needed - len(seq.block_table)
        if missing > len(self._free):
            return False
        seq.block_table.extend(self._take_free() for _ in range(missing))
        return True

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter seq's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
            index = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
            block_hash = chain_hash(seq.last_block_hash, tokens)
            block = self._blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.token_ids = block_hash, tokens
                self._by_hash.setdefault(block_hash, block.block_id)
            seq.last_block_hash = block_hash
            seq.num_hashed_blocks += 1

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are reused first.
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

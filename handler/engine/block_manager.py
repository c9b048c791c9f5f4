"""KV-cache blocks: allocation, per-sequence block tables and the hash-chained prefix cache.

A full block whose KV is computed is registered under hash(previous block's hash, its tokens), so
two prompts that share leading full blocks share those blocks. Freed blocks keep their hash and
stay findable until they are handed out again, least recently freed first.

Layer groups (handler/model/kv_layout.py) share the pool: a sequence holds a block table per
group. A sliding-window group frees the leading blocks that lie wholly before the window of the
next token to compute (no later query can see them), so its blocks stop growing at the window
while a global group's grow with the context. A prefix is a hit when every global group holds
all its blocks and every window group the blocks its first query still sees.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

from handler.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()
    group: int = 0  # the layer group whose prefix cache lists it (when hash is set)


def chain_hash(previous: int | None, token_ids: tuple[int, ...] | list[int]) -> int:
    h = xxhash.xxh64()
    if previous is not None:
        h.update(previous.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


@dataclass
class PrefixHit:
    """A cached prefix of num_blocks leading blocks: per group, the cached blocks attached, from
    logical block offsets[g] on (a window group skips those its first query cannot see)."""

    num_blocks: int = 0
    blocks: list[list[int]] = field(default_factory=lambda: [[]])
    offsets: list[int] = field(default_factory=lambda: [0])
    last_hash: int | None = None  # the chain hash of the last cached block


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        group_windows: tuple[int | None, ...] = (None,),
    ) -> None:
        """group_windows: per layer group, its sliding window (None: global attention)."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.group_windows = group_windows
        self.num_groups = len(group_windows)
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_hash: list[dict[int, int]] = [{} for _ in group_windows]
        self.prefix_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_to_cover(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_needed_block(self, group: int, next_position: int) -> int:
        """The first logical block a query at next_position or later can see in this group."""
        window = self.group_windows[group]
        if window is None:
            return 0
        return max(0, next_position - window + 1) // self.block_size

    def no_hit(self) -> PrefixHit:
        """No cached prefix: every block fresh."""
        return PrefixHit(0, [[] for _ in range(self.num_groups)], [0] * self.num_groups)

    def find_cached_prefix(self, seq: Sequence) -> PrefixHit:
        """Cached blocks matching seq's leading full blocks; one token is always left to compute."""
        if not self.enable_prefix_caching:
            return self.no_hit()
        groups = self.num_groups
        bs = self.block_size
        # found[g][k]: group g's cached block for logical block k, None when it has none.
        found: list[list[int | None]] = [[] for _ in range(groups)]
        hashes: list[int] = []
        previous: int | None = None
        for start in range(0, len(seq) - bs, bs):
            tokens = tuple(seq.token_ids[start : start + bs])
            previous = chain_hash(previous, tokens)
            hashes.append(previous)
            global_miss = False
            for group, by_hash in enumerate(self._by_hash):
                block_id = by_hash.get(previous)
                # Compare tokens too: a hash collision must never serve someone else's KV.
                if block_id is not None and self._blocks[block_id].token_ids != tokens:
                    block_id = None
                found[group].append(block_id)
                global_miss |= block_id is None and self.group_windows[group] is None
            if global_miss:
                break
        num_blocks = self._longest_usable(found)
        offsets = [self.first_needed_block(g, num_blocks * bs) for g in range(groups)]
        blocks = [
            [b for b in found[g][offsets[g] : num_blocks] if b is not None] for g in range(groups)
        ]
        return PrefixHit(
            num_blocks, blocks, offsets, hashes[num_blocks - 1] if num_blocks else None
        )

    def _longest_usable(self, found: list[list[int | None]]) -> int:
        """The most leading blocks every group can serve: all of them in a global group, those
        the first query to compute sees in a window group."""
        # last_miss[g][m]: the last logical block before m that group g lacks, -1 if none.
        last_miss = []
        for column in found:
            marks, last = [-1], -1
            for k, block_id in enumerate(column):
                if block_id is None:
                    last = k
                marks.append(last)
            last_miss.append(marks)
        for num_blocks in range(len(found[0]), 0, -1):
            position = num_blocks * self.block_size
            if all(
                last_miss[g][num_blocks] < self.first_needed_block(g, position)
                for g in range(self.num_groups)
            ):
                return num_blocks
        return 0

    def allocate_new(self, seq: Sequence, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Give a sequence with no blocks the cached prefix plus blocks for num_new_tokens."""
        num_cached_tokens = hit.num_blocks * self.block_size
        fresh = self.blocks_to_cover(num_cached_tokens + num_new_tokens) - hit.num_blocks
        revived = sum(1 for group in hit.blocks for b in group if self._blocks[b].ref_count == 0)
        if fresh * self.num_groups + revived > len(self._free):
            return False
        for group in hit.blocks:
            for block_id in group:
                block = self._blocks[block_id]
                if block.ref_count == 0:
                    del self._free[block_id]
                block.ref_count += 1
        seq.block_tables = [
            list(cached) + [self._take_free() for _ in range(fresh)] for cached in hit.blocks
        ]
        seq.block_offsets = list(hit.offsets)
        seq.num_computed_tokens = num_cached_tokens
        seq.num_hashed_blocks = hit.num_blocks
        seq.last_block_hash = hit.last_hash
        self.prefix_hit_tokens += num_cached_tokens
        return True

    def allocate_more(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow a sequence's block tables to hold num_new_tokens more tokens (window groups
        first release the blocks no query from now on can see)."""
        needed = self.blocks_to_cover(seq.num_computed_tokens + num_new_tokens)
        if self.num_groups == 1 and self.group_windows[0] is None:
            table = seq.block_tables[0]
            missing = needed - len(table)
            if missing > len(self._free):
                return False
            table.extend(self._take_free() for _ in range(missing))
            return True
        missing = 0
        for group in range(self.num_groups):
            self._slide(seq, group)
            missing += needed - seq.block_offsets[group] - len(seq.block_tables[group])
        if missing > len(self._free):
            return False
        for group, table in enumerate(seq.block_tables):
            count = needed - seq.block_offsets[group] - len(table)
            table.extend(self._take_free() for _ in range(count))
        return True

    def _slide(self, seq: Sequence, group: int) -> None:
        first = self.first_needed_block(group, seq.num_computed_tokens)
        table = seq.block_tables[group]
        drop = min(first - seq.block_offsets[group], len(table))
        if drop <= 0:
            return
        for block_id in table[:drop]:
            self._release(block_id, forget=False)
        del table[:drop]
        seq.block_offsets[group] += drop

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter seq's newly completed full blocks into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= seq.num_computed_tokens:
            index = seq.num_hashed_blocks
            tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
            block_hash = chain_hash(seq.last_block_hash, tokens)
            for group, table in enumerate(seq.block_tables):
                position = index - seq.block_offsets[group]
                if position < 0:
                    continue  # a window group's block already released
                block = self._blocks[table[position]]
                if block.hash is None:
                    block.hash, block.token_ids, block.group = block_hash, tokens, group
                    self._by_hash[group].setdefault(block_hash, block.block_id)
            seq.last_block_hash = block_hash
            seq.num_hashed_blocks += 1

    def free(self, seq: Sequence, forget: bool = False) -> None:
        """Release seq's blocks. forget: the blocks no one else holds leave the prefix cache too,
        so no later request attaches to them (a block another request still holds stays)."""
        # Tail blocks first: they are the least likely to be shared, so they are reused first.
        for table in seq.block_tables:
            for block_id in reversed(table):
                self._release(block_id, forget)
        seq.block_tables = [[] for _ in range(self.num_groups)]
        seq.block_offsets = [0] * self.num_groups

    def _release(self, block_id: int, forget: bool) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if forget:
                self._forget(block)
            self._free[block_id] = None

    def _forget(self, block: Block) -> None:
        by_hash = self._by_hash[block.group]
        if block.hash is not None and by_hash.get(block.hash) == block.block_id:
            del by_hash[block.hash]
        block.hash, block.token_ids = None, ()

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

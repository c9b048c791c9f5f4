"""Decides what each step computes, under one token budget.

Running sequences come first, oldest first: a decode costs one token, an unfinished prompt costs
its next chunk. Whatever budget is left admits waiting sequences (prefix-cache hits first
attached), so prefills and decodes share a step. When a running sequence needs a block and none
is free, the newest running sequence is preempted: its blocks are freed and it waits at the front
of the queue to be recomputed from its tokens, which it keeps.

A fork (a sibling of an earlier request with the same prompt) is passed over while that request
is still in its prefill, so it is admitted onto the prompt blocks the prefix cache then holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from handler.engine.block_manager import BlockManager
from handler.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # (sequence, tokens to compute this step), in the order the model sees them.
    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, failed: bool = False) -> None:
        """Drop a finished, aborted or failed sequence and free its blocks (a failed one's are
        withdrawn from the prefix cache: what they hold is suspect)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq, forget=failed)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self._schedule_running(self.max_num_batched_tokens, batch)
        # After a preemption memory is short: admitting newcomers would only evict them again.
        if not batch.preempted:
            self._admit_waiting(budget, batch)
        # Decodes (one query token) first: backends batch them as one contiguous slice.
        batch.items.sort(key=lambda item: item[1] != 1)
        return batch

    def _schedule_running(self, budget: int, batch: ScheduledBatch) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new, batch):
                break  # seq preempted itself; being the newest, nothing follows it
            batch.items.append((seq, num_new))
            budget -= num_new
            i += 1
        return budget

    def _make_room(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        while not self.block_manager.allocate_more(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, budget: int, batch: ScheduledBatch) -> None:
        bs = self.block_manager.block_size
        manager = self.block_manager
        passed_over: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.waits_for_parent():
                passed_over.append(self.waiting.popleft())
                continue
            hit = manager.find_cached_prefix(seq) if seq.uses_prefix_cache else manager.no_hit()
            num_new = min(len(seq) - hit.num_blocks * bs, budget)
            if not manager.allocate_new(seq, hit, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.items.append((seq, num_new))
            budget -= num_new
        # Forks still waiting keep their places at the front, in order.
        self.waiting.extendleft(reversed(passed_over))

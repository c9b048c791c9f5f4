"""Turns a scheduled batch into model inputs, runs the model and samples.

Decode-only steps replay a captured CUDA graph when one holds the batch (capture_decode_graphs);
every other step, and every step before capture, runs eagerly.
"""

from __future__ import annotations

import torch

from handler.attention.base import AttentionMetadata
from handler.engine.constraint import ConstraintMasker
from handler.engine.faults import FaultInjector
from handler.engine.kv_cache import allocate_kv_caches
from handler.engine.sampler import Sampler, SampleResult
from handler.engine.sequence import Sequence
from handler.model import KVCaches, LlamaModel
from warmup.cuda_graphs import (
    CaptureFn,
    CaptureTiming,
    CudaGraphDecodeRunner,
    DecodeInputs,
    capture_cuda_graph,
)

# Prompt positions whose logits are made at once for prompt logprobs: bounds the
# [rows, vocab] float32 temporaries of a long prompt.
PROMPT_LOGPROBS_ROWS = 256


class BoundModel:
    """The model with the engine's KV caches bound: the DecodeModel the graph runner drives."""

    def __init__(self, model: LlamaModel, kv_caches: KVCaches) -> None:
        self.model = model
        self.kv_caches = kv_caches

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model.forward(input_ids, positions, attn_metadata, self.kv_caches)


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        kv_caches: KVCaches,
        block_size: int,
        sampler: Sampler,
        faults: FaultInjector | None = None,
    ) -> None:
        self.model = model
        self.faults = faults
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = model.device
        self.graphs: CudaGraphDecodeRunner | None = None
        self.graph_steps = 0  # steps served by a graph replay, for stats and tests
        self.masker = ConstraintMasker(model.device)

    def capture_decode_graphs(
        self,
        max_batch: int,
        max_blocks_per_seq: int,
        sizes: list[int] | None = None,
        capture_fn: CaptureFn = capture_cuda_graph,
    ) -> list[CaptureTiming]:
        """Capture decode graphs (after the KV cache is allocated; capture writes no KV) and
        replay them from now on. The backend must be graph-safe (registry.GRAPH_SAFE_BACKENDS)."""
        graphs = CudaGraphDecodeRunner(
            BoundModel(self.model, self.kv_caches),
            AttentionMetadata.for_decode_graph,
            max_batch,
            max_blocks_per_seq,
            self.block_size,
            self.device,
            capture_fn,
            self.model.kv_layout.num_groups,
        )
        timings = graphs.capture(sizes)
        self.graphs = graphs
        return timings

    def run(self, items: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SampleResult | None]:
        """Compute the scheduled tokens; sample for every sequence whose tokens are all computed.

        items: (sequence, number of its tokens to compute), decodes first.
        """
        if self.model.rope.has_long:
            self._rerotate_crossing(items)
        input_ids, positions, meta, sample_rows, sampled = self._prepare(items)
        # The grammar masks are computed on their own thread while the forward pass runs.
        pending = self.masker.start(sampled)
        try:
            hidden = self._forward(input_ids, positions, meta)
            if any(seq.wants_prompt_logprobs for seq, _ in items):
                self._prompt_logprobs(items, hidden, meta.query_start_loc_host)
            if not sampled:
                return [], None
            # The LM head runs outside any graph, on the sampled rows only.
            logits = self.model.compute_logits(hidden.index_select(0, sample_rows))
            if self.faults is not None:
                logits = self.faults.poison_logits(logits, sampled)
        finally:
            # Joined whatever happens: the matchers are not touched while the thread runs.
            masks = pending.join() if pending is not None else None
        return sampled, self.sampler(logits, sampled, masks)

    def _prompt_logprobs(
        self, items: list[tuple[Sequence, int]], hidden: torch.Tensor, starts: list[int]
    ) -> None:
        """Append, for each prompt_logprobs sequence, the logprobs of the prompt tokens this
        step's positions predict (a chunked prefill accumulates them chunk by chunk)."""
        for i, (seq, num_new) in enumerate(items):
            entries = seq.prompt_logprobs
            if entries is None or seq.prompt_logprobs_done:
                continue
            begin = seq.num_computed_tokens
            # Position p predicts token p + 1; the prompt's tokens after the first are wanted.
            end = min(begin + num_new, seq.num_prompt_tokens - 1)
            k = seq.params.prompt_logprobs or 0
            for first in range(begin, end, PROMPT_LOGPROBS_ROWS):
                last = min(first + PROMPT_LOGPROBS_ROWS, end)
                rows = torch.arange(first, last, device=hidden.device) + (starts[i] - begin)
                logprobs = self.model.compute_logits(hidden.index_select(0, rows)).float()
                logprobs = logprobs.log_softmax(dim=-1)
                targets = torch.tensor(
                    seq.token_ids[first + 1 : last + 1], dtype=torch.int64, device=hidden.device
                )
                chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
                if k == 0:
                    entries.extend((lp, None) for lp in chosen)
                    continue
                values, ids = logprobs.topk(k, dim=-1)
                for lp, top_ids, top_values in zip(
                    chosen, ids.tolist(), values.tolist(), strict=True
                ):
                    entries.append((lp, list(zip(top_ids, top_values, strict=True))))

    def _rerotate_crossing(self, items: list[tuple[Sequence, int]]) -> None:
        """LongRoPE: when a sequence first grows past the original context, transformers
        recomputes all of it with the long factors (Phi-3's generate drops its cache there).
        Do the same for the tokens before this step's decode, in their own blocks, before it."""
        original = self.model.config.rope.original_max_position_embeddings
        crossing = [
            seq
            for seq, num_new in items
            if num_new == 1 and seq.num_computed_tokens == original == len(seq) - 1
        ]
        if not crossing:
            return
        for seq in crossing:
            seq.num_computed_tokens = 0
        try:
            input_ids, positions, meta, _, _ = self._prepare([(seq, original) for seq in crossing])
        finally:
            for seq in crossing:
                seq.num_computed_tokens = original
        self.model.forward(input_ids, positions, meta, self.kv_caches)

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if self.graphs is not None and meta.num_decode_tokens == meta.num_seqs:
            step = DecodeInputs(
                input_ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens
            )
            if meta.group_block_tables is not None and meta.group_slot_mappings is not None:
                step.group_block_tables = meta.group_block_tables[1:]
                step.group_slot_mappings = meta.group_slot_mappings[1:]
            if self.graphs.graph_size_for(step) is not None:
                self.graph_steps += 1
                # A view of the graph's output, consumed before the next replay.
                return self.graphs.run(step)
        return self.model.forward(input_ids, positions, meta, self.kv_caches)

    def _prepare(
        self, items: list[tuple[Sequence, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, list[Sequence]]:
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        num_decodes = 0
        for seq, num_new in items:
            begin = seq.num_computed_tokens
            end = begin + num_new
            table = seq.block_tables[0]
            offset = seq.block_offsets[0]
            if num_new == 1:
                num_decodes += 1
                tokens.append(seq.token_ids[begin])
                positions.append(begin)
                slots.append(table[begin // bs - offset] * bs + begin % bs)
            else:
                tokens.extend(seq.token_ids[begin:end])
                span = range(begin, end)
                positions.extend(span)
                slots.extend(table[p // bs - offset] * bs + p % bs for p in span)
            starts.append(starts[-1] + num_new)
            context_lens.append(end)
            if end == len(seq):
                sample_rows.append(starts[-1] - 1)
                sampled.append(seq)
        device = self.device
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        groups = self.model.kv_layout.num_groups
        if groups == 1:
            table_tensor = _table_tensor(items, 0, device)
            group_tables = group_slots = None
        else:
            # Every KV group's own tables and slots; block_tables / slot_mapping are group 0's.
            group_tables = [_table_tensor(items, g, device) for g in range(groups)]
            group_slots = [slot_mapping] + [
                torch.tensor(_group_slots(items, g, bs), dtype=torch.int64, device=device)
                for g in range(1, groups)
            ]
            table_tensor = group_tables[0]
        meta = AttentionMetadata(
            num_seqs=len(items),
            num_decode_tokens=num_decodes,
            slot_mapping=slot_mapping,
            block_tables=table_tensor,
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            max_query_len=max(n for _, n in items),
            max_context_len=max(context_lens),
            block_size=bs,
            query_start_loc_host=starts,
            context_lens_host=context_lens,
            seq_lens_host=[len(seq) for seq, _ in items],
            group_block_tables=group_tables,
            group_slot_mappings=group_slots,
        )
        return (
            torch.tensor(tokens, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
            torch.tensor(sample_rows, dtype=torch.int64, device=device),
            sampled,
        )


def _table_tensor(
    items: list[tuple[Sequence, int]], group: int, device: torch.device
) -> torch.Tensor:
    """Group `group`'s block tables, by logical block: the blocks a window group released read
    as block 0 (masked out, like the padding)."""
    rows = [
        [0] * seq.block_offsets[group] + seq.block_tables[group]
        if seq.block_offsets[group]
        else seq.block_tables[group]
        for seq, _ in items
    ]
    width = max(len(row) for row in rows)
    return torch.tensor(
        [row + [0] * (width - len(row)) for row in rows], dtype=torch.int32, device=device
    )


def _group_slots(items: list[tuple[Sequence, int]], group: int, bs: int) -> list[int]:
    slots: list[int] = []
    for seq, num_new in items:
        table, offset = seq.block_tables[group], seq.block_offsets[group]
        begin = seq.num_computed_tokens
        slots.extend(table[p // bs - offset] * bs + p % bs for p in range(begin, begin + num_new))
    return slots


def profile_step(
    model: LlamaModel, block_size: int, num_tokens: int, num_seqs: int, max_seq_len: int
) -> None:
    """A dummy prefill of num_tokens tokens and logits for num_seqs rows: the activation peak of
    the largest step, run before the KV cache exists. Every sequence writes and reads the same
    blocks of a scratch cache as long as the longest one (not every backend honours slot -1); the
    scratch counts towards the peak, a small overestimate."""
    lengths = [min(max_seq_len, num_tokens - s) for s in range(0, num_tokens, max_seq_len)]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    device = model.device
    width = -(-max(lengths) // block_size)
    scratch = allocate_kv_caches(
        model.config, width, block_size, model.dtype, device, model.kv_layout
    )
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    meta = AttentionMetadata(
        num_seqs=len(lengths),
        num_decode_tokens=0,
        slot_mapping=positions.clone(),
        block_tables=torch.arange(width, dtype=torch.int32, device=device).repeat(len(lengths), 1),
        context_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        max_query_len=max(lengths),
        max_context_len=max(lengths),
        block_size=block_size,
        query_start_loc_host=starts,
        context_lens_host=lengths,
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    hidden = model.forward(input_ids, positions, meta, scratch)
    rows = torch.arange(num_seqs, device=device) % num_tokens
    # Float32 logits and one same-sized temporary, as the sampler makes.
    model.compute_logits(hidden.index_select(0, rows)).softmax(-1)

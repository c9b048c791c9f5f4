"""Turns a scheduled batch into model inputs, runs the model and samples."""

from __future__ import annotations

import torch

from handler.attention.base import AttentionMetadata
from handler.engine.sampler import Sampler, SampleResult
from handler.engine.sequence import Sequence
from handler.model import KVCaches, LlamaModel


class ModelRunner:
    def __init__(
        self, model: LlamaModel, kv_caches: KVCaches, block_size: int, sampler: Sampler
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.device = model.device

    def run(self, items: list[tuple[Sequence, int]]) -> tuple[list[Sequence], SampleResult | None]:
        """Compute the scheduled tokens; sample for every sequence whose tokens are all computed.

        items: (sequence, number of its tokens to compute), decodes first.
        """
        input_ids, positions, meta, sample_rows, sampled = self._prepare(items)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_caches)
        if not sampled:
            return [], None
        logits = self.model.compute_logits(hidden.index_select(0, sample_rows))
        return sampled, self.sampler(logits, sampled)

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
            table = seq.block_table
            if num_new == 1:
                num_decodes += 1
                tokens.append(seq.token_ids[begin])
                positions.append(begin)
                slots.append(table[begin // bs] * bs + begin % bs)
            else:
                tokens.extend(seq.token_ids[begin:end])
                span = range(begin, end)
                positions.extend(span)
                slots.extend(table[p // bs] * bs + p % bs for p in span)
            starts.append(starts[-1] + num_new)
            context_lens.append(end)
            if end == len(seq):
                sample_rows.append(starts[-1] - 1)
                sampled.append(seq)
        width = max(len(seq.block_table) for seq, _ in items)
        tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq, _ in items]
        device = self.device
        meta = AttentionMetadata(
            num_seqs=len(items),
            num_decode_tokens=num_decodes,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            max_query_len=max(n for _, n in items),
            max_context_len=max(context_lens),
            block_size=bs,
            query_start_loc_host=starts,
            context_lens_host=context_lens,
        )
        return (
            torch.tensor(tokens, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            meta,
            torch.tensor(sample_rows, dtype=torch.int64, device=device),
            sampled,
        )

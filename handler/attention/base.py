"""The attention-backend interface: what a backend gets each step and what it must do.

A step's tokens are laid out flat. The first `num_decode_tokens` tokens are decodes (one query
token per sequence); after them come prefill chunks (one or more query tokens per sequence).
Sequence i owns query tokens query_start_loc[i]:query_start_loc[i+1] and, after this step's
keys/values are written, context_lens[i] tokens of KV in the paged cache (its earlier tokens
followed by this step's). Its query tokens are the last ones of that context.

Paged KV cache, per layer: k_cache and v_cache of shape [num_blocks, block_size, num_kv_heads,
head_dim]. Token j of sequence i lives in block block_tables[i, j // block_size] at offset
j % block_size; slot_mapping gives each query token's flat slot (block * block_size + offset),
-1 for padding tokens that must not be written.

Per layer a model may ask for a sliding window (a query at position p sees keys p - window + 1
.. p) and logit soft-capping (scores -> tanh(scores / cap) * cap before the mask), as Mistral,
Gemma 2/3, Phi-3 and windowed Qwen do. Backends declare which of these they implement
(FEATURES in registry.py) and refuse the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from warmup.cuda_graphs import DecodeView

# Attention features beyond plain causal attention, by name (registry.FEATURES says who has them).
SLIDING_WINDOW = "sliding_window"
LOGIT_SOFTCAP = "logit_softcap"
FEATURE_NAMES = {SLIDING_WINDOW: "sliding-window attention", LOGIT_SOFTCAP: "logit soft-capping"}


@dataclass
class AttentionMetadata:
    num_seqs: int
    num_decode_tokens: int  # == number of decode sequences; they come first
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    context_lens: torch.Tensor  # [num_seqs] int32, KV length after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_context_len: int
    block_size: int
    # The same offsets and lengths as Python lists, so CPU-side loops need no device sync.
    query_start_loc_host: list[int]
    context_lens_host: list[int]
    # Each sequence's whole length (prompt and generated tokens) where the runner knows it:
    # LongRoPE rotates every token of a sequence with the set its length calls for. None: the
    # context length after the step stands in (the same for decodes).
    seq_lens_host: list[int] | None = None
    # Models whose layers keep KV in several groups (handler/model/kv_layout.py): each group's
    # block tables and slots (block_tables and slot_mapping above are group 0's). None: one group.
    group_block_tables: list[torch.Tensor] | None = None
    group_slot_mappings: list[torch.Tensor] | None = None

    def by_group(self, num_groups: int) -> list[AttentionMetadata]:
        """The metadata each layer group's attention reads (the same for all without group
        tables: a scratch profiling step, whose groups share blocks)."""
        tables, slots = self.group_block_tables, self.group_slot_mappings
        if tables is None or slots is None:
            return [self] * num_groups
        return [
            replace(
                self,
                block_tables=table,
                slot_mapping=slot_mapping,
                group_block_tables=None,
                group_slot_mappings=None,
            )
            for table, slot_mapping in zip(tables, slots, strict=True)
        ]

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_host[-1]

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @classmethod
    def for_decode_graph(cls, view: DecodeView) -> AttentionMetadata:
        """Decode-only metadata over a captured graph's buffers. The host-side fields are fixed
        at capture (the longest context a table can address, placeholder lists): graph-safe
        backends must not read them per step."""
        return cls(
            num_seqs=view.batch,
            num_decode_tokens=view.batch,
            slot_mapping=view.slot_mapping,
            block_tables=view.block_tables,
            context_lens=view.context_lens,
            query_start_loc=view.query_start_loc,
            max_query_len=1,
            max_context_len=view.max_context_len,
            block_size=view.block_size,
            query_start_loc_host=list(range(view.batch + 1)),
            context_lens_host=[view.max_context_len] * view.batch,
            group_block_tables=(
                [view.block_tables, *view.group_block_tables] if view.group_block_tables else None
            ),
            group_slot_mappings=(
                [view.slot_mapping, *view.group_slot_mappings] if view.group_block_tables else None
            ),
        )


class UnsupportedAttentionError(NotImplementedError):
    """A layer asked a backend for an attention feature it does not implement."""


def refuse_features(backend: str, sliding_window: int | None, logit_softcap: float | None) -> None:
    """For backends with neither feature yet: raise instead of computing plain attention."""
    wanted = [
        FEATURE_NAMES[name]
        for name, value in ((SLIDING_WINDOW, sliding_window), (LOGIT_SOFTCAP, logit_softcap))
        if value is not None
    ]
    if wanted:
        raise UnsupportedAttentionError(
            f"the {backend} attention backend does not implement {' or '.join(wanted)} yet; "
            "use the torch backend"
        )


class AttentionBackend(ABC):
    """Writes a layer's new keys/values into the paged cache and attends over the context."""

    name: str = "abstract"

    def prepare(self, meta: AttentionMetadata) -> None:  # noqa: B027 - optional hook
        """Called once per step before the first layer; backends cache per-step indices here."""

    def fresh(self) -> AttentionBackend:
        """Another instance for another KV layer group (prepare() caches per-step state)."""
        return type(self)()

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        """Return the attention output [num_tokens, num_heads, head_dim] (causal, GQA).
        sliding_window, logit_softcap: this layer's (None: off); a backend without the feature
        raises UnsupportedAttentionError rather than ignore it."""

"""One request's state inside the engine."""

from __future__ import annotations

import enum

import torch

from handler.engine.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator  # per-request stream: same seed, same tokens, any batch
        self.status = SequenceStatus.WAITING
        # Per KV layer group (handler/model/kv_layout.py) the blocks held, for the logical
        # blocks block_offsets[g] onwards: a sliding-window group drops the leading blocks no
        # query still to come can see. Set by the block manager.
        self.block_tables: list[list[int]] = [[]]
        self.block_offsets: list[int] = [0]
        # Tokens whose KV is in the cache; after a preemption it drops back to 0 (recompute).
        self.num_computed_tokens = 0
        # Leading logical blocks already registered in the prefix cache.
        self.num_hashed_blocks = 0
        self.last_block_hash: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def block_table(self) -> list[int]:
        """The first group's blocks (every layer's, for a model with one group)."""
        return self.block_tables[0]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def reset_for_recompute(self) -> None:
        self.status = SequenceStatus.WAITING
        self.block_tables = [[]]
        self.block_offsets = [0]
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.last_block_hash = None

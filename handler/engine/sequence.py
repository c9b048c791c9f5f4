"""One request's state inside the engine."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import torch

from handler.engine.params import PromptLogprob, SamplingParams

if TYPE_CHECKING:
    from handler.engine.constraint import GrammarMatcher


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
        # The request's grammar state (a constraint), fed every generated token once.
        self.matcher: GrammarMatcher | None = None
        # EOS ids, and EOS plus stop ids: what min_tokens and a grammar hold back.
        self.eos_ids: list[int] = []
        self.end_ids: list[int] = []
        # A fork waits for this sequence's prefill, to take its prompt blocks from the cache.
        self.fork_parent: Sequence | None = None
        # prompt_logprobs: the entries computed so far, until sent with the first output.
        self.prompt_logprobs: list[PromptLogprob] | None = (
            [] if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_done = False

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

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs is not None and not self.prompt_logprobs_done

    @property
    def uses_prefix_cache(self) -> bool:
        """Prompt logprobs need every prompt position's logits, so no cached prefix."""
        return not self.wants_prompt_logprobs

    def waits_for_parent(self) -> bool:
        """A fork waits while the request it names is live and has not finished its prefill."""
        parent = self.fork_parent
        if parent is None:
            return False
        if (
            parent.status is SequenceStatus.FINISHED
            or parent.num_computed_tokens >= parent.num_prompt_tokens
        ):
            self.fork_parent = None
            return False
        return True

    def banned_ids(self) -> list[int]:
        """Token ids that cannot be sampled next: EOS and stop ids before min_tokens, EOS under
        a grammar with ignore_eos; none once the grammar is complete (it must end)."""
        matcher = self.matcher
        if matcher is not None and matcher.is_stopped():
            return []
        if self.num_output_tokens < self.params.min_tokens:
            return self.end_ids
        if matcher is not None and self.params.ignore_eos:
            return self.eos_ids
        return []

    def reset_for_recompute(self) -> None:
        self.status = SequenceStatus.WAITING
        self.block_tables = [[]]
        self.block_offsets = [0]
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0
        self.last_block_hash = None
        # The matcher keeps its state: the generated tokens are kept, not generated again.
        if self.wants_prompt_logprobs:
            self.prompt_logprobs = []

"""What the sampler changes in the logits before it samples: logit_bias, the tokens held back
(min_tokens, EOS under a grammar with ignore_eos) and grammar masks.

Each is one batched op over the rows that use it; rows that use none are left untouched, so an
unconstrained greedy row picks exactly what it would pick alone. The logprobs a request sees are
the model's own, taken from the logits before any of this.
"""

from __future__ import annotations

import torch

from handler.engine.constraint import TokenMasks
from handler.engine.sequence import Sequence
from handler.kernels.cpu import CpuKernels

NO_ALLOWED_TOKEN = "constraint: the grammar allows no token here"


def needs_adjusting(seqs: list[Sequence], masks: TokenMasks | None) -> bool:
    return masks is not None or any(
        s.params.logit_bias or s.params.min_tokens or s.matcher is not None for s in seqs
    )


def add_logit_bias(scores: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: each row's (token, bias) pairs added to its scores."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, seq in enumerate(seqs):
        for token, bias in seq.params.logit_bias:
            rows.append(row)
            cols.append(token)
            values.append(bias)
    if not rows:
        return
    device = scores.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    scores.index_put_(index, torch.tensor(values, dtype=scores.dtype, device=device))


def hold_back(scores: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place: the ids each row may not sample yet set to -inf."""
    rows: list[int] = []
    cols: list[int] = []
    for row, seq in enumerate(seqs):
        if seq.params.min_tokens or seq.matcher is not None:
            banned = seq.banned_ids()
            rows.extend([row] * len(banned))
            cols.extend(banned)
    if not rows:
        return
    device = scores.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    scores.index_put_(index, torch.tensor(float("-inf"), dtype=scores.dtype, device=device))


def apply_masks(scores: torch.Tensor, masks: TokenMasks, kernels: CpuKernels | None = None) -> None:
    """In place: every token a row's grammar forbids set to -inf, for all masked rows at once.

    With the CPU kernels (and scores on the CPU), one pass over the bits that skips the words
    allowing everything; elsewhere the bits are unpacked into a [rows, vocab] bool tensor."""
    if kernels is not None and scores.is_cpu and scores.is_contiguous():
        full = len(masks.rows) == scores.shape[0] and masks.rows == list(range(len(masks.rows)))
        kernels.apply_token_mask(scores, masks.bits, None if full else masks.rows)
        return
    allowed = masks.allowed(scores.shape[1], scores.device)
    if len(masks.rows) == scores.shape[0]:
        scores.masked_fill_(~allowed, float("-inf"))
        return
    rows = torch.tensor(masks.rows, device=scores.device)
    masked = scores.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    scores.index_copy_(0, rows, masked)

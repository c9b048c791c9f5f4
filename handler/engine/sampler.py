"""Batched sampling: logit bias, penalties, grammar masks, temperature, top-k, top-p, min-p,
per-request seeds, logprobs.

Every row of the batch goes through the same tensor ops; per-row settings are tensors. Sampling
uses the exponential-race trick (argmax of p / E, E ~ Exp(1)), which draws from p exactly and
lets a seeded request draw its noise from its own generator, independent of its companions.
Logprobs are those of the model's distribution, before any sampling setting is applied.

A row that cannot be sampled fails alone: non-finite logits (found by one batched check), or an
exception that the row raises when sampled by itself after the batch raised. SampleResult.failed
names those rows; the engine ends their requests and the other rows' results stand.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from handler.engine.constraint import TokenMasks
from handler.engine.logit_adjust import (
    NO_ALLOWED_TOKEN,
    add_logit_bias,
    apply_masks,
    hold_back,
    needs_adjusting,
)
from handler.engine.sequence import Sequence
from handler.kernels.cpu import CpuKernels

NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or infinity) for this request"


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    # row -> why it failed; those rows' other entries are meaningless.
    failed: dict[int, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, kernels: CpuKernels | None = None) -> None:
        # With the fused CPU kernels, bfloat16 logits are taken as they are: a greedy batch
        # then needs no float32 copy of [rows, vocab] and no log_softmax over it.
        self.kernels = kernels

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks | None = None
    ) -> SampleResult:
        """logits: [len(seqs), vocab], float32 (or bfloat16 on the CPU with kernels); masks:
        the constrained rows' grammar masks for this step.

        Raises only what no single row can be blamed for: when every row fails alone too."""
        try:
            return self._sample_batch(logits, seqs, masks)
        except Exception as exc:
            return self._sample_rows_apart(logits, seqs, masks, exc)

    def _sample_rows_apart(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        masks: TokenMasks | None,
        batch_error: Exception,
    ) -> SampleResult:
        """The batch raised: sample each row by itself to find the rows that raise.

        Only on this error path; the rows that succeed get what they would have got in the
        batch (every op is row-wise), except that a seeded row's generator may have been
        advanced by the failed attempt."""
        result = SampleResult([], [], [])
        for row, seq in enumerate(seqs):
            try:
                mask = masks.select(row) if masks is not None else None
                one = self._sample_batch(logits[row : row + 1], [seq], mask)
            except Exception as exc:
                one = SampleResult([0], [math.nan], [None], {0: f"sampling failed: {exc!r}"})
            result.token_ids.append(one.token_ids[0])
            result.logprobs.append(one.logprobs[0])
            result.top_logprobs.append(one.top_logprobs[0])
            if 0 in one.failed:
                result.failed[row] = one.failed[0]
        if len(result.failed) == len(seqs):
            raise batch_error  # every row fails: the cause is not one request
        return result

    def _sample_batch(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: TokenMasks | None = None
    ) -> SampleResult:
        normaliser = None
        if self.kernels is not None and logits.dtype == torch.bfloat16 and logits.is_cpu:
            normaliser = self.kernels.logsumexp_rows(logits).unsqueeze(1)
        elif logits.dtype != torch.float32:
            logits = logits.float()
        greedy = all(s.params.greedy for s in seqs)
        penalties = any(s.params.has_penalties for s in seqs)
        adjust = needs_adjusting(seqs, masks)
        if adjust and greedy and not penalties and not any(s.params.logit_bias for s in seqs):
            # A copy: the logprobs below are the model's, from the logits as they came. Masks
            # and hold-backs only write -inf, which bfloat16 holds exactly, and greedy picks
            # are the same on bfloat16: no float32 widening of the whole batch.
            scores = logits.clone()
        elif adjust:
            scores = logits.to(torch.float32, copy=True)
            add_logit_bias(scores, seqs)
        else:
            # Greedy picks are the same on bfloat16 logits: widening to float32 is exact.
            scores = logits if greedy and not penalties else logits.float()
        if penalties:
            scores = _apply_penalties(scores, seqs)
        if adjust:
            hold_back(scores, seqs)
            if masks is not None:
                apply_masks(scores, masks, self.kernels)
        tokens = argmax_rows(scores) if greedy else _sample(scores, seqs)
        if normaliser is None:
            # log_softmax is one vectorised pass; logsumexp costs about three times as much.
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
            top = _top_logprobs(lambda: logprobs, seqs)
        else:
            picked = logits.gather(1, tokens.unsqueeze(1)).float()
            chosen = (picked - normaliser).squeeze(1)
            top = _top_logprobs(lambda: logits.float() - normaliser, seqs)
        # One batched check: a row holding a NaN or an infinity sums to a non-finite value. The
        # sum stays in the logits' dtype (a float32 result for bfloat16 is a much slower path)
        # and reads each row once, where isfinite(logits) would write a [rows, vocab] mask.
        finite = torch.isfinite(logits.sum(dim=-1))
        logprobs_list = torch.where(finite, chosen, math.nan).tolist()
        failed = {}
        if not all(map(math.isfinite, logprobs_list)):
            failed = {
                row: NON_FINITE_LOGITS
                for row, lp in enumerate(logprobs_list)
                if not math.isfinite(lp)
            }
        if masks is not None:
            for row in masks.empty_rows():
                failed.setdefault(row, NO_ALLOWED_TOKEN)
        return SampleResult(tokens.tolist(), logprobs_list, top, failed)


def _sample(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = scores.device
    greedy = torch.tensor([s.params.greedy for s in seqs], device=device)
    temps = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in seqs])
    temps = temps.to(device)
    scaled = scores / temps.unsqueeze(1)
    if any(s.params.top_k > 0 or s.params.top_p < 1.0 for s in seqs):
        scaled = _top_k_top_p(scaled, seqs)
    if any(s.params.min_p > 0.0 for s in seqs):
        scaled = _min_p(scaled, seqs)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, seq in enumerate(seqs):
        if seq.generator is not None and not seq.params.greedy:
            noise[row].exponential_(generator=seq.generator)
    sampled = argmax_rows(probs / noise)
    return torch.where(greedy, argmax_rows(scores), sampled)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[1]
    device = logits.device
    out_counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
    prompt_seen = _token_counts([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab, device)
    seen = (out_counts + prompt_seen) > 0
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device).unsqueeze(1)
    # HF semantics: shrink the logit of every token already present, prompt included.
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    scores = torch.where(seen, penalised, logits)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=device).unsqueeze(1)
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=device).unsqueeze(1)
    # OpenAI semantics: only generated tokens count.
    return scores - freq * out_counts - pres * (out_counts > 0).float()


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    # Pad with an extra id `vocab` whose column is dropped afterwards.
    padded = torch.full((len(rows), width), vocab, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            padded[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab]


def _top_k_top_p(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    device = scores.device
    vocab = scores.shape[1]
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    top_k = torch.tensor([s.params.top_k or vocab for s in seqs], device=device).clamp(max=vocab)
    kth = sorted_scores.gather(1, (top_k - 1).unsqueeze(1))
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, float("-inf"))
    top_p = torch.tensor([s.params.top_p for s in seqs], device=device).unsqueeze(1)
    probs = sorted_scores.softmax(dim=-1)
    # Drop a token when the tokens before it already reach top_p; the first always stays.
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_scores = sorted_scores.masked_fill(mass_before > top_p, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, sorted_scores)


def _min_p(scores: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    min_p = torch.tensor([s.params.min_p for s in seqs], device=scores.device).unsqueeze(1)
    probs = scores.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return scores.masked_fill(probs < threshold, float("-inf"))


def _top_logprobs(
    logprobs: Callable[[], torch.Tensor], seqs: list[Sequence]
) -> list[list[tuple[int, float]] | None]:
    """logprobs: makes the [rows, vocab] log-probabilities, called only if a row wants top-n."""
    wanted = [s.params.logprobs for s in seqs]
    n = max(wanted)
    if n == 0:
        return [None] * len(seqs)
    values, ids = logprobs().topk(n, dim=-1)
    values, ids = values.tolist(), ids.tolist()
    return [
        list(zip(ids[row][:k], values[row][:k], strict=True)) if k else None
        for row, k in enumerate(wanted)
    ]


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first maximum), [rows, vocab] -> [rows].

    On CPU, argmax over a long row runs scalar code while amax is vectorised: find the chunk
    holding the first maximum with amax, then take argmax inside that chunk only.
    """
    rows, vocab = x.shape
    chunk = _chunk_size(vocab) if x.device.type == "cpu" else None
    if chunk is None:
        return x.argmax(dim=-1)
    chunks = x.reshape(rows, vocab // chunk, chunk)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)
    inside = chunks[torch.arange(rows, device=x.device), best_chunk].argmax(dim=-1)
    return best_chunk * chunk + inside


@functools.lru_cache(maxsize=8)
def _chunk_size(vocab: int) -> int | None:
    # The largest divisor of vocab in [256, 2048], so the rows split evenly without a copy.
    for size in range(min(2048, vocab // 2), 255, -1):
        if vocab % size == 0:
            return size
    return None

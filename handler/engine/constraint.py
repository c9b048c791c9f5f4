"""Constrained decoding with llguidance: per-request matchers and the step's token masks.

The worker is grammar-agnostic: a request's `constraint` is an llguidance grammar (a serialized
TopLevelGrammar, which the gateway compiled and checked) and becomes one LLMatcher over an
LLTokenizer read from the snapshot's tokenizer.json. That tokenizer is loaded on the first
constrained request, never during start-up (reading a large vocabulary takes a while and holds
the interpreter lock).

Each step, the masks of the constrained rows are computed on a thread (llguidance drops the GIL
and spreads the rows over its own threads) that starts before the forward pass and is joined
before sampling, so the two overlap. A mask is a bitmask per row, one bit per token id; ids past
the tokenizer's vocabulary (a model's padded embedding rows) are never allowed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as SequenceOf
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from handler.engine.sequence import Sequence

# Timings kept for benchmarks: enough steps for stable percentiles, bounded memory.
MAX_TIMINGS = 100_000


class GrammarTokenizer:
    """The LLTokenizer of a tokenizer.json, loaded on first use, sized to the model's vocabulary
    and ending on the model's EOS ids (what a complete grammar allows)."""

    def __init__(self, path: str | Path, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.load_seconds: float | None = None
        self._tokenizer: Any = None
        self._error: str | None = None  # a failed load is not tried again per request

    def get(self) -> Any:
        if self._error is not None:
            raise ValueError(self._error)
        if self._tokenizer is None:
            try:
                self._tokenizer = self._load()
            except ValueError as exc:
                self._error = str(exc)
                raise
        return self._tokenizer

    def _load(self) -> Any:
        import llguidance

        if not self.path.is_file():
            raise ValueError(f"constraint: no tokenizer at {self.path}, so no grammar can be used")
        start = time.perf_counter()
        eos = self.eos_token_ids or None
        try:
            tokenizer = llguidance.LLTokenizer(
                str(self.path), n_vocab=self.vocab_size, eos_token=eos
            )
        except Exception as exc:  # llguidance reports a bad file with several types
            if "vocab size too small" not in str(exc):
                raise ValueError(f"constraint: cannot load {self.path}: {exc}") from exc
            # The tokenizer lists more ids than the model has: masks are cut to the model's.
            try:
                tokenizer = llguidance.LLTokenizer(str(self.path), eos_token=eos)
            except Exception as again:
                raise ValueError(f"constraint: cannot load {self.path}: {again}") from again
        self.load_seconds = time.perf_counter() - start
        return tokenizer


class GrammarMatcher:
    """One request's grammar state: it has consumed every token the request generated."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.mask_words = -(-vocab_size // 32)  # int32 words in this matcher's bitmask

    @classmethod
    def build(cls, tokenizer: GrammarTokenizer, grammar: str) -> GrammarMatcher:
        """ValueError naming the grammar's problem when llguidance cannot build it."""
        import llguidance

        lltokenizer = tokenizer.get()
        try:
            matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        except Exception as exc:  # grammar errors come as the matcher's error state; not these
            raise ValueError(f"constraint: {exc}") from exc
        if matcher.is_error():
            raise ValueError(f"constraint: {matcher.get_error()}")
        return cls(matcher, lltokenizer.vocab_size)

    def is_stopped(self) -> bool:
        """The grammar is complete and can go no further: only EOS is allowed."""
        return bool(self.matcher.is_stopped())

    def consume(self, token: int) -> str | None:
        """Advance past a sampled token; the matcher's error when it refuses it."""
        return None if self.matcher.consume_token(token) else self.refusal(token)

    def refusal(self, token: int) -> str:
        return f"constraint: {self.matcher.get_error() or f'token {token} refused'}"


@dataclass
class MaskTiming:
    """One step's masks: rows masked, seconds spent computing them (on the mask thread) and
    seconds the sampler waited for them after the forward pass (on the critical path)."""

    rows: int
    compute_s: float
    wait_s: float


@dataclass
class TokenMasks:
    """The step's masks: bits[i] is batch row rows[i]'s bitmask (bit t set = token t allowed)."""

    rows: list[int]
    bits: torch.Tensor  # [len(rows), words] int32 on the CPU

    def select(self, row: int) -> TokenMasks | None:
        """This row's mask alone, as row 0 (for sampling one row apart)."""
        if row not in self.rows:
            return None
        i = self.rows.index(row)
        return TokenMasks([0], self.bits[i : i + 1])

    def empty_rows(self) -> list[int]:
        """Batch rows whose mask allows no token at all."""
        some = (self.bits != 0).any(dim=1).tolist()
        return [row for row, ok in zip(self.rows, some, strict=True) if not ok]

    def allowed(self, vocab: int, device: torch.device) -> torch.Tensor:
        """[len(rows), vocab] bool on device: the bits unpacked, cut or padded (False) to vocab."""
        bits = self.bits.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(len(self.rows), -1)
        width = allowed.shape[1]
        if width >= vocab:
            return allowed[:, :vocab]
        pad = torch.zeros(len(self.rows), vocab - width, dtype=torch.bool, device=device)
        return torch.cat([allowed, pad], dim=1)


class PendingMasks:
    """Masks being computed on the mask thread; join() before touching the matchers again."""

    def __init__(
        self, masker: ConstraintMasker, rows: list[int], bits: torch.Tensor, job: Future[float]
    ) -> None:
        self.masker = masker
        self.rows = rows
        self.bits = bits
        self.job = job

    def join(self) -> TokenMasks:
        start = time.perf_counter()
        compute_s = self.job.result()
        self.masker.record(MaskTiming(len(self.rows), compute_s, time.perf_counter() - start))
        return TokenMasks(self.rows, self.bits)


class ConstraintMasker:
    """Computes the constrained rows' masks for a step, on its own thread."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: deque[MaskTiming] = deque(maxlen=MAX_TIMINGS)
        self.masked_rows = 0  # cumulative, with the two sums below
        self.compute_seconds = 0.0
        self.wait_seconds = 0.0
        self.consume_seconds = 0.0  # advancing the matchers after sampling (critical path)
        self._executor: Any = None
        self._thread: ThreadPoolExecutor | None = None

    def start(self, seqs: SequenceOf[Sequence]) -> PendingMasks | None:
        """Begin the masks of the constrained sequences among seqs (batch rows, in order)."""
        rows = [row for row, seq in enumerate(seqs) if seq.matcher is not None]
        if not rows:
            return None
        if self._thread is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masks")
        matchers = []
        words = 0
        for i, row in enumerate(rows):
            matcher = seqs[row].matcher
            assert matcher is not None
            matchers.append((matcher.matcher, i))
            words = matcher.mask_words  # one tokenizer: the same for every row
        # Pinned, so the copy to the GPU is asynchronous (the host allocator keeps each buffer
        # until its copy is done).
        pin = self.device.type == "cuda"
        bits = torch.empty((len(rows), words), dtype=torch.int32, pin_memory=pin)
        job = self._thread.submit(self._fill, matchers, bits)
        return PendingMasks(self, rows, bits, job)

    def consume(self, pairs: list[tuple[GrammarMatcher, int]]) -> list[str | None]:
        """Advance each matcher past its sampled token (in parallel when there are several);
        per pair, None or why the matcher refused the token."""
        start = time.perf_counter()
        if len(pairs) == 1 or self._executor is None:
            errors = [matcher.consume(token) for matcher, token in pairs]
        else:
            done = self._executor.consume_token_par([(m.matcher, t) for m, t in pairs])
            errors = [
                None if ok else matcher.refusal(token)
                for ok, (matcher, token) in zip(done, pairs, strict=True)
            ]
        self.consume_seconds += time.perf_counter() - start
        return errors

    def _fill(self, matchers: list[tuple[Any, int]], bits: torch.Tensor) -> float:
        start = time.perf_counter()
        rows, words = bits.shape
        self._executor.unsafe_compute_mask_ptr(matchers, bits.data_ptr(), words * 4, rows)
        return time.perf_counter() - start

    def record(self, timing: MaskTiming) -> None:
        self.timings.append(timing)
        self.masked_rows += timing.rows
        self.compute_seconds += timing.compute_s
        self.wait_seconds += timing.wait_s

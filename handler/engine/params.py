"""Plain data crossing the engine's API: request parameters, outputs, stats."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# The bounds below are the sampling contract the gateway enforces too; both test suites check
# them against docs/sampling_contract.json.
MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_LOGIT_BIAS = 100.0
# Below this, dividing logits by the temperature overflows float32; it is greedy anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0.0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # top-n logprobs per token (0 = the chosen token's only)
    # (token id, bias) pairs added to the logits before penalties and temperature.
    logit_bias: list[tuple[int, float]] = field(default_factory=list)
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens were generated
    constraint: str | None = None  # an llguidance grammar (serialized TopLevelGrammar)
    prompt_logprobs: int | None = None  # top-k per prompt token after the first (None = off)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first bad field."""
        _check_int("max_new_tokens", self.max_new_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0, high=MAX_TEMPERATURE)
        _check_int("top_k", self.top_k, low=0)
        _check_float("top_p", self.top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be > 0 (use temperature=0 for greedy decoding)")
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0)
        if self.repetition_penalty == 0.0:
            raise ValueError("repetition_penalty must be > 0")
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=MAX_SEED)
        if not isinstance(self.stop_token_ids, list | tuple):
            raise ValueError("stop_token_ids must be a list of token ids")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids[]", token, low=0, high=vocab_size - 1)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check_int("logprobs", self.logprobs, low=0, high=MAX_TOP_LOGPROBS)
        _check_logit_bias(self.logit_bias, vocab_size)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_new_tokens ({self.max_new_tokens})"
            )
        if self.constraint is not None and (
            not isinstance(self.constraint, str) or not self.constraint
        ):
            raise ValueError("constraint must be a non-empty grammar string or nil")
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0, high=MAX_TOP_LOGPROBS)


def _check_logit_bias(entries: object, vocab_size: int) -> None:
    if not isinstance(entries, list | tuple):
        raise ValueError("logit_bias must be a list of [token id, bias] pairs")
    if len(entries) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(
            f"logit_bias may hold {MAX_LOGIT_BIAS_ENTRIES} entries at most, got {len(entries)}"
        )
    seen: set[int] = set()
    for entry in entries:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ValueError(f"logit_bias entries must be [token id, bias] pairs, got {entry!r}")
        token, bias = entry
        _check_int("logit_bias token id", token, low=0, high=vocab_size - 1)
        _check_float("logit_bias bias", bias, low=-MAX_LOGIT_BIAS, high=MAX_LOGIT_BIAS)
        if token in seen:
            raise ValueError(f"logit_bias names token {token} twice")
        seen.add(token)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _check_float(name: str, value: object, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


# A prompt token's logprob and its top alternatives (None when none were asked for).
PromptLogprob = tuple[float, list[tuple[int, float]] | None]


@dataclass
class TokenOutput:
    request_id: int
    token_id: int | None  # None when the request ended without a new token (cancelled)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    # "eos_token" (an EOS or stop token id, included) | "length" | "cancelled" | "error"
    finish_reason: str | None
    # Why the request failed (finish_reason "error"); the rest of its batch went on.
    error: str | None = None
    # On a prompt_logprobs request's first output: per prompt token after the first, its
    # logprob and top alternatives (None when 0 were asked for).
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_used_blocks: int
    kv_total_blocks: int
    prefix_hit_tokens: int  # prompt tokens served from the prefix cache, cumulative
    preemptions: int  # cumulative
    steps: int
    prompt_tokens_computed: int  # cumulative, recomputation after preemption included
    generated_tokens: int  # cumulative
    last_step_tokens: int  # tokens pushed through the model in the latest step
    last_step_seqs: int
    # Constrained decoding, cumulative: tokens sampled under a grammar, the seconds spent
    # computing their masks (off the critical path, overlapping the forward pass), the seconds
    # the sampler still waited for masks after the forward and those spent advancing the
    # grammars past the sampled tokens (both on the critical path).
    constrained_tokens: int = 0
    mask_seconds: float = 0.0
    mask_wait_seconds: float = 0.0
    grammar_consume_seconds: float = 0.0

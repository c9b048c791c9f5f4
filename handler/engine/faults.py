"""Fault injection (THAW_FAULT_INJECT, README's worker table): off unless set.

It exists so the failure paths can be proven end to end with the real worker: a request that
fails alone, a poison request that kills the worker, a worker that never becomes ready. The
engine holds an injector only when a fault is set, so an ordinary step pays one `is None` test.
No torch here: the worker parses its settings before it imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from handler.engine.sequence import Sequence

# EX_SOFTWARE: what an injected crash exits with, so a test can tell it from any other exit.
FAULT_EXIT_CODE = 70
NAN_LOGITS_TOKEN = "nan_logits_token"
CRASH_TOKEN = "crash_token"
CRASH_AT_START = "crash_at_start"


@dataclass(frozen=True)
class FaultInjection:
    # The logits row of a request whose prompt holds this token id becomes NaN.
    nan_logits_token: int | None = None
    # The process exits (os._exit) when a request whose prompt holds this token id is scheduled.
    crash_token: int | None = None
    # The worker exits during start-up, before ready.
    crash_at_start: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> FaultInjection:
        """From `name[=value]` options (EnvReader.options); ValueError naming a bad one."""
        tokens: dict[str, int] = {}
        crash_at_start = False
        for name, value in options.items():
            if name in (NAN_LOGITS_TOKEN, CRASH_TOKEN):
                if value is None or not value.isdigit():
                    raise ValueError(f"{name} needs a token id, as in {name}=42")
                tokens[name] = int(value)
            elif name == CRASH_AT_START:
                if value is not None:
                    raise ValueError(f"{CRASH_AT_START} takes no value")
                crash_at_start = True
            else:
                known = ", ".join((NAN_LOGITS_TOKEN, CRASH_TOKEN, CRASH_AT_START))
                raise ValueError(f"unknown fault {name!r} (known: {known})")
        return cls(tokens.get(NAN_LOGITS_TOKEN), tokens.get(CRASH_TOKEN), crash_at_start)

    @property
    def in_engine(self) -> bool:
        """Whether any fault acts inside the engine's step."""
        return self.nan_logits_token is not None or self.crash_token is not None

    def describe(self) -> str:
        parts = []
        if self.nan_logits_token is not None:
            parts.append(f"{NAN_LOGITS_TOKEN}={self.nan_logits_token}")
        if self.crash_token is not None:
            parts.append(f"{CRASH_TOKEN}={self.crash_token}")
        if self.crash_at_start:
            parts.append(CRASH_AT_START)
        return ",".join(parts)


def crash() -> None:
    """Exit at once, as a crash would: no cleanup, no goodbye frame."""
    os._exit(FAULT_EXIT_CODE)


class FaultInjector:
    """The engine-side faults of a FaultInjection."""

    def __init__(self, faults: FaultInjection) -> None:
        self.faults = faults

    def on_schedule(self, items: Iterable[tuple[Sequence, int]]) -> None:
        token = self.faults.crash_token
        if token is not None and any(_prompt_holds(seq, token) for seq, _ in items):
            crash()

    def poison_logits(self, logits: Any, seqs: list[Sequence]) -> Any:
        """NaN in the rows of `logits` ([len(seqs), vocab]) whose request is poisoned."""
        token = self.faults.nan_logits_token
        if token is None:
            return logits
        rows = [row for row, seq in enumerate(seqs) if _prompt_holds(seq, token)]
        if rows:
            logits[rows] = float("nan")
        return logits


def _prompt_holds(seq: Sequence, token: int) -> bool:
    return token in seq.token_ids[: seq.num_prompt_tokens]

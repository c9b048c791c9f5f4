"""Typed reads of environment variables: the one reader every Python process of thaw uses
(worker, RunPod queue handler, `thaw serve`). An empty value counts as unset."""

from __future__ import annotations

import math
from collections.abc import Mapping

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """An environment variable has a value the process cannot use."""


class EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or value == "" else value

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def optional_text(self, name: str) -> str | None:
        return self.raw(name)

    def integer(self, name: str, default: int, minimum: int | None = None) -> int:
        value = self.optional_integer(name, minimum)
        return default if value is None else value

    def optional_integer(self, name: str, minimum: int | None = None) -> int | None:
        raw = self.raw(name)
        if raw is None:
            return None
        kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise SettingsError(f"{name} must be {kind}, got {raw!r}")
        return value

    def number(self, name: str, default: float, positive: bool = False) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or (positive and not value > 0):
            kind = "a positive number" if positive else "a number"
            raise SettingsError(f"{name} must be {kind}, got {raw!r}")
        return value

    def options(self, name: str) -> dict[str, str | None]:
        """A comma-separated list of `key` or `key=value` items ("a,b=1" -> {a: None, b: "1"});
        empty when unset. Each key at most once."""
        raw = self.raw(name)
        options: dict[str, str | None] = {}
        for item in (raw or "").split(","):
            key, sep, value = item.strip().partition("=")
            key = key.strip()
            if not key:
                if item.strip():
                    raise SettingsError(f"{name}: {item.strip()!r} has no name")
                continue
            if key in options:
                raise SettingsError(f"{name}: {key} is given twice")
            options[key] = value.strip() if sep else None
        return options

    def flag(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in TRUE:
            return True
        if lowered in FALSE:
            return False
        raise SettingsError(f"{name} must be true or false, got {raw!r}")

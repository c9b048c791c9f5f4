"""Configuration of the RunPod queue handler, read from the environment once at start."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"
# worker-vllm defaults to 30; continuous batching wants more jobs in flight than that.
DEFAULT_CONCURRENCY = 64
# RunPod marks a worker unhealthy after 7 minutes of cold start; give up a little before.
DEFAULT_READY_TIMEOUT_S = 400.0


class ConfigError(ValueError):
    """An environment variable of the handler has a value it cannot use."""


@dataclass(frozen=True)
class HandlerConfig:
    gateway_url: str
    concurrency: int
    ready_timeout_s: float
    api_key: str | None
    # Command that starts a gateway when none answers at gateway_url; empty means `thaw serve`.
    gateway_cmd: tuple[str, ...]
    snapshot: str | None

    @property
    def gateway_port(self) -> int:
        return urlsplit(self.gateway_url).port or 80

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> HandlerConfig:
        url = env.get("THAW_GATEWAY_URL", DEFAULT_GATEWAY_URL).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"THAW_GATEWAY_URL must be an http(s) URL, got {url!r}")
        return cls(
            gateway_url=url,
            concurrency=_positive_int(env, "THAW_RUNPOD_CONCURRENCY", DEFAULT_CONCURRENCY),
            ready_timeout_s=_positive_float(
                env, "THAW_RUNPOD_READY_TIMEOUT", DEFAULT_READY_TIMEOUT_S
            ),
            api_key=env.get("THAW_API_KEY") or None,
            gateway_cmd=tuple(shlex.split(env.get("THAW_GATEWAY_CMD", ""))),
            snapshot=env.get("THAW_SNAPSHOT") or None,
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value

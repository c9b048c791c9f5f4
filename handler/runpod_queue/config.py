"""Configuration of the RunPod queue handler, read from the environment once at start."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from handler.env import EnvReader, SettingsError

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"
# worker-vllm defaults to 30; continuous batching wants more jobs in flight than that.
DEFAULT_CONCURRENCY = 64
# RunPod marks a worker unhealthy after 7 minutes of cold start; give up a little before.
DEFAULT_READY_TIMEOUT_S = 400.0


# The handler's settings errors are the environment reader's.
ConfigError = SettingsError


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
        read = EnvReader(env)
        url = read.text("THAW_GATEWAY_URL", DEFAULT_GATEWAY_URL).rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"THAW_GATEWAY_URL must be an http(s) URL, got {url!r}")
        return cls(
            gateway_url=url,
            concurrency=read.integer("THAW_RUNPOD_CONCURRENCY", DEFAULT_CONCURRENCY, minimum=1),
            ready_timeout_s=read.number(
                "THAW_RUNPOD_READY_TIMEOUT", DEFAULT_READY_TIMEOUT_S, positive=True
            ),
            api_key=read.optional_text("THAW_API_KEY"),
            gateway_cmd=tuple(shlex.split(read.text("THAW_GATEWAY_CMD", ""))),
            snapshot=read.optional_text("THAW_SNAPSHOT"),
        )

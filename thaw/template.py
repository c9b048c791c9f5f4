"""The deployment template (template.yaml): loading and validation.

RunPod has no file format of its own for an endpoint; this one holds what `thaw deploy` needs to
create or update one RunPod serverless template and its endpoint. Every error names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENDPOINT_TYPES = ("queue", "load_balancer")
SCALER_TYPES = ("QUEUE_DELAY", "REQUEST_COUNT")
# RunPod GPU pool ids (AMPERE_16, ADA_24, ADA_48_PRO, HOPPER_141, ...): a family and a memory size.
GPU_POOL = re.compile(r"^[A-Z]+_[0-9]+(_PRO)?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
IMAGE_REF = re.compile(r"^[a-z0-9][A-Za-z0-9._/:@-]*$")
CUDA_VERSION = re.compile(r"^[0-9]+\.[0-9]+$")
SNAPSHOT_URI = re.compile(r"^(s3://[^/\s]+(/\S*)?|/\S*)$")
DATA_CENTER = re.compile(r"^[A-Z]{2,3}(-[A-Z]+-[0-9]+)?$")
# Keys the template derives from other fields; setting them in env as well would be ambiguous.
DERIVED_ENV = ("THAW_SNAPSHOT", "PORT", "PORT_HEALTH")


class TemplateError(ValueError):
    """An invalid template; `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path


@dataclass(frozen=True)
class Volume:
    # A RunPod network volume attached to every worker (mounted at /runpod-volume).
    network_volume_id: str | None = None
    # A per-worker volume; serverless workers normally use a network volume instead.
    size_gb: int = 0
    mount_path: str = "/runpod-volume"


@dataclass(frozen=True)
class Scaler:
    type: str = "QUEUE_DELAY"
    value: int = 4


@dataclass(frozen=True)
class DeployTemplate:
    name: str
    image: str
    endpoint_type: str
    gpu_types: tuple[str, ...]
    snapshot: str
    gpu_count: int = 1
    workers_min: int = 0
    workers_max: int = 3
    idle_timeout_s: int = 5
    flashboot: bool = True
    execution_timeout_s: int = 600
    container_disk_gb: int = 20
    port: int = 8080
    volume: Volume = field(default_factory=Volume)
    scaler: Scaler = field(default_factory=Scaler)
    locations: tuple[str, ...] = ()
    cuda_versions: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def worker_env(self) -> dict[str, str]:
        """The container environment: the user's env plus what the template's fields imply.

        The gateway refuses to serve on a reachable address without an API key. Load-balancer
        workers are reached only through RunPod's proxy, which requires the RunPod API key, so
        they get the explicit opt-out unless the user set a key of their own; queue workers'
        gateways serve only the handler beside them, so they listen on loopback. Either can be
        overridden in `env`.
        """
        env = dict(self.env)
        env["THAW_SNAPSHOT"] = self.snapshot
        if self.endpoint_type == "load_balancer":
            env["PORT"] = str(self.port)
            env["PORT_HEALTH"] = str(self.port)
            if "THAW_API_KEY" not in env:
                env.setdefault("THAW_ALLOW_UNAUTHENTICATED", "true")
        else:
            env.setdefault("HOST", "127.0.0.1")
        return env


def load_template(path: str | Path) -> DeployTemplate:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise TemplateError("template", f"cannot read {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TemplateError("template", f"not valid YAML: {err}") from None
    return parse_template(data)


def parse_template(data: Any) -> DeployTemplate:
    if not isinstance(data, dict):
        raise TemplateError("template", "must be a mapping of fields")
    reader = _Reader(data, "")
    template = DeployTemplate(
        name=reader.text("name", pattern=re.compile(r"^\S.{0,190}$"), hint="1-191 characters"),
        image=reader.text("image", pattern=IMAGE_REF, hint="an image reference like repo/thaw:tag"),
        endpoint_type=reader.choice("endpoint_type", ENDPOINT_TYPES),
        gpu_types=reader.text_list("gpu_types", GPU_POOL, "RunPod GPU pool ids such as ADA_24"),
        snapshot=_snapshot(reader),
        gpu_count=reader.integer("gpu_count", 1, low=1, high=8),
        workers_min=reader.integer("workers_min", 0, low=0, high=1000),
        workers_max=reader.integer("workers_max", 3, low=1, high=1000),
        idle_timeout_s=reader.integer("idle_timeout_s", 5, low=1, high=3600),
        flashboot=reader.boolean("flashboot", True),
        execution_timeout_s=reader.integer("execution_timeout_s", 600, low=5, high=7 * 24 * 3600),
        container_disk_gb=reader.integer("container_disk_gb", 20, low=1, high=1000),
        port=reader.integer("port", 8080, low=1, high=65535),
        volume=_volume(reader.section("volume")),
        scaler=_scaler(reader.section("scaler")),
        locations=reader.text_list("locations", DATA_CENTER, "ids like US or EU-RO-1", 0),
        cuda_versions=reader.text_list("cuda_versions", CUDA_VERSION, "versions like 12.8", 0),
        env=_env(reader),
    )
    reader.no_unknown_fields()
    if template.workers_min > template.workers_max:
        raise TemplateError("workers_min", f"{template.workers_min} is above workers_max")
    return template


def _snapshot(reader: _Reader) -> str:
    return reader.text(
        "snapshot",
        pattern=SNAPSHOT_URI,
        hint="an absolute path in the image or volume, or s3://bucket/prefix",
    )


def _volume(reader: _Reader) -> Volume:
    volume = Volume(
        network_volume_id=reader.optional_text("network_volume_id", re.compile(r"^[a-z0-9]+$")),
        size_gb=reader.integer("size_gb", 0, low=0, high=4000),
        mount_path=reader.text(
            "mount_path", "/runpod-volume", pattern=re.compile(r"^/\S*$"), hint="an absolute path"
        ),
    )
    reader.no_unknown_fields()
    return volume


def _scaler(reader: _Reader) -> Scaler:
    scaler = Scaler(
        type=reader.choice("type", SCALER_TYPES, "QUEUE_DELAY"),
        value=reader.integer("value", 4, low=1, high=10000),
    )
    reader.no_unknown_fields()
    return scaler


def _env(reader: _Reader) -> dict[str, str]:
    raw = reader.data.get("env", {})
    reader.seen.add("env")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TemplateError("env", "must be a mapping of NAME: value")
    env: dict[str, str] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise TemplateError(f"env.{name}", "is not a valid environment variable name")
        if name in DERIVED_ENV:
            raise TemplateError(f"env.{name}", "is set by the template itself; use its field")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TemplateError(f"env.{name}", "must be a string or a number")
        env[name] = str(value)
    return env


class _Reader:
    """Typed access to one mapping of the template that remembers which keys were read."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def _path(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _get(self, key: str, default: Any) -> Any:
        self.seen.add(key)
        value = self.data.get(key, default)
        if value is _REQUIRED:
            raise TemplateError(self._path(key), "is required")
        return value

    def text(self, key: str, default: Any = None, *, pattern: re.Pattern[str], hint: str) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not pattern.match(value):
            raise TemplateError(self._path(key), f"must be {hint}, got {value!r}")
        return value

    def optional_text(self, key: str, pattern: re.Pattern[str]) -> str | None:
        value = self._get(key, None)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or not pattern.match(value):
            raise TemplateError(self._path(key), f"is not a valid id: {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if value not in options:
            raise TemplateError(
                self._path(key), f"must be one of {', '.join(options)}, got {value!r}"
            )
        return value

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TemplateError(
                self._path(key), f"must be an integer from {low} to {high}, got {value!r}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise TemplateError(self._path(key), f"must be true or false, got {value!r}")
        return value

    def text_list(
        self, key: str, pattern: re.Pattern[str], hint: str, min_items: int = 1
    ) -> tuple[str, ...]:
        value = self._get(key, _REQUIRED if min_items else [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or len(value) < min_items:
            raise TemplateError(self._path(key), f"must be a list of {hint}")
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise TemplateError(self._path(key), f"{item!r} is not one of {hint}")
        return tuple(value)

    def section(self, key: str) -> _Reader:
        value = self._get(key, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise TemplateError(self._path(key), "must be a mapping")
        return _Reader(value, f"{self._path(key)}.")

    def no_unknown_fields(self) -> None:
        unknown = sorted(set(map(str, self.data)) - self.seen)
        if unknown:
            raise TemplateError(self._path(unknown[0]), "is not a template field")


_REQUIRED = object()

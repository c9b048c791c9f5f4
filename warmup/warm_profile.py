"""The warm profile: what start-up measured on one kind of GPU, kept in the snapshot's manifest so
the next cold start on the same kind skips the measuring.

Stored in manifest.json under warm_profiles["<gpu name>|<total memory GiB>"]. manifest.json is
not in its own checksum list, so adding profiles leaves the snapshot verifiable. Writes replace
the manifest atomically (temporary file + rename, under a lock on the snapshot directory), and a
read-only snapshot only costs a warning: the profile is an optimisation, never a requirement.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from snapshot.errors import SnapshotError
from snapshot.manifest import MANIFEST, load_manifest, parse_manifest

log = logging.getLogger(__name__)

PROFILES_KEY = "warm_profiles"
GIB = 1 << 30


def profile_key(gpu_name: str, total_memory_bytes: int) -> str:
    """'NVIDIA H200|140': one profile per GPU model and memory size."""
    if not gpu_name or "|" in gpu_name:
        raise ValueError(f"bad GPU name {gpu_name!r}")
    return f"{gpu_name}|{round(total_memory_bytes / GIB)}"


@dataclass(frozen=True)
class WarmSettings:
    """The configuration a profile was measured under; another configuration measures anew."""

    block_size: int
    max_batch: int
    memory_fraction: float
    kv_cache_dtype: str


@dataclass
class WarmProfile:
    gpu_name: str
    total_memory_gib: int
    settings: WarmSettings
    capture_sizes: list[int]
    num_kv_blocks: int
    activation_headroom_bytes: int
    # Seconds each start-up phase took when measured (e.g. "kv_sizing", "capture_b32").
    timings: dict[str, float] = field(default_factory=dict)
    torch_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.gpu_name}|{self.total_memory_gib}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> WarmProfile:
        """Parse a stored profile; ValueError naming the first bad field."""
        if not isinstance(value, dict):
            raise ValueError("a warm profile must be a JSON object")
        settings = value.get("settings")
        if not isinstance(settings, dict) or set(settings) != {
            f.name for f in fields(WarmSettings)
        }:
            raise ValueError("warm profile 'settings' is missing or incomplete")
        profile = cls(
            gpu_name=_typed(value, "gpu_name", str),
            total_memory_gib=_typed(value, "total_memory_gib", int),
            settings=WarmSettings(
                block_size=_typed(settings, "block_size", int),
                max_batch=_typed(settings, "max_batch", int),
                memory_fraction=float(_typed(settings, "memory_fraction", (int, float))),
                kv_cache_dtype=_typed(settings, "kv_cache_dtype", str),
            ),
            capture_sizes=_typed(value, "capture_sizes", list),
            num_kv_blocks=_typed(value, "num_kv_blocks", int),
            activation_headroom_bytes=_typed(value, "activation_headroom_bytes", int),
            timings=_typed(value, "timings", dict),
            torch_version=_typed(value, "torch_version", str),
        )
        if not all(isinstance(s, int) and s > 0 for s in profile.capture_sizes):
            raise ValueError("warm profile 'capture_sizes' must be positive integers")
        if profile.num_kv_blocks < 1:
            raise ValueError("warm profile 'num_kv_blocks' must be >= 1")
        return profile


def _typed(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"warm profile field {name!r} is missing or of the wrong type")
    return value


def read_warm_profile(
    snapshot_dir: str | Path, key: str, settings: WarmSettings
) -> WarmProfile | None:
    """The stored profile for this GPU kind if it was measured under these settings, else None.

    A damaged or foreign profile is logged and ignored (start-up measures again).
    """
    manifest = load_manifest(Path(snapshot_dir))
    stored = manifest.get(PROFILES_KEY, {})
    if not isinstance(stored, dict) or key not in stored:
        return None
    try:
        profile = WarmProfile.from_json(stored[key])
    except ValueError as exc:
        log.warning("ignoring the warm profile for %s: %s", key, exc)
        return None
    if profile.key != key:
        log.warning("ignoring the warm profile stored under %s: it is for %s", key, profile.key)
        return None
    if profile.settings != settings:
        log.info(
            "warm profile for %s was measured with %s, now %s: measuring again",
            key,
            profile.settings,
            settings,
        )
        return None
    return profile


def write_warm_profile(snapshot_dir: str | Path, profile: WarmProfile) -> bool:
    """Store the profile under its key, replacing manifest.json atomically. False (with a
    warning) when the snapshot cannot be written, e.g. a read-only volume."""
    directory = Path(snapshot_dir)
    try:
        with _locked(directory):
            manifest = load_manifest(directory)
            profiles = manifest.get(PROFILES_KEY)
            if not isinstance(profiles, dict):
                profiles = {}
            profiles[profile.key] = profile.to_json()
            manifest[PROFILES_KEY] = profiles
            parse_manifest(manifest)
            _replace_atomically(directory / MANIFEST, manifest)
    except (OSError, SnapshotError) as exc:
        log.warning("could not store the warm profile in %s: %s", directory, exc)
        return False
    return True


class _locked:
    """An exclusive flock on the snapshot directory, so two workers' updates don't interleave."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.directory, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _replace_atomically(path: Path, value: dict[str, Any]) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)

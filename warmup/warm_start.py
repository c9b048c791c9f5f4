"""Start-up sizing with the warm profile: reuse what an earlier start measured on this GPU kind,
or measure (a profiling step, then the free memory) and record it for the next start.

The engine supplies the pieces that need its model: a dummy step at the largest batch (for the
activation peak) and the free-memory reading; both are skipped when a matching profile exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from warmup.cuda_graphs import CaptureTiming, capture_sizes
from warmup.kv_sizing import KVCacheShape, size_from_free_memory
from warmup.warm_profile import (
    WarmProfile,
    WarmSettings,
    profile_key,
    read_warm_profile,
    write_warm_profile,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuKind:
    name: str
    total_memory_bytes: int

    @property
    def total_memory_gib(self) -> int:
        return round(self.total_memory_bytes / (1 << 30))

    @property
    def key(self) -> str:
        return profile_key(self.name, self.total_memory_bytes)

    @classmethod
    def of(cls, device: torch.device) -> GpuKind:
        props = torch.cuda.get_device_properties(device)
        return cls(props.name, props.total_memory)


@dataclass(frozen=True)
class StartPlan:
    num_kv_blocks: int
    capture_sizes: list[int]
    activation_headroom_bytes: int
    from_profile: bool
    seconds: float  # what planning took (near zero with a profile)


def plan_start(
    snapshot_dir: str | Path | None,
    gpu: GpuKind,
    settings: WarmSettings,
    cache: KVCacheShape,
    measure_step_bytes: Callable[[], int],
    free_bytes: Callable[[], int],
    min_blocks: int = 1,
) -> StartPlan:
    """KV blocks and capture sizes for this start: from the stored profile when it matches this
    GPU kind and settings, else measured (measure_step_bytes runs the profiling step). Without a
    snapshot directory there is no profile to read: it measures. max_batch 0 captures nothing."""
    started = time.perf_counter()
    profile = None
    if snapshot_dir is not None:
        profile = read_warm_profile(snapshot_dir, gpu.key, settings)
    if profile is not None:
        log.info(
            "warm profile for %s: %d KV blocks, no profiling pass", gpu.key, profile.num_kv_blocks
        )
        return StartPlan(
            profile.num_kv_blocks,
            list(profile.capture_sizes),
            profile.activation_headroom_bytes,
            from_profile=True,
            seconds=time.perf_counter() - started,
        )
    headroom = measure_step_bytes()
    sizing = size_from_free_memory(
        free_bytes(), cache, settings.memory_fraction, headroom, min_blocks
    )
    log.info("measured on %s: %s", gpu.key, sizing.describe())
    return StartPlan(
        sizing.num_blocks,
        capture_sizes(settings.max_batch) if settings.max_batch else [],
        headroom,
        from_profile=False,
        seconds=time.perf_counter() - started,
    )


def record_start(
    snapshot_dir: str | Path | None,
    gpu: GpuKind,
    settings: WarmSettings,
    plan: StartPlan,
    captures: list[CaptureTiming],
) -> bool:
    """Store a freshly measured plan (and how long its captures took) for the next start."""
    if plan.from_profile or snapshot_dir is None:
        return False
    timings = {"planning": plan.seconds} | {f"capture_b{c.batch}": c.seconds for c in captures}
    profile = WarmProfile(
        gpu_name=gpu.name,
        total_memory_gib=gpu.total_memory_gib,
        settings=settings,
        capture_sizes=plan.capture_sizes,
        num_kv_blocks=plan.num_kv_blocks,
        activation_headroom_bytes=plan.activation_headroom_bytes,
        timings=timings,
        torch_version=torch.__version__,
    )
    return write_warm_profile(snapshot_dir, profile)

"""The engine's start on a CUDA device: KV blocks from the memory left after the weights (or from
the warm profile of this GPU kind), and the profile recorded for the next start.

The device readings come in as callables so that the choices are testable on a CPU with made-up
figures; warmup.kv_sizing's cuda_free_bytes and measured_headroom are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from handler.engine.config import EngineConfig
from warmup.cuda_graphs import CaptureTiming
from warmup.kv_sizing import KVCacheShape
from warmup.warm_profile import WarmSettings
from warmup.warm_start import GpuKind, StartPlan, plan_start, record_start


def warm_settings(config: EngineConfig, kv_dtype_name: str) -> WarmSettings:
    """The settings a warm profile depends on: another value of any of them measures anew."""
    return WarmSettings(
        block_size=config.block_size,
        max_batch=config.graph_max_batch,
        memory_fraction=config.gpu_memory_fraction,
        kv_cache_dtype=kv_dtype_name,
    )


@dataclass
class DeviceStart:
    """What this start decided, kept until the graphs are captured and the profile recorded."""

    snapshot_dir: str | None
    gpu: GpuKind
    settings: WarmSettings
    plan: StartPlan

    @property
    def num_kv_blocks(self) -> int:
        return self.plan.num_kv_blocks

    def record(self, captures: list[CaptureTiming]) -> bool:
        """Store a measured plan in the snapshot's manifest; False when nothing was written."""
        return record_start(self.snapshot_dir, self.gpu, self.settings, self.plan, captures)


def plan_device_start(
    config: EngineConfig,
    cache: KVCacheShape,
    kv_dtype_name: str,
    gpu: GpuKind,
    measure_step_bytes: Callable[[], int],
    free_bytes: Callable[[], int],
) -> DeviceStart:
    """KV blocks and capture sizes: the warm profile's when it matches, else measured."""
    settings = warm_settings(config, kv_dtype_name)
    plan = plan_start(
        config.snapshot_dir, gpu, settings, cache, measure_step_bytes, free_bytes, min_blocks=1
    )
    return DeviceStart(config.snapshot_dir, gpu, settings, plan)

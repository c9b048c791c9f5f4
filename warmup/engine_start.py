"""The engine's start on a CUDA device: KV blocks from the memory left after the weights (or from
the warm profile of this GPU kind), decode CUDA graphs after the cache is allocated, and the
profile recorded for the next start.

The device readings come in as callables so that the choices are testable on a CPU with made-up
figures; cuda_free_bytes and measure_peak_step_bytes are the real ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from warmup.cuda_graphs import CaptureTiming
from warmup.kv_sizing import DEFAULT_WORKSPACE_BYTES, KVCacheShape, measure_peak_step_bytes
from warmup.warm_profile import WarmSettings
from warmup.warm_start import GpuKind, StartPlan, plan_start, record_start


@dataclass(frozen=True)
class DeviceStartConfig:
    """The engine settings a CUDA start depends on."""

    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    memory_fraction: float
    cuda_graph_max_batch: int  # 0 = no graphs
    snapshot_dir: str | Path | None

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")

    @property
    def graph_max_batch(self) -> int:
        # A decode step never holds more sequences than the scheduler runs at once.
        return min(self.cuda_graph_max_batch, self.max_num_seqs)

    def warm_settings(self, kv_dtype: torch.dtype) -> WarmSettings:
        return WarmSettings(
            block_size=self.block_size,
            max_batch=self.graph_max_batch,
            memory_fraction=self.memory_fraction,
            kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
        )


@dataclass
class DeviceStart:
    """What this start decided, kept until the graphs are captured and the profile recorded."""

    config: DeviceStartConfig
    gpu: GpuKind
    settings: WarmSettings
    plan: StartPlan

    @property
    def num_kv_blocks(self) -> int:
        return self.plan.num_kv_blocks

    def record(self, captures: list[CaptureTiming]) -> bool:
        """Store a measured plan in the snapshot's manifest; False when nothing was written."""
        return record_start(self.config.snapshot_dir, self.gpu, self.settings, self.plan, captures)


def plan_device_start(
    config: DeviceStartConfig,
    cache: KVCacheShape,
    kv_dtype: torch.dtype,
    gpu: GpuKind,
    measure_step_bytes: Callable[[], int],
    free_bytes: Callable[[], int],
) -> DeviceStart:
    """KV blocks and capture sizes: the warm profile's when it matches, else measured."""
    settings = config.warm_settings(kv_dtype)
    plan = plan_start(
        config.snapshot_dir, gpu, settings, cache, measure_step_bytes, free_bytes, min_blocks=1
    )
    return DeviceStart(config, gpu, settings, plan)


def cuda_free_bytes(device: torch.device) -> int:
    """Free device memory now, with the allocator's cached-but-unused blocks handed back."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return free


def measured_headroom(run_step: Callable[[], None], device: torch.device) -> int:
    """One profiling step's peak plus what no allocator statistic sees (cuBLAS workspaces, the
    graph pool, fragmentation)."""
    return measure_peak_step_bytes(run_step, device) + DEFAULT_WORKSPACE_BYTES

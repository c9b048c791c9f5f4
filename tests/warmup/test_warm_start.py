"""The first start on a GPU kind measures and records; the next one reads the profile instead."""

from __future__ import annotations

import pytest

from tests.warmup.test_warm_profile import SETTINGS, snapshot_dir  # noqa: F401 - fixture
from warmup.cuda_graphs import CaptureTiming
from warmup.kv_sizing import GIB, KVCacheShape
from warmup.warm_profile import WarmSettings
from warmup.warm_start import GpuKind, plan_start, record_start

H200 = GpuKind("NVIDIA H200", 150_754_820_096)
CACHE = KVCacheShape(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype_bytes=2)


class Measurements:
    """Counts the expensive calls a warm start must skip."""

    def __init__(self, step_bytes: int, free: int) -> None:
        self.step_bytes, self.free, self.calls = step_bytes, free, 0

    def step(self) -> int:
        self.calls += 1
        return self.step_bytes

    def free_bytes(self) -> int:
        self.calls += 1
        return self.free


def test_first_start_measures_and_the_second_reuses(snapshot_dir):  # noqa: F811
    cold = Measurements(step_bytes=2 * GIB, free=100 * GIB)
    plan = plan_start(snapshot_dir, H200, SETTINGS, CACHE, cold.step, cold.free_bytes)
    assert not plan.from_profile and cold.calls == 2
    assert plan.num_kv_blocks == 256_318  # (100 GiB * 0.9 - 2 GiB) // 368640
    assert plan.capture_sizes[:5] == [1, 2, 4, 8, 16] and plan.capture_sizes[-1] == 256
    captures = [CaptureTiming(b, 0.05) for b in reversed(plan.capture_sizes)]
    assert record_start(snapshot_dir, H200, SETTINGS, plan, captures)

    warm = Measurements(step_bytes=0, free=0)
    again = plan_start(snapshot_dir, H200, SETTINGS, CACHE, warm.step, warm.free_bytes)
    assert again.from_profile and warm.calls == 0
    assert again.num_kv_blocks == plan.num_kv_blocks
    assert again.capture_sizes == plan.capture_sizes
    assert not record_start(snapshot_dir, H200, SETTINGS, again, [])  # nothing new to store


def test_another_gpu_kind_or_setting_measures_again(snapshot_dir):  # noqa: F811
    first = Measurements(2 * GIB, 100 * GIB)
    plan = plan_start(snapshot_dir, H200, SETTINGS, CACHE, first.step, first.free_bytes)
    record_start(snapshot_dir, H200, SETTINGS, plan, [])
    h100 = GpuKind("NVIDIA H100 80GB HBM3", 85_032_084_480)
    other = Measurements(GIB, 60 * GIB)
    assert not plan_start(
        snapshot_dir, h100, SETTINGS, CACHE, other.step, other.free_bytes
    ).from_profile
    smaller_batch = WarmSettings(16, 64, 0.9, "bf16")
    again = Measurements(GIB, 60 * GIB)
    plan = plan_start(snapshot_dir, H200, smaller_batch, CACHE, again.step, again.free_bytes)
    assert not plan.from_profile and plan.capture_sizes[-1] == 64


def test_too_little_memory_fails_before_anything_is_recorded(snapshot_dir):  # noqa: F811
    tight = Measurements(step_bytes=GIB, free=GIB)
    with pytest.raises(ValueError, match="KV blocks"):
        plan_start(snapshot_dir, H200, SETTINGS, CACHE, tight.step, tight.free_bytes, 10_000)

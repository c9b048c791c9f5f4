"""KV-cache sizing from made-up free-memory figures (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from warmup.kv_sizing import (
    GIB,
    KVCacheShape,
    KVCacheTooSmall,
    measure_peak_step_bytes,
    size_from_free_memory,
)

# SmolLM2-135M in bfloat16: 30 layers, 3 KV heads of 64, 16-token blocks.
SMOLLM = KVCacheShape(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16, dtype_bytes=2)
# Llama-3-8B-like: 32 layers, 8 KV heads of 128.
LLAMA8B = KVCacheShape(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype_bytes=2)


def test_bytes_per_block_counts_keys_values_and_layers():
    assert SMOLLM.bytes_per_block == 368_640  # 2 * 30 * 16 * 3 * 64 * 2
    assert LLAMA8B.bytes_per_block == 2 * 1024 * 1024


def test_blocks_from_free_memory_fraction_and_headroom():
    sizing = size_from_free_memory(100 * GIB, SMOLLM, memory_fraction=0.9, headroom_bytes=2 * GIB)
    # (100 GiB * 0.9 - 2 GiB) // 368640 bytes
    assert sizing.num_blocks == 256_318
    assert sizing.kv_cache_bytes <= 88 * GIB
    assert sizing.kv_cache_bytes > 88 * GIB - SMOLLM.bytes_per_block
    assert "256318 KV blocks" in sizing.describe()


def test_more_fraction_or_less_headroom_gives_more_blocks():
    base = size_from_free_memory(40 * GIB, LLAMA8B, 0.8, GIB).num_blocks
    assert size_from_free_memory(40 * GIB, LLAMA8B, 0.9, GIB).num_blocks > base
    assert size_from_free_memory(40 * GIB, LLAMA8B, 0.8, 0).num_blocks > base
    assert base == (int(40 * GIB * 0.8) - GIB) // (2 << 20)


def test_too_little_memory_is_a_clear_error():
    with pytest.raises(KVCacheTooSmall, match="at least 64 are needed"):
        size_from_free_memory(GIB, LLAMA8B, 0.9, headroom_bytes=900 << 20, min_blocks=64)
    # Headroom larger than the free memory must not go negative silently.
    with pytest.raises(KVCacheTooSmall, match="room for 0 KV blocks"):
        size_from_free_memory(GIB, LLAMA8B, 0.9, headroom_bytes=2 * GIB)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="memory_fraction"):
        size_from_free_memory(GIB, SMOLLM, fraction)


def test_bad_cache_shape_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheShape(num_layers=2, num_kv_heads=1, head_dim=64, block_size=0, dtype_bytes=2)


def test_measuring_the_step_peak_refuses_the_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        measure_peak_step_bytes(lambda: None, torch.device("cpu"))

"""How many KV-cache blocks fit: free device memory after the weights are in, times a configurable
fraction, less headroom for one step's activations at the largest batch.

The arithmetic is pure (tested on the CPU with made-up numbers); cuda_free_bytes and
measured_headroom are the device readings that feed it. A CPU engine sizes from a byte budget
instead (handler/engine/kv_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# cuBLAS workspaces, the CUDA-graph pool and allocator slack that no formula below sees.
DEFAULT_WORKSPACE_BYTES = 512 << 20
GIB = 1 << 30


class KVCacheTooSmall(ValueError):
    """The memory left over cannot hold the minimum number of blocks."""


@dataclass(frozen=True)
class KVCacheShape:
    """What one block of the cache holds, over all layers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def bytes_per_block(self) -> int:
        # Keys and values, every layer.
        return (
            2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        ) * self.dtype_bytes


@dataclass(frozen=True)
class KVSizing:
    num_blocks: int
    bytes_per_block: int
    budget_bytes: int  # what the cache may use, after the fraction and the headroom
    free_bytes: int | None  # None when sized from a plain byte budget
    memory_fraction: float | None
    activation_headroom_bytes: int

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def describe(self) -> str:
        text = f"{self.num_blocks} KV blocks ({self.kv_cache_bytes / GIB:.2f} GiB)"
        if self.free_bytes is not None:
            text += (
                f" from {self.free_bytes / GIB:.2f} GiB free x {self.memory_fraction}"
                f" - {self.activation_headroom_bytes / GIB:.2f} GiB activation headroom"
            )
        return text


def _blocks_from_budget(budget: int, cache: KVCacheShape, min_blocks: int, why: str) -> int:
    blocks = max(budget, 0) // cache.bytes_per_block
    if blocks < min_blocks:
        raise KVCacheTooSmall(
            f"{why} leaves room for {blocks} KV blocks of {cache.bytes_per_block} bytes; "
            f"at least {min_blocks} are needed (one sequence at full length). Lower max_model_len "
            "or max_num_seqs, raise the memory fraction, or use a smaller model"
        )
    return blocks


def size_from_free_memory(
    free_bytes: int,
    cache: KVCacheShape,
    memory_fraction: float,
    headroom_bytes: int = 0,
    min_blocks: int = 1,
) -> KVSizing:
    """Blocks that fit in free_bytes * memory_fraction - headroom_bytes.

    free_bytes is the device's free memory measured after the weights were loaded, so the weights
    are already accounted for.
    """
    if not 0.0 < memory_fraction <= 1.0:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if free_bytes < 0 or headroom_bytes < 0:
        raise ValueError("free_bytes and headroom_bytes must be >= 0")
    budget = int(free_bytes * memory_fraction) - headroom_bytes
    why = (
        f"{free_bytes / GIB:.2f} GiB free x {memory_fraction} - "
        f"{headroom_bytes / GIB:.2f} GiB headroom"
    )
    return KVSizing(
        num_blocks=_blocks_from_budget(budget, cache, min_blocks, why),
        bytes_per_block=cache.bytes_per_block,
        budget_bytes=max(budget, 0),
        free_bytes=free_bytes,
        memory_fraction=memory_fraction,
        activation_headroom_bytes=headroom_bytes,
    )


def measure_peak_step_bytes(run_step: Callable[[], None], device: torch.device) -> int:
    """Run one dummy step at the largest batch and return the memory it needed beyond what was
    allocated before: the measured activation headroom a warm profile records."""
    if device.type != "cuda":
        raise ValueError(f"measuring activation memory needs a CUDA device, got {device}")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run_step()
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - before, 0)


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

"""Sizing and allocating the paged KV cache."""

from __future__ import annotations

import torch

from handler.model import KVCaches, ModelConfig

# Used when the engine config gives neither a block count nor a byte budget.
DEFAULT_KV_CACHE_BYTES = 1 << 30
# glibc serves allocations above its mmap threshold (at most 32 MiB) with fresh anonymous pages.
FRESH_PAGES_BYTES = 64 << 20


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element


def resolve_num_blocks(
    model: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    num_kv_blocks: int | None,
    kv_cache_bytes: int | None,
    max_num_seqs: int,
    max_model_len: int,
) -> int:
    if num_kv_blocks is not None:
        blocks = num_kv_blocks
    elif kv_cache_bytes is not None:
        blocks = kv_cache_bytes // bytes_per_block(model, block_size, dtype)
    else:
        # Room for every sequence at full length, within a default byte budget.
        wanted = max_num_seqs * -(-max_model_len // block_size)
        affordable = DEFAULT_KV_CACHE_BYTES // bytes_per_block(model, block_size, dtype)
        blocks = min(wanted, affordable)
    if blocks < 1:
        raise ValueError(f"the KV cache must hold at least one block, got {blocks}")
    return blocks


def allocate_kv_caches(
    model: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> KVCaches:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].

    One zeroed allocation: padding positions are masked out of attention, and zeros keep their
    never-written values finite so a masked weight of 0 cannot meet a NaN. On the CPU the
    allocation is large enough that the allocator maps fresh pages, which the kernel hands out
    zero-filled on first touch: `empty` is as zeroed as `zeros` there, without writing a gigabyte
    during the cold start (`zeros` would cost ~1.5 s on the 2-core machines).
    """
    shape = (model.num_layers, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and nbytes >= FRESH_PAGES_BYTES:
        storage = torch.empty(shape, dtype=dtype, device=device)
    else:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    return [(storage[i, 0], storage[i, 1]) for i in range(model.num_layers)]

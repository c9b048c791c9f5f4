"""Sizing and allocating the paged KV cache."""

from __future__ import annotations

import mmap

import torch

from handler.model import KVCaches, ModelConfig
from handler.model.kv_layout import KVLayout
from warmup.kv_sizing import KVCacheShape

# Used when the engine config gives neither a block count nor a byte budget.
DEFAULT_KV_CACHE_BYTES = 1 << 30
# CPU caches from this size on are mapped fresh rather than zero-filled (allocate_kv_caches).
FRESH_PAGES_BYTES = 64 << 20


def cache_shape(
    model: ModelConfig, block_size: int, dtype: torch.dtype, layout: KVLayout | None = None
) -> KVCacheShape:
    """A block's shape: a page in each cache tensor (one per layer without groups)."""
    return KVCacheShape(
        model.num_layers if layout is None else layout.slots,
        model.num_kv_heads,
        model.head_dim,
        block_size,
        torch.empty((), dtype=dtype).element_size(),
    )


def resolve_num_blocks(
    model: ModelConfig,
    block_size: int,
    dtype: torch.dtype,
    num_kv_blocks: int | None,
    kv_cache_bytes: int | None,
    max_num_seqs: int,
    max_model_len: int,
    layout: KVLayout | None = None,
    chunk: int | None = None,
) -> int:
    """chunk: the most tokens a sequence computes in a step (window groups hold those too)."""
    per_block = cache_shape(model, block_size, dtype, layout).bytes_per_block
    if num_kv_blocks is not None:
        blocks = num_kv_blocks
    elif kv_cache_bytes is not None:
        blocks = kv_cache_bytes // per_block
    else:
        # Room for every sequence at full length, within a default byte budget.
        per_seq = -(-max_model_len // block_size)
        if layout is not None:
            per_seq = layout.blocks_for(max_model_len, block_size, chunk or max_model_len)
        wanted = max_num_seqs * per_seq
        blocks = min(wanted, DEFAULT_KV_CACHE_BYTES // per_block)
    if blocks < 1:
        raise ValueError(f"the KV cache must hold at least one block, got {blocks}")
    return blocks


def longest_fitting(
    layout: KVLayout, num_blocks: int, block_size: int, chunk: int, context: int
) -> int:
    """The longest sequence (at most `context`) whose blocks fit in num_blocks on its own, so
    that preempting everyone else always lets it go on."""
    if layout.blocks_for(context, block_size, chunk) <= num_blocks:
        return context
    low, high = 0, context  # blocks_for(low) fits, blocks_for(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        if layout.blocks_for(middle, block_size, chunk) <= num_blocks:
            low = middle
        else:
            high = middle
    return low


def allocate_kv_caches(
    model: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    layout: KVLayout | None = None,
) -> KVCaches:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]: the
    layout's cache tensor of that layer (without a layout, one per layer).

    One zeroed allocation: padding positions are masked out of attention, and zeros keep their
    never-written values finite so a masked weight of 0 cannot meet a NaN. On the CPU a large
    cache is an anonymous memory map, whose pages the kernel hands out zero-filled on first
    touch: as zeroed as `zeros`, without writing a gigabyte during the cold start. Not `empty`:
    malloc may serve that from memory freed earlier in the process, dirty.
    """
    layout = layout or KVLayout.single(model.num_layers)
    shape = (layout.slots, 2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and nbytes >= FRESH_PAGES_BYTES:
        storage = _fresh_pages(nbytes, dtype).view(shape)
    else:
        storage = torch.zeros(shape, dtype=dtype, device=device)
    return [(storage[s, 0], storage[s, 1]) for s in layout.layer_slots]


def _fresh_pages(nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    # The tensor keeps the mapping alive; it is unmapped when the last view of it is freed.
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=dtype)

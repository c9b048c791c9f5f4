"""Attention backends by name, imported only when chosen (GPU backends need triton/CUDA)."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from handler.attention.base import AttentionBackend

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "torch": "handler.attention.torch_backend:TorchAttentionBackend",
    "cpu": "handler.attention.cpu_paged:CpuPagedBackend",
    "triton": "handler.attention.triton_paged:TritonPagedBackend",
    "flash": "handler.attention.flash:FlashAttentionBackend",
}
AUTO = "auto"
# Backends that read only device tensors (and ints fixed per graph), so a decode step through them
# can be captured in a CUDA graph. The torch reference reads the metadata's host lists.
GRAPH_SAFE_BACKENDS = frozenset({"triton", "flash"})
FLASH_BLOCK_MULTIPLE = 256  # flash-attn's paged KV needs block sizes divisible by this


def resolve_backend_name(
    name: str, device: torch.device, block_size: int, cpu_kernels: bool = False
) -> str:
    """The concrete backend for a configured name; "auto" picks by device and block size:
    flash on CUDA where it imports and the block size suits it, else triton; off CUDA, cpu
    when the fused CPU kernels serve this model (cpu_kernels), else torch."""
    if name != AUTO:
        if name not in BACKENDS:
            known = ", ".join([AUTO, *BACKENDS])
            raise ValueError(f"unknown attention backend {name!r}; known: {known}")
        return name
    if device.type != "cuda":
        return "cpu" if cpu_kernels else "torch"
    if block_size % FLASH_BLOCK_MULTIPLE == 0 and importlib.util.find_spec("flash_attn"):
        return "flash"
    return "triton"


def create_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()

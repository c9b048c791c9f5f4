"""Attention backends by name, imported only when chosen (GPU backends need triton/CUDA)."""

from __future__ import annotations

import torch

from handler.attention.base import AttentionBackend
from handler.attention.flash import FLASH_BLOCK_MULTIPLE, flash_attn_available

BACKENDS = ("torch", "cpu", "triton", "flash")
AUTO = "auto"
# Backends that read only device tensors (and ints fixed per graph), so a decode step through them
# can be captured in a CUDA graph. The torch reference reads the metadata's host lists.
GRAPH_SAFE_BACKENDS = frozenset({"triton", "flash"})


def _unknown(name: str, known: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown attention backend {name!r}; known: {', '.join(known)}")


def resolve_backend_name(
    name: str, device: torch.device, block_size: int, cpu_kernels: bool = False
) -> str:
    """The concrete backend for a configured name; "auto" picks by device and block size:
    flash on CUDA where it imports and the block size suits it, else triton; off CUDA, cpu
    when the fused CPU kernels serve this model (cpu_kernels), else torch."""
    if name != AUTO:
        if name not in BACKENDS:
            raise _unknown(name, (AUTO, *BACKENDS))
        return name
    if device.type != "cuda":
        return "cpu" if cpu_kernels else "torch"
    if block_size % FLASH_BLOCK_MULTIPLE == 0 and flash_attn_available():
        return "flash"
    return "triton"


def create_backend(name: str) -> AttentionBackend:
    # Each branch imports its module: triton and flash_attn load only when chosen.
    if name == "torch":
        from handler.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "cpu":
        from handler.attention.cpu_paged import CpuPagedBackend

        return CpuPagedBackend()
    if name == "triton":
        from handler.attention.triton_paged import TritonPagedBackend

        return TritonPagedBackend()
    if name == "flash":
        from handler.attention.flash import FlashAttentionBackend

        return FlashAttentionBackend()
    raise _unknown(name, BACKENDS)

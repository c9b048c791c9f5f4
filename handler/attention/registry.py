"""Attention backends by name, imported only when chosen (GPU backends need triton/CUDA)."""

from __future__ import annotations

import torch

from handler.attention.base import (
    FEATURE_NAMES,
    LOGIT_SOFTCAP,
    SLIDING_WINDOW,
    AttentionBackend,
)
from handler.attention.flash import FLASH_BLOCK_MULTIPLE, flash_attn_available

BACKENDS = ("torch", "cpu", "triton", "flash")
AUTO = "auto"
# Backends that read only device tensors (and ints fixed per graph), so a decode step through them
# can be captured in a CUDA graph. The torch reference reads the metadata's host lists.
GRAPH_SAFE_BACKENDS = frozenset({"triton", "flash"})
# The per-layer attention features (base.py) each backend implements; the others refuse them.
FEATURES: dict[str, frozenset[str]] = {
    "torch": frozenset({SLIDING_WINDOW, LOGIT_SOFTCAP}),
    "cpu": frozenset({SLIDING_WINDOW, LOGIT_SOFTCAP}),
    "triton": frozenset({SLIDING_WINDOW, LOGIT_SOFTCAP}),
    "flash": frozenset({SLIDING_WINDOW, LOGIT_SOFTCAP}),
}


def missing_features(name: str, needs: frozenset[str]) -> list[str]:
    """The features in `needs` that backend `name` lacks, as words, in a stable order."""
    return [FEATURE_NAMES[f] for f in sorted(needs - FEATURES.get(name, frozenset()))]


def _unknown(name: str, known: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown attention backend {name!r}; known: {', '.join(known)}")


def resolve_backend_name(
    name: str,
    device: torch.device,
    block_size: int,
    cpu_kernels: bool = False,
    needs: frozenset[str] = frozenset(),
) -> str:
    """The concrete backend for a configured name; "auto" picks by device and block size:
    flash on CUDA where it imports and the block size suits it, else triton; off CUDA, cpu
    when the fused CPU kernels serve this model (cpu_kernels), else torch. A model that needs
    features (FEATURES) gets torch from "auto" where the pick lacks them; a named backend that
    lacks them is refused."""
    if name != AUTO:
        if name not in BACKENDS:
            raise _unknown(name, (AUTO, *BACKENDS))
        missing = missing_features(name, needs)
        if missing:
            raise ValueError(
                f"the {name} attention backend does not implement {' or '.join(missing)}, "
                "which this model needs; use attention backend 'torch' or 'auto'"
            )
        return name
    if device.type != "cuda":
        picked = "cpu" if cpu_kernels else "torch"
    elif block_size % FLASH_BLOCK_MULTIPLE == 0 and flash_attn_available():
        picked = "flash"
    else:
        picked = "triton"
    return "torch" if missing_features(picked, needs) else picked


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

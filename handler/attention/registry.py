"""Attention backends by name, imported only when chosen (GPU backends need triton/CUDA)."""

from __future__ import annotations

import importlib

from handler.attention.base import AttentionBackend

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "torch": "handler.attention.torch_backend:TorchAttentionBackend",
    "triton": "handler.attention.triton_paged:TritonPagedBackend",
}


def create_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class()

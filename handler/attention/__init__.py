"""Attention backends over the paged KV cache."""

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.attention.registry import BACKENDS, create_backend
from handler.attention.torch_backend import TorchAttentionBackend

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "TorchAttentionBackend",
    "create_backend",
]

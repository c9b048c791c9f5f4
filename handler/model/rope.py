"""Rotary position embeddings: a cos/sin table computed once, looked up by position."""

from __future__ import annotations

import math

import torch

from handler.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos and sin for every position up to max_positions, laid out for apply_rotary."""

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_positions: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        inv_freq = inverse_frequencies(rope, head_dim)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        # [max_positions, head_dim]: cos repeated over both halves, sin signed so that
        # "rotate half" becomes a roll: x * cos + roll(x) * (-sin | sin).
        self.cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(dtype=dtype, device=device)
        self.signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(
            dtype=dtype, device=device
        )
        # float32 [max_positions, head_dim // 2] per frequency, for the fused CPU kernel.
        self.cos_half = freqs.cos()
        self.sin_half = freqs.sin()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin per token, [tokens, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] in the "rotate half" layout of HF Llama weights."""
    rotated = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos + rotated * signed_sin

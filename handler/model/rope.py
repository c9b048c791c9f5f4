"""Rotary position embeddings: a cos/sin table computed once, looked up by position.

LongRoPE (Phi-3) has two frequency sets; transformers rotates a sequence with the long set once
it is longer than original_max_position_embeddings. The table then holds the short set's rows
followed by the long set's, and callers pick a row per token (RotaryEmbedding.rows).
"""

from __future__ import annotations

import math

import torch

from handler.model.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int, long: bool = False) -> torch.Tensor:
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    if rope.rope_type == "longrope":
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary_factor)


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
        self.rope = rope
        self.max_positions = max_positions
        self.rotary_dim = rotary_dim(rope, head_dim)
        self.has_long = rope.has_long_variant
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inverse_frequencies(rope, head_dim))
        if self.has_long:
            long = torch.outer(positions, inverse_frequencies(rope, head_dim, long=True))
            freqs = torch.cat((freqs, long))
        scaling = rope.attention_factor
        # [rows, rotary_dim]: cos repeated over both halves, sin signed so that "rotate half"
        # becomes a roll: x * cos + roll(x) * (-sin | sin).
        cos, sin = freqs.cos(), freqs.sin()
        self.cos = (torch.cat((cos, cos), dim=-1) * scaling).to(dtype=dtype, device=device)
        self.signed_sin = (torch.cat((-sin, sin), dim=-1) * scaling).to(dtype=dtype, device=device)
        # float32 [max_positions, head_dim // 2] per frequency, for the fused CPU kernel (which
        # runs only full, single-set, unscaled rotary: ModelConfig.fused_cpu_supported).
        self.cos_half = cos[:max_positions]
        self.sin_half = sin[:max_positions]

    def rows(self, positions: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        """Table rows for the tokens at `positions`. With LongRoPE every token of a sequence
        longer than the original context takes the long set, as in transformers (whose Phi-3
        generate recomputes the whole sequence when it first grows past it: the runner does the
        same). spans: (start, end, sequence length) of each sequence's tokens in the step; a
        token outside them (a captured decode graph) goes by its own position."""
        if not self.has_long:
            return positions
        original = self.rope.original_max_position_embeddings
        long = positions >= original
        for start, end, seq_len in spans:
            long[start:end] = seq_len > original
        return positions + long.to(positions.dtype) * self.max_positions

    def lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin per token, [tokens, 1, rotary_dim] to broadcast over heads."""
        return self.cos[rows].unsqueeze(1), self.signed_sin[rows].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] in the "rotate half" layout of HF Llama weights; with
    a partial rotary only the first cos.shape[-1] dimensions turn, the rest pass through."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        rotated = torch.roll(x, dim // 2, dims=-1)
        return x * cos + rotated * signed_sin
    head = x[..., :dim]
    turned = head * cos + torch.roll(head, dim // 2, dims=-1) * signed_sin
    return torch.cat((turned, x[..., dim:]), dim=-1)

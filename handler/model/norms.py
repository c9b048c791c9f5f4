"""RMS norms: Llama's (scale by the weight) and Gemma's (scale by 1 + weight, in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # One fused op; bit-identical to HF's formula in float32, and in bfloat16 it scales by the
    # weight before the final rounding (HF rounds first), a difference of one ulp.
    return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)


def rms_norm_plus_one(x: torch.Tensor, weight_plus_one: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's norm: the whole computation in float32, rounded once at the end, as transformers
    does. weight_plus_one: float32 (1 + weight), computed once at load."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight_plus_one, eps=eps).to(x.dtype)


def norm_weight(weight: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """The tensor the forward pass scales by: the weight, or float32 (1 + weight) for Gemma."""
    return (1.0 + weight.float()) if plus_one else weight


def apply_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    return rms_norm_plus_one(x, weight, eps) if plus_one else rms_norm(x, weight, eps)

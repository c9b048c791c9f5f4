"""Linear layers: thaw's own bf16 matrix multiply, oneDNN with a packed weight, or F.linear.

On the CPU in bfloat16 every weight is packed once at load, because a decode step of 32
sequences streams all of the model's weights and what the matmul does per weight byte
decides the step's time:

- "thaw": handler/kernels/cpu_gemm.c, when the CPU kernels are built with AVX-512 BF16. The
  weight is re-laid into 48-column panels that stream in order and stay in L2 while every
  8-row tile of the batch passes over them (README, engine benchmark: its packed ceiling).
  float32 accumulation like oneDNN, but another summation order: outputs differ from F.linear
  in the last bf16 bit now and then (tests bound it against a float64 reference).
- "onednn": torch's own bf16 kernel with the weight in oneDNN's blocked layout, done once
  instead of on every call; bit-identical to F.linear. Used where the kernels are unavailable.
- "plain": F.linear. float32 always stays here: torch uses MKL there, and a different kernel
  would break token-exactness with transformers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from handler.kernels.cpu import CpuKernels

# The batch size oneDNN tunes the packed layout for; any batch size is accepted at run time.
PACKING_BATCH_HINT = 32

Layout = Literal["plain", "onednn", "thaw"]


@dataclass
class Linear:
    # [out_features, in_features] when plain; an opaque oneDNN tensor, or thaw's 1-D panels.
    weight: torch.Tensor
    bias: torch.Tensor | None  # float32 for "thaw", the weight's dtype otherwise
    out_features: int
    in_features: int
    layout: Layout = "plain"
    kernels: CpuKernels | None = None  # set for "thaw"

    @property
    def packed(self) -> bool:
        return self.layout != "plain"

    def __call__(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """check=False skips the argument checks of the "thaw" kernel: for callers that have
        already run this layer's shapes and dtypes once (a forward pass after its first layer)."""
        if self.kernels is not None:
            return self.kernels.gemm(x, self.weight, self.out_features, self.bias, check)
        if self.layout == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def make_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pack: bool,
    kernels: CpuKernels | None = None,
) -> Linear:
    """A Linear over weight [out, in]. With pack, the fastest layout available here: thaw's
    kernel (given kernels that have it), else oneDNN's where packing_supported(), else plain."""
    out_features, in_features = weight.shape
    if pack and thaw_gemm_supported(weight, kernels):
        assert kernels is not None
        bias32 = None if bias is None else bias.to(torch.float32).contiguous()
        packed = kernels.pack_gemm_weight(weight.contiguous())
        return Linear(packed, bias32, out_features, in_features, "thaw", kernels)
    if pack and packing_supported(weight.dtype, weight.device):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_BATCH_HINT)
        return Linear(packed, bias, out_features, in_features, "onednn")
    return Linear(weight, bias, out_features, in_features)


def thaw_gemm_supported(weight: torch.Tensor, kernels: CpuKernels | None) -> bool:
    """bfloat16 CPU weights with an even input width, and kernels built with the multiply."""
    return (
        kernels is not None
        and kernels.gemm_available
        and weight.dtype == torch.bfloat16
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[1] % 2 == 0
    )


@functools.lru_cache(maxsize=8)
def packing_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """bfloat16 on a CPU whose torch build has oneDNN, and a packed probe equal to F.linear."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator).to(dtype)
    x = torch.randn(5, 64, generator=generator).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_BATCH_HINT)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        # A torch build without these ops (or a CPU oneDNN refuses): plain F.linear it is.
        return False
    return bool(torch.equal(out, F.linear(x, weight)))

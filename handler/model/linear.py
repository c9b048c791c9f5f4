"""Linear layers: plain F.linear, or oneDNN with the weight packed once at load.

torch's bfloat16 F.linear on the CPU already runs oneDNN, but on a plain [out, in] weight it
re-lays the weight out into oneDNN's blocked format on every call. A step of 32 decodes streams
all 270 MB of SmolLM2's weights, so that per-call reorder costs a quarter of the matmul time.
Packing once at load removes it; the kernel and its summation order are unchanged, so outputs
are bit-identical to F.linear (tests check it). float32 stays on F.linear: there torch uses MKL,
a different kernel whose results differ in the last bits from transformers'.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The batch size oneDNN tunes the packed layout for; any batch size is accepted at run time.
PACKING_BATCH_HINT = 32


@dataclass
class Linear:
    weight: torch.Tensor  # [out_features, in_features]; an opaque oneDNN tensor when packed
    bias: torch.Tensor | None = None
    packed: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> Linear:
    """A Linear over weight [out, in]; packed for oneDNN when pack and packing_supported()."""
    if pack and packing_supported(weight.dtype, weight.device):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_BATCH_HINT)
        return Linear(packed, bias, packed=True)
    return Linear(weight, bias)


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

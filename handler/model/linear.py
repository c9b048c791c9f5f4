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

Quantized weights (snapshot/quant/format.py) keep their bytes where a kernel reads them:
- "thaw_int": int8/int4 on the CPU in bfloat16, handler/kernels/cpu_qgemm.c: the same panel
  loop, each panel de-quantized to bfloat16 in cache, so a decode step reads 2-4x fewer bytes.
- "triton_int": int8/int4 on CUDA, handler/model/quant_triton.py, tiles de-quantized in
  registers; "fp8": e4m3 through torch's scaled matmul where the GPU has it, else the same
  Triton kernel.
- anywhere else the weight is de-quantized once at load into one of the dense layouts above
  (float32 serving stays bit-exact with transformers on the de-quantized weights).
- "stack": a q/k/v or gate/up stack whose parts are stored in different formats runs each part
  and concatenates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from handler.kernels.cpu import CpuKernels
from snapshot.quant.format import QuantizedTensor

# The batch size oneDNN tunes the packed layout for; any batch size is accepted at run time.
PACKING_BATCH_HINT = 32

Layout = Literal["plain", "onednn", "thaw", "thaw_int", "triton_int", "fp8", "stack"]


@dataclass
class Linear:
    # [out_features, in_features] when plain; an opaque oneDNN tensor, thaw's 1-D panels; for
    # the quantized layouts the kernel's own weight object (`quantized`) and an empty tensor.
    weight: torch.Tensor
    bias: torch.Tensor | None  # float32 for "thaw" and "thaw_int", the weight's dtype otherwise
    out_features: int
    in_features: int
    layout: Layout = "plain"
    kernels: CpuKernels | None = None  # set for "thaw" and "thaw_int"
    quantized: Any = None  # packed int weight ("thaw_int"), QuantizedTensor (CUDA layouts)
    parts: list[Linear] | None = None  # "stack"

    @property
    def packed(self) -> bool:
        return self.layout != "plain"

    def __call__(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """check=False skips the argument checks of the "thaw" kernel: for callers that have
        already run this layer's shapes and dtypes once (a forward pass after its first layer)."""
        if self.layout == "thaw":
            assert self.kernels is not None
            return self.kernels.gemm(x, self.weight, self.out_features, self.bias, check)
        if self.layout == "thaw_int":
            assert self.kernels is not None
            return self.kernels.qgemm(x, self.quantized, self.bias, check)
        if self.layout == "triton_int":
            from handler.model import quant_triton

            return quant_triton.int_linear(x, self.quantized, self.bias)
        if self.layout == "fp8":
            from handler.model import quant_triton

            return quant_triton.fp8_linear(x, self.quantized, self.bias)
        if self.layout == "stack":
            assert self.parts is not None
            return torch.cat([part(x, check) for part in self.parts], dim=-1)
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


def make_quantized_linear(
    weight: QuantizedTensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    pack: bool,
    kernels: CpuKernels | None = None,
) -> Linear:
    """A Linear over a quantized weight already on its device: a kernel that reads the
    quantized bytes where one runs here, else the weight de-quantized once into make_linear."""
    n, k = weight.shape
    device = weight.qweight.device
    integer = weight.scheme in ("int8", "int4") and weight.block[0] == 1
    cpu_kernel = kernels is not None and kernels.qgemm_available
    if pack and integer and device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernel:
        assert kernels is not None
        try:
            packed = kernels.pack_qgemm_weight(weight)
        except ValueError:
            packed = None  # a format the kernel does not take (an odd group size): dense below
        if packed is not None:
            bias32 = None if bias is None else bias.to(torch.float32).contiguous()
            return Linear(_no_weight(), bias32, n, k, "thaw_int", kernels, quantized=packed)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if integer:
            return Linear(_no_weight(), bias, n, k, "triton_int", quantized=weight)
        if weight.scheme == "fp8":
            # _scaled_mm where the GPU and the scale layout allow, else the Triton kernel.
            return Linear(_no_weight(), bias, n, k, "fp8", quantized=weight)
    return make_linear(weight.dequantize(torch.float32).to(dtype), bias, pack, kernels)


def make_stacked_linear(
    parts: list[torch.Tensor | QuantizedTensor],
    biases: list[torch.Tensor] | None,
    dtype: torch.dtype,
    pack: bool,
    kernels: CpuKernels | None = None,
) -> Linear:
    """One Linear for weights stacked along the output (q, k, v; gate, up). Quantized parts
    of one format are stacked as stored; mixed formats run part by part."""
    from snapshot.quant.format import concat_rows

    bias = None if biases is None else torch.cat(biases).contiguous()
    if not any(isinstance(p, QuantizedTensor) for p in parts):
        dense = torch.cat(parts, dim=0).contiguous()  # type: ignore[arg-type]
        return make_linear(dense, bias, pack, kernels)
    if all(isinstance(p, QuantizedTensor) for p in parts):
        stacked = concat_rows(parts)  # type: ignore[arg-type]
        if stacked is not None:
            return make_quantized_linear(stacked, bias, dtype, pack, kernels)
    linears = []
    for i, part in enumerate(parts):
        part_bias = None if biases is None else biases[i]
        if isinstance(part, QuantizedTensor):
            linears.append(make_quantized_linear(part, part_bias, dtype, pack, kernels))
        else:
            linears.append(make_linear(part, part_bias, pack, kernels))
    n = sum(linear.out_features for linear in linears)
    return Linear(_no_weight(), None, n, linears[0].in_features, "stack", parts=linears)


def _no_weight() -> torch.Tensor:
    """Linear.weight of the layouts whose weight lives in `quantized` or `parts`."""
    return torch.empty(0)


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

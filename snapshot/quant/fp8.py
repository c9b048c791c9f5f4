"""transformers' own FP8 checkpoints (quant_method "fp8", FineGrainedFP8Config; DeepSeek-V3
style) -> QuantizedTensor.

X.weight float8_e4m3fn [n, k] with X.weight_scale_inv [ceil(n / bn), ceil(k / bk)] for
weight_block_size [bn, bk] (per tensor: one value when weight_block_size is null);
W = q * scale_inv per block, which is the "fp8" scheme as stored. X.input_scale (static
activation scheme) is dropped: thaw runs the weights only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from snapshot.errors import SnapshotError
from snapshot.quant.format import QuantizedTensor
from snapshot.quant.packing import expect_shape, scale_grid, split_modules

SERVED = "thaw serves fp8 e4m3 weights with a block, per-channel or per-tensor scale"


def describe_fp8(qc: dict[str, Any]) -> str:
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise SnapshotError(f"fp8 format {fmt!r} is not served; {SERVED}")
    block = qc.get("weight_block_size", [128, 128])
    if block is None:
        return "fp8 per-tensor"
    if not (
        isinstance(block, list | tuple)
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise SnapshotError(f"fp8: weight_block_size {block!r} is not two positive integers")
    return f"fp8 block {block[0]}x{block[1]}"


def convert_fp8(
    tensors: dict[str, torch.Tensor], qc: dict[str, Any]
) -> tuple[dict[str, QuantizedTensor], dict[str, torch.Tensor], list[str]]:
    describe_fp8(qc)
    block = qc.get("weight_block_size", [128, 128])
    scales, rest = split_modules(tensors, ("weight_scale_inv", "input_scale"))
    quantized: dict[str, QuantizedTensor] = {}
    ignored = [f"{m}.input_scale" for m, parts in scales.items() if "input_scale" in parts]
    for module, parts in scales.items():
        if "weight_scale_inv" not in parts:
            continue
        weight = rest.pop(f"{module}.weight", None)
        if weight is None:
            raise SnapshotError(
                f"fp8 checkpoint: {module}.weight_scale_inv has no {module}.weight "
                "(incomplete or corrupted checkpoint)"
            )
        name = f"{module}.weight"
        quantized[name] = fp8_tensor(name, weight, parts["weight_scale_inv"], block)
    stray = [
        name for name, t in rest.items() if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    ]
    if stray:
        raise SnapshotError(f"fp8 checkpoint: {stray[0]} is float8 but has no weight_scale_inv")
    return quantized, rest, ignored


def fp8_tensor(
    name: str, weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None
) -> QuantizedTensor:
    """An fp8 e4m3 weight [n, k] with a scale grid for blocks `block` ([n, k] when None)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise SnapshotError(f"{name}: dtype {weight.dtype}, expected float8_e4m3fn")
    if weight.dim() != 2:
        raise SnapshotError(f"{name}: {weight.dim()} dimensions, expected 2")
    n, k = weight.shape
    bn, bk = (n, k) if block is None else block
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    if scale.numel() == 1 and grid == (1, 1):
        scale = scale.reshape(1, 1)  # per-tensor scales come as [] or [1]
    expect_shape(f"{name} scale", scale, grid)
    scales, _ = scale_grid(scale, None, scale.dtype)
    t = QuantizedTensor("fp8", (n, k), (bn, bk), weight.contiguous(), scales)
    t.check(name)
    return t

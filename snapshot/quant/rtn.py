"""Round-to-nearest quantization of dense weights into format.py's QuantizedTensor.

int8: symmetric, one scale per group of `group` weights along a row, q in -127..127.
int4: asymmetric, a scale and an offset (the group's minimum) per group, q in 0..15.

Scales and offsets are stored as float16, rounded *outward* (offset down, scale up) so that the
16 / 255 levels still span every weight of the group: that keeps each weight within half a
step of its level, |W - dequantize(W)| <= scale / 2, where plain rounding of the offset could
push a group of large, close values several steps off. A tensor whose scales or offsets come
near float16's limit (|value| > 32752, half of 65504: room for the outward rounding) keeps them
all in float32 instead, rather than clamping them, which would break the bound. Levels of a
group whose scale is 0 (all zero; for int4 also constant, held exactly by the offset) are 0.
Quantization runs in float32 on row chunks, so an embedding table needs no float64 copy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from snapshot.quant.format import QuantizedTensor, pack_int4
from snapshot.quant.hf_config import config_value

RTN_SCHEMES = ("int8", "int4")
DEFAULT_GROUPS = {"int8": 128, "int4": 32}
INT8_MAX = 127
INT4_MAX = 15
F16_MAX = 65504.0
_CHUNK_ELEMENTS = 1 << 24  # rows quantized at once, bounding the float32 temporaries

_PROJECTION = re.compile(r"_proj\.weight$")
_TABLE = re.compile(r"(^|\.)(embed_tokens|lm_head)\.weight$")


def default_group(scheme: str, k: int) -> int:
    """The group size for a row of k weights: 128 for int8, 32 for int4; k itself when the
    row is shorter, else the largest divisor of k in [group / 2, group] when the group does not
    divide k (whole groups), else the group with a shorter last one."""
    group = DEFAULT_GROUPS[_checked_scheme(scheme)]
    if k <= group:
        return max(k, 1)
    if k % group == 0:
        return group
    for size in range(group - 1, group // 2 - 1, -1):
        if k % size == 0:
            return size
    return group


def quantize_rtn(weight: torch.Tensor, scheme: str, group: int) -> QuantizedTensor:
    """weight [n, k] (any float dtype) -> QuantizedTensor of block (1, group); the last group of
    a row is shorter when group does not divide k."""
    _checked_scheme(scheme)
    if weight.ndim != 2 or weight.numel() == 0:
        raise ValueError(f"quantize_rtn: expected a non-empty 2-D weight, got {list(weight.shape)}")
    if group <= 0:
        raise ValueError(f"quantize_rtn: group must be positive, got {group}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_rtn: the weight has non-finite values")
    grouped = _grouped(w, group)  # [n, groups, group], NaN padding past k
    if scheme == "int8":
        return _int8(grouped, w.shape, group)
    return _int4(grouped, w.shape, group)


def quantized_state(
    dense_state: Mapping[str, torch.Tensor], config: Any, scheme: str
) -> dict[str, QuantizedTensor]:
    """The weights of `dense_state` to store quantized, by name: every 2-D linear projection
    (NAME_proj.weight) with `scheme`, and the embedding table (and an untied lm_head) with int8
    whatever the scheme: the output layer is the most sensitive to quantization error (it
    feeds the logits directly, and the tied table is that layer too). Norms, biases, MoE expert
    tensors (3-D, or under `.experts.`) and anything else stay dense."""
    _checked_scheme(scheme)
    tied = bool(config_value(config, "tie_word_embeddings"))
    out: dict[str, QuantizedTensor] = {}
    for name, tensor in dense_state.items():
        chosen = _scheme_for(name, tensor, scheme)
        if chosen is None:
            continue
        if tied and name.endswith("lm_head.weight"):
            table = _embedding(out, dense_state)
            if table is not None and torch.equal(dense_state[table], tensor):
                out[name] = out[table]  # one table, quantized once
                continue
        out[name] = quantize_rtn(tensor, chosen, default_group(chosen, tensor.shape[1]))
    return out


def _scheme_for(name: str, tensor: torch.Tensor, scheme: str) -> str | None:
    if tensor.ndim != 2 or not tensor.is_floating_point() or ".experts." in name:
        return None
    if _TABLE.search(name):
        return "int8"
    if _PROJECTION.search(name):
        return scheme
    return None


def _embedding(out: Mapping[str, QuantizedTensor], state: Mapping[str, Any]) -> str | None:
    return next((n for n in state if n.endswith("embed_tokens.weight") and n in out), None)


def _checked_scheme(scheme: str) -> str:
    if scheme not in RTN_SCHEMES:
        raise ValueError(f"round-to-nearest quantizes to {RTN_SCHEMES}, not {scheme!r}")
    return scheme


def _grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    groups = math.ceil(k / group)
    if groups * group == k:
        return w.reshape(n, groups, group)
    padded = torch.full((n, groups * group), math.nan, dtype=torch.float32)
    padded[:, :k] = w
    return padded.reshape(n, groups, group)


def _storage_dtype(*values: torch.Tensor) -> torch.dtype:
    """float16 unless a value would overflow it (then float32 for the whole tensor)."""
    biggest = max(float(v.abs().max()) if v.numel() else 0.0 for v in values)
    return torch.float16 if biggest <= F16_MAX / 2 else torch.float32


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) as `dtype`, the nearest value >= x."""
    return _round_toward(x, dtype, math.inf)


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (float32) as `dtype`, the nearest value <= x."""
    return _round_toward(x, dtype, -math.inf)


def _round_toward(x: torch.Tensor, dtype: torch.dtype, limit: float) -> torch.Tensor:
    y = x.to(dtype)
    missed = (y.to(torch.float32) < x) if limit > 0 else (y.to(torch.float32) > x)
    return torch.where(missed, torch.nextafter(y, torch.full_like(y, limit)), y)


def _levels(
    grouped: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, top: int
) -> torch.Tensor:
    """round((w - offset) / scale) per group, clamped to the code range, in row chunks; groups
    of scale 0 (all zero, or constant and exactly stored by the offset) get level 0."""
    n, _, group = grouped.shape
    low = 0 if offsets is not None else -top
    rows = max(1, _CHUNK_ELEMENTS // max(1, grouped[0].numel()))
    parts = []
    for start in range(0, n, rows):
        chunk = grouped[start : start + rows]
        s = scales[start : start + rows].to(torch.float32).unsqueeze(-1)
        centred = (
            chunk
            if offsets is None
            else chunk - offsets[start : start + rows].to(torch.float32).unsqueeze(-1)
        )
        q = torch.where(s > 0, torch.round(centred / torch.where(s > 0, s, 1.0)), 0.0)
        q = torch.nan_to_num(q, nan=0.0).clamp_(low, top)  # NaN: padding past k
        parts.append(q.reshape(chunk.shape[0], -1))
    return torch.cat(parts, dim=0)


def _int8(grouped: torch.Tensor, shape: torch.Size, group: int) -> QuantizedTensor:
    absmax = grouped.abs().nan_to_num(nan=0.0).amax(dim=-1)  # [n, groups]
    exact = absmax / INT8_MAX
    scales = _round_up(exact, _storage_dtype(exact))
    q = _levels(grouped, scales, None, INT8_MAX)[:, : shape[1]].to(torch.int8).contiguous()
    return QuantizedTensor("int8", (shape[0], shape[1]), (1, group), q, scales.contiguous())


def _int4(grouped: torch.Tensor, shape: torch.Size, group: int) -> QuantizedTensor:
    lo = torch.where(grouped.isnan(), math.inf, grouped).amin(dim=-1)
    hi = torch.where(grouped.isnan(), -math.inf, grouped).amax(dim=-1)
    dtype = _storage_dtype(lo, hi, (hi - lo) / INT4_MAX)
    offsets = _round_down(lo, dtype)
    # The levels offset + q * scale, q = 0..15, must reach hi from the rounded-down offset.
    scales = _round_up((hi - offsets.to(torch.float32)) / INT4_MAX, dtype)
    q = _levels(grouped, scales, offsets, INT4_MAX)[:, : shape[1]].to(torch.uint8)
    return QuantizedTensor(
        "int4",
        (shape[0], shape[1]),
        (1, group),
        pack_int4(q),
        scales.contiguous(),
        offsets.contiguous(),
    )

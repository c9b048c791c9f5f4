"""How a snapshot stores a quantized weight, and the one reference de-quantization.

A linear weight W of logical shape [n, k] (out features, in features), quantized, is three
tensors in the weight files and one entry in the manifest's "quantization" object:

    NAME.qweight  int8   [n, k]        scheme "int8": signed values
                  uint8  [n, k // 2]   scheme "int4": unsigned 0..15; byte j of a row holds
                                       element 2j in its low nibble and 2j + 1 in its high one
                  float8_e4m3fn [n, k] scheme "fp8"
    NAME.scales   float16 | float32 [ceil(n / bn), ceil(k / bk)]
    NAME.offsets  same dtype and shape as scales; optional (int4 always has it)

    W[r, c] = q[r, c] * scales[r // bn, c // bk] (+ offsets[r // bn, c // bk])

`block` = [bn, bk]: int8/int4 groups are [1, group]; FP8 is [1, k] per channel, [n, k] per
tensor or [128, 128] blocks. A zero point z becomes the offset -z * s, stored in float32 where
float16 could not hold it exactly; every source here maps onto this one rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from snapshot.errors import SnapshotError

SCHEMES = ("int8", "int4", "fp8")
QWEIGHT_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}
SCALE_DTYPES = (torch.float16, torch.float32)
SUFFIXES = ("qweight", "scales", "offsets")


@dataclass
class QuantizedTensor:
    """One quantized weight: the stored tensors, and how to read them."""

    scheme: str
    shape: tuple[int, int]  # logical [n, k]
    block: tuple[int, int]  # [bn, bk]
    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        """bk, for the row-grouped int schemes (bn == 1)."""
        return self.block[1]

    @property
    def nbytes(self) -> int:
        parts = [self.qweight, self.scales] + ([self.offsets] if self.offsets is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def check(self, name: str) -> None:
        """Raise SnapshotError naming `name` if the parts do not form a valid tensor."""
        check_quantized(name, self)

    def unpacked(self) -> torch.Tensor:
        """q as [n, k]: int8 for int8, uint8 0..15 for int4, float8 for fp8."""
        if self.scheme != "int4":
            return self.qweight
        packed = self.qweight
        low = packed & 0x0F
        high = packed >> 4
        return torch.stack((low, high), dim=-1).reshape(self.shape[0], -1)[:, : self.shape[1]]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [n, k] computed in float32 (exact for every source mapped here), then cast."""
        n, k = self.shape
        bn, bk = self.block
        q = self.unpacked().to(torch.float32)
        if bn == 1 and k % bk == 0:
            # Row groups: broadcast each group's scale over its values, no expanded copy (the
            # common case, and the one an embedding lookup runs every step).
            grouped = q.view(n, k // bk, bk)
            w = grouped * self.scales.to(torch.float32).unsqueeze(-1)
            if self.offsets is not None:
                w = w + self.offsets.to(torch.float32).unsqueeze(-1)
            return w.view(n, k).to(dtype)
        scales = _expand(self.scales.to(torch.float32), bn, bk, n, k)
        w = q * scales
        if self.offsets is not None:
            w = w + _expand(self.offsets.to(torch.float32), bn, bk, n, k)
        return w.to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """W[index] de-quantized: embedding lookups from a quantized table (bn must be 1)."""
        if self.block[0] != 1:
            return self.dequantize(dtype)[index]
        part = QuantizedTensor(
            self.scheme,
            (int(index.numel()), self.shape[1]),
            self.block,
            self.qweight[index.reshape(-1)],
            self.scales[index.reshape(-1)],
            None if self.offsets is None else self.offsets[index.reshape(-1)],
        )
        return part.dequantize(dtype).reshape(*index.shape, self.shape[1])

    def to(self, device: torch.device) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedTensor(
            self.scheme,
            self.shape,
            self.block,
            self.qweight.to(device),
            self.scales.to(device),
            move(self.offsets),
        )


def _expand(grid: torch.Tensor, bn: int, bk: int, n: int, k: int) -> torch.Tensor:
    return grid.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]


def concat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor | None:
    """Stack weights along n (q, k, v into one qkv), or None where their formats differ."""
    first = parts[0]
    same = all(
        p.scheme == first.scheme
        and p.block == first.block
        and p.shape[1] == first.shape[1]
        and p.scales.dtype == first.scales.dtype
        and (p.offsets is None) == (first.offsets is None)
        for p in parts
    )
    if not same or first.block[0] != 1:
        return None
    cat = lambda ts: torch.cat(ts, dim=0).contiguous()  # noqa: E731
    return QuantizedTensor(
        first.scheme,
        (sum(p.shape[0] for p in parts), first.shape[1]),
        first.block,
        cat([p.qweight for p in parts]),
        cat([p.scales for p in parts]),
        None if first.offsets is None else cat([p.offsets for p in parts]),  # type: ignore[misc]
    )


def expected_shapes(
    scheme: str, shape: tuple[int, int], block: tuple[int, int]
) -> dict[str, tuple[int, int]]:
    n, k = shape
    bn, bk = block
    qshape = (n, (k + 1) // 2) if scheme == "int4" else (n, k)
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    return {"qweight": qshape, "scales": grid, "offsets": grid}


def check_quantized(name: str, t: QuantizedTensor) -> None:
    if t.scheme not in SCHEMES:
        raise SnapshotError(f"{name}: quantization scheme {t.scheme!r} is not one of {SCHEMES}")
    n, k = t.shape
    bn, bk = t.block
    if n <= 0 or k <= 0 or bn <= 0 or bk <= 0:
        raise SnapshotError(f"{name}: shape {list(t.shape)} / block {list(t.block)} not positive")
    if t.scheme != "fp8" and bn != 1:
        raise SnapshotError(f"{name}: {t.scheme} groups span one row (block [1, g])")
    if t.scheme == "int4" and t.offsets is None:
        raise SnapshotError(f"{name}: int4 needs offsets (its values are unsigned)")
    shapes = expected_shapes(t.scheme, t.shape, t.block)
    if t.qweight.dtype != QWEIGHT_DTYPES[t.scheme]:
        raise SnapshotError(
            f"{name}.qweight: {t.scheme} is stored as {QWEIGHT_DTYPES[t.scheme]}, "
            f"found {t.qweight.dtype}"
        )
    parts: dict[str, Any] = {"qweight": t.qweight, "scales": t.scales, "offsets": t.offsets}
    for suffix, tensor in parts.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != shapes[suffix]:
            raise SnapshotError(
                f"{name}.{suffix}: shape {list(tensor.shape)}, expected {list(shapes[suffix])}"
            )
        if suffix != "qweight" and tensor.dtype not in SCALE_DTYPES:
            raise SnapshotError(f"{name}.{suffix}: dtype {tensor.dtype}, expected float16/32")
    if t.offsets is not None and t.offsets.dtype != t.scales.dtype:
        raise SnapshotError(f"{name}.offsets: dtype differs from the scales'")


def check_finite_scales(name: str, t: QuantizedTensor) -> str | None:
    """A problem with the scale or offset values (verify's check), or None."""
    for suffix, tensor in (("scales", t.scales), ("offsets", t.offsets)):
        if tensor is None:
            continue
        bad = ~torch.isfinite(tensor.to(torch.float32))
        if bool(bad.any()):
            return f"{name}.{suffix}: {int(bad.sum())} non-finite values (corrupted?)"
    return None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [n, k] -> the stored [n, ceil(k / 2)] bytes (low nibble first)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def manifest_entry(name: str, t: QuantizedTensor) -> dict[str, Any]:
    """The manifest's "quantization" value for weight `name`."""
    return {
        "scheme": t.scheme,
        "shape": list(t.shape),
        "block": list(t.block),
        "qweight": f"{name}.qweight",
        "scales": f"{name}.scales",
        "offsets": f"{name}.offsets" if t.offsets is not None else None,
    }


def stored_tensors(name: str, t: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The tensors written to the weight files for weight `name`."""
    out = {f"{name}.qweight": t.qweight.contiguous(), f"{name}.scales": t.scales.contiguous()}
    if t.offsets is not None:
        out[f"{name}.offsets"] = t.offsets.contiguous()
    return out


def from_manifest(name: str, entry: Any, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
    """Rebuild weight `name` from its manifest entry and the loaded tensors; checked."""
    if not isinstance(entry, dict):
        raise SnapshotError(f"manifest.json: quantization of {name} is not an object")
    scheme, shape, block = entry.get("scheme"), entry.get("shape"), entry.get("block")
    if scheme not in SCHEMES:
        raise SnapshotError(
            f"manifest.json: {name} uses quantization scheme {scheme!r}; "
            f"this thaw serves {', '.join(SCHEMES)}"
        )
    if not (_pair(shape) and _pair(block)):
        raise SnapshotError(f"manifest.json: {name}: 'shape' and 'block' must be [int, int]")

    def part(key: str) -> torch.Tensor | None:
        tensor_name = entry.get(key)
        if tensor_name is None and key == "offsets":
            return None
        if not isinstance(tensor_name, str) or tensor_name not in tensors:
            raise SnapshotError(f"manifest.json: {name}: {key} tensor {tensor_name!r} is missing")
        return tensors[tensor_name]

    qweight, scales = part("qweight"), part("scales")
    assert qweight is not None and scales is not None
    t = QuantizedTensor(scheme, tuple(shape), tuple(block), qweight, scales, part("offsets"))  # type: ignore[arg-type]
    t.check(name)
    return t


def _pair(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )

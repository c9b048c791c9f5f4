"""Shared pieces of the checkpoint readers: bit unpacking, grouping a checkpoint's tensors by
module, and turning integer values + zero points + scales into a QuantizedTensor exactly.

Build time only; no transformers here.
"""

from __future__ import annotations

import torch

from snapshot.errors import SnapshotError
from snapshot.quant.format import QuantizedTensor, pack_int4

HALF_SOURCES = (torch.float16, torch.bfloat16)


def unpack_int32(packed: torch.Tensor, bits: int, count: int, where: str) -> torch.Tensor:
    """int32 words [..., w] -> int32 values [..., count], element i at bits i*bits of the
    concatenated words (lowest bits first); values are unsigned 0 .. 2**bits - 1."""
    if packed.dtype != torch.int32:
        raise SnapshotError(f"{where}: packed as {packed.dtype}, expected int32")
    per_word = 32 // bits
    if packed.shape[-1] * per_word < count or (packed.shape[-1] - 1) * per_word >= count:
        raise SnapshotError(
            f"{where}: {packed.shape[-1]} int32 words per row do not hold {count} {bits}-bit values"
        )
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # Arithmetic shift of a negative word drags the sign bit; the mask drops it.
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


def split_modules(
    tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Tensors named PREFIX.SUFFIX for a quantization suffix, grouped by PREFIX; the rest."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if prefix and suffix in suffixes:
            modules.setdefault(prefix, {})[suffix] = tensor
        else:
            rest[name] = tensor
    return modules, rest


def require(module: str, parts: dict[str, torch.Tensor], names: tuple[str, ...], fmt: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise SnapshotError(
            f"{fmt} checkpoint: {module} has {', '.join(sorted(parts))} but no "
            f"{', '.join(missing)} (incomplete or corrupted checkpoint)"
        )


def expect_shape(where: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise SnapshotError(f"{where}: shape {list(tensor.shape)}, expected {list(shape)}")


def scale_grid(
    scales: torch.Tensor, offsets: torch.Tensor | None, source: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and offsets) in float16 where the source's were half precision and float16
    holds every value exactly, else float32: never a rounding the source did not do."""
    scales32 = scales.to(torch.float32)
    offsets32 = None if offsets is None else offsets.to(torch.float32)
    if source in HALF_SOURCES and all(t is None or _fits_half(t) for t in (scales32, offsets32)):
        return scales32.half().contiguous(), (
            None if offsets32 is None else offsets32.half().contiguous()
        )
    return scales32.contiguous(), None if offsets32 is None else offsets32.contiguous()


def _fits_half(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().to(torch.float32), t))


def int_tensor(
    where: str,
    q: torch.Tensor,
    zeros: torch.Tensor | None,
    scales: torch.Tensor,
    bits: int,
    group: int,
    signed: bool,
) -> QuantizedTensor:
    """W = (q - zeros) * scales per [1, group] block, as the int4/int8 scheme.

    q: integer [n, k], signed (-2**(b-1) ..) or unsigned (0 ..) per `signed`; zeros: integer
    [n, G] in the same convention (None = 0); scales: float [n, G], G = ceil(k / group).
    The zero point moves into the offset -z * s (exact in float32: both factors are short)."""
    n, k = q.shape
    lo = -(1 << (bits - 1)) if signed else 0
    hi = lo + (1 << bits) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise SnapshotError(f"{where}: quantized values outside {lo}..{hi} ({bits}-bit)")
    # int4 is stored unsigned, int8 signed: shift q and z together, W is unchanged.
    shift = (0 if not signed else 1 << (bits - 1)) if bits == 4 else (-128 if not signed else 0)
    q = q.to(torch.int32) + shift
    z = None if zeros is None else zeros.to(torch.int32) + shift
    if z is None and shift:
        z = torch.full(scales.shape, shift, dtype=torch.int32)
    offsets = None if z is None else -(z.to(torch.float64) * scales.to(torch.float64))
    scale_t, offset_t = scale_grid(scales, offsets, scales.dtype)
    if bits == 4:
        qweight = pack_int4(q.to(torch.uint8))
    else:
        qweight = q.to(torch.int8).contiguous()
    t = QuantizedTensor(
        "int4" if bits == 4 else "int8", (n, k), (1, group), qweight, scale_t, offset_t
    )
    t.check(where)
    return t

"""Weight-only quantized linear layers on CUDA: y = x @ W.T (+ bias) straight from the stored
QuantizedTensor (snapshot/quant/format.py), never materializing W in device memory.

- int8 / int4 (block [1, g]): one Triton kernel reads q in its stored layout (int8 [n, k]; int4
  [n, k // 2] bytes, element 2j in the low nibble), de-quantizes each tile in registers as
  q * s + o in float32, casts it to x's dtype for tl.dot and accumulates in float32. Small m
  (decode) splits K across programs so that a skinny product still fills the GPU; a second small
  kernel adds the float32 partial sums in a fixed order (deterministic, unlike atomics).
- fp8 (e4m3): per-tensor and per-channel scales go through torch._scaled_mm (x quantized to e4m3
  per tensor / per token on the fly) where the device and shapes allow it; block scales
  ([128, 128]) and everything else run the same Triton kernel, de-quantizing e4m3 tiles in
  registers (natively on sm89+, by decoding the bits elsewhere and under the interpreter).

No repack at load: the kernel reads the snapshot's layout as it is.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernel runs on the CPU, which is
how the tests check it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from snapshot.quant.format import QWEIGHT_DTYPES, SCALE_DTYPES, QuantizedTensor

X_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# The kernel's SCHEME argument.
INT8, INT4, FP8_BITS, FP8_NATIVE = 0, 1, 2, 3


@triton.jit
def _fp8_e4m3_bits_to_float(bits):
    """float8_e4m3fn bytes (as int32 0..255) to float32 without fp8 hardware: normals rebuild
    the float32 bit pattern, subnormals are mantissa * 2^-9. (NaN, 0x7f/0xff, is not mapped:
    weights never hold it.)"""
    sign = (bits >> 7) & 1
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    value = tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)
    return tl.where(sign == 1, -value, value)


@triton.jit
def _cast(value, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """value.to(dtype), rounding to nearest even. The interpreter truncates float32 to bfloat16,
    so there the bits are rounded first (the cast is then exact), as the GPU rounds."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            value = bits.to(tl.float32, bitcast=True)
    return value.to(dtype)


@triton.jit
def _scale(
    w,
    s_ptr,
    o_ptr,
    scale_rows,
    k,
    k0,
    bk,
    kn_mask,
    n_mask,
    SCALE_PER_TILE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
):
    """q * s (+ o) in float32 for the tile of columns k."""
    if SCALE_PER_TILE:
        group = k0 // bk
        w = w * tl.load(s_ptr + scale_rows + group, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_OFFSETS:
            o = tl.load(o_ptr + scale_rows + group, mask=n_mask, other=0.0).to(tl.float32)
            w = w + o[None, :]
    else:
        # Groups narrower than the tile: gather a scale per element (cached loads).
        index = scale_rows[None, :] + (k // bk)[:, None]
        w = w * tl.load(s_ptr + index, mask=kn_mask, other=0.0).to(tl.float32)
        if HAS_OFFSETS:
            w = w + tl.load(o_ptr + index, mask=kn_mask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _dot(acc, a, w, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ w, w (float32) cast to a's dtype first. Masked k read x as 0, so whatever w
    holds there adds nothing."""
    w = _cast(w, a.dtype, UPCAST)
    if UPCAST:
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    elif IEEE:
        acc += tl.dot(a, w, input_precision="ieee")
    else:
        acc += tl.dot(a, w)
    return acc


@triton.jit
def _dequant_matmul_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    o_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    stride_split,
    k_per_split,  # a multiple of BLOCK_K: every tile starts on a BLOCK_K boundary
    half_per_split,  # k_per_split // 2 and
    packed_k,  # (K + 1) // 2: int4 byte offsets whose divisibility the compiler can see
    bn,  # the quantization block [bn, bk]
    bk,
    SCHEME: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,  # every K tile lies inside one group: one scale per column
    HAS_OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,  # float32 x: a true float32 product, not tf32
    UPCAST: tl.constexpr,  # interpreter: it multiplies 16-bit float tiles as raw bits
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rows < M
    n_mask = cols < N
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    q_row = q_ptr + cols.to(tl.int64)[None, :] * stride_qn
    scale_rows = (cols // bn).to(tl.int64) * stride_sn
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # Counting tiles (not stepping k0) keeps the divisibility the compiler needs to vectorize.
    for t in range(0, tl.cdiv(k_end - k_start, BLOCK_K)):
        k0 = k_start + t * BLOCK_K
        if SCHEME == 1:
            # int4: byte j holds k = 2j (low nibble) and 2j + 1 (high nibble). The even and odd
            # columns of x multiply the two nibbles in two dots, so the weight is read as
            # contiguous bytes and never interleaved in registers.
            j = pid_k * half_per_split + t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_row + k[None, :], mask=m_mask[:, None] & (k < k_end)[None, :], other=0.0)
            a_even, a_odd = tl.split(tl.reshape(a, [BLOCK_M, BLOCK_K // 2, 2]))
            k_even = 2 * j
            j_end = tl.minimum(packed_k, pid_k * half_per_split + half_per_split)
            jn_mask = (j < j_end)[:, None] & n_mask[None, :]
            byte = tl.load(q_row + j[:, None], mask=jn_mask, other=0).to(tl.int32)
            w = (byte & 0xF).to(tl.float32)
            w = _scale(
                w,
                s_ptr,
                o_ptr,
                scale_rows,
                k_even,
                k0,
                bk,
                jn_mask,
                n_mask,
                SCALE_PER_TILE,
                HAS_OFFSETS,
            )
            acc = _dot(acc, a_even, w, IEEE, UPCAST)
            w = (byte >> 4).to(tl.float32)
            w = _scale(
                w,
                s_ptr,
                o_ptr,
                scale_rows,
                k_even + 1,
                k0,
                bk,
                jn_mask,
                n_mask,
                SCALE_PER_TILE,
                HAS_OFFSETS,
            )
            acc = _dot(acc, a_odd, w, IEEE, UPCAST)
        else:
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            kn_mask = k_mask[:, None] & n_mask[None, :]
            a = tl.load(x_row + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if SCHEME == 2:  # fp8 read as bytes
                byte = tl.load(q_row + k[:, None], mask=kn_mask, other=0)
                w = _fp8_e4m3_bits_to_float(byte.to(tl.int32))
            elif SCHEME == 3:  # fp8 converted by the hardware
                # An fp8 load takes no `other`; masked lanes may hold NaN bits: zero them.
                w = tl.load(q_row + k[:, None], mask=kn_mask)
                w = tl.where(kn_mask, w.to(tl.float32), 0.0)
            else:  # int8
                w = tl.load(q_row + k[:, None], mask=kn_mask, other=0).to(tl.float32)
            w = _scale(
                w, s_ptr, o_ptr, scale_rows, k, k0, bk, kn_mask, n_mask, SCALE_PER_TILE, HAS_OFFSETS
            )
            acc = _dot(acc, a, w, IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_split + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(
        out, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=m_mask[:, None] & n_mask[None, :]
    )


@triton.jit
def _reduce_splits_kernel(
    partial_ptr,
    bias_ptr,
    out_ptr,
    total,
    N,
    split,  # a runtime count: each split count would otherwise compile its own kernel
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for part in range(0, split):
        acc += tl.load(partial_ptr + part * total + index, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + index % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + index, _cast(acc, out_ptr.dtype.element_ty, UPCAST), mask=mask)


@dataclass(frozen=True)
class Config:
    """One launch's tiling. What should be tuned on the device: these numbers per m bucket."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises split-K


def choose_config(
    m: int, n: int, k: int, group: int, device: torch.device, min_block_k: int = 16
) -> Config:
    """A fixed, autotune-free choice by m. Decode-sized m is memory bound: narrow M tiles and
    split-K until there are about two programs per SM. Prefill-sized m uses large tiles.
    The K tile is kept inside one quantization group where the group allows, so that each
    tile needs one scale per column (int4 needs K tiles of 32 or more: two dots of half).

    To tune on the device (nothing here was timed): the m buckets and their tiles, num_warps and
    num_stages; the split-K target (2 programs per SM); BLOCK_K 128 vs 64 at decode; groups of
    16 (per-element scale gather vs K tiles of 16); whether int4 prefill wants a repack."""
    if m <= 16:
        cfg = Config(16, 64, 128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = Config(32 if m <= 32 else 64, 64, 64, num_warps=4, num_stages=4)
    elif m <= 256:
        cfg = Config(64, 128, 64, num_warps=4, num_stages=3)
    else:
        cfg = Config(128, 128, 64, num_warps=8, num_stages=3)
    block_k = cfg.block_k
    if group < k and group % block_k and group >= min_block_k and group & (group - 1) == 0:
        block_k = group  # 16 or 32: smaller K tiles, but no per-element scale gather
    split = 1
    if m <= 64:
        tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
        k_tiles = triton.cdiv(k, block_k)
        split = max(1, min(triton.cdiv(2 * _num_sms(device), tiles), k_tiles, 32))
    return Config(cfg.block_m, cfg.block_n, block_k, split, cfg.num_warps, cfg.num_stages)


def _check_x(x: torch.Tensor, qt: QuantizedTensor) -> None:
    n, k = qt.shape
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x is {x.dtype}; expected one of {X_DTYPES}")
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x has shape {list(x.shape)}; the weight expects in_features {k}")
    devices = {t.device for t in (x, qt.qweight, qt.scales) if t is not None}
    if qt.offsets is not None:
        devices.add(qt.offsets.device)
    if len(devices) != 1:
        raise ValueError(f"x and the quantized weight are on different devices: {devices}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the quantized kernels run on CUDA (or TRITON_INTERPRET=1), not {x.device}"
        )


def _check_qt(qt: QuantizedTensor, schemes: tuple[str, ...]) -> None:
    if qt.scheme not in schemes:
        raise ValueError(f"scheme {qt.scheme!r}: this path handles {schemes}")
    n, k = qt.shape
    bn, bk = qt.block
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block {list(qt.block)} is not positive")
    if qt.scheme != "fp8" and bn != 1:
        raise ValueError(f"{qt.scheme} groups span one row (block [1, g]), got {list(qt.block)}")
    if qt.qweight.dtype != QWEIGHT_DTYPES[qt.scheme]:
        raise ValueError(f"{qt.scheme} qweight is {qt.qweight.dtype}")
    q_cols = (k + 1) // 2 if qt.scheme == "int4" else k
    if tuple(qt.qweight.shape) != (n, q_cols) or qt.qweight.stride(1) != 1:
        raise ValueError(f"qweight {list(qt.qweight.shape)} is not a row-major [{n}, {q_cols}]")
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    for name, t in (("scales", qt.scales), ("offsets", qt.offsets)):
        if t is None:
            continue
        if tuple(t.shape) != grid or t.dtype not in SCALE_DTYPES or t.stride(1) != 1:
            raise ValueError(f"{name} {list(t.shape)} {t.dtype}: expected a row-major {grid}")
    if qt.offsets is not None and qt.offsets.stride(0) != qt.scales.stride(0):
        raise ValueError("offsets and scales need the same row stride")


def _check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is not None and (tuple(bias.shape) != (n,) or bias.device != device):
        raise ValueError(f"bias {list(bias.shape)} on {bias.device}: expected [{n}] on {device}")


def _run_kernel(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None,
    cfg: Config,
    scheme: int,
    scale_per_tile: bool | None = None,
) -> torch.Tensor:
    """One launch over x [m, k] (contiguous rows); [m, n] in x's dtype."""
    m, k = x.shape
    n = qt.shape[0]
    bn, bk = qt.block
    smallest = 32 if scheme == INT4 else 16  # tl.dot's K is at least 16 (int4: half a tile)
    for size in (cfg.block_m, cfg.block_n, cfg.block_k):
        if size < 16 or size & (size - 1) or cfg.block_k < smallest:
            raise ValueError(f"{cfg}: tiles are powers of two >= 16 (int4: block_k >= 32)")
    if scale_per_tile is None:
        scale_per_tile = bk >= k or bk % cfg.block_k == 0
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    if split > 1:
        # Partial sums in float32, added in a fixed order afterwards (deterministic).
        out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    q = qt.qweight.view(torch.uint8) if scheme == FP8_BITS else qt.qweight
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    kernel_bias = bias if bias is not None and split == 1 else None
    _dequant_matmul_kernel[grid](
        x,
        q,
        qt.scales,
        qt.scales if qt.offsets is None else qt.offsets,
        x if kernel_bias is None else kernel_bias,
        out,
        m,
        n,
        k,
        x.stride(0),
        q.stride(0),
        qt.scales.stride(0),
        out.stride(-2),
        out.stride(0) if split > 1 else 0,
        k_per_split,
        k_per_split // 2,
        (k + 1) // 2,
        bn,
        bk,
        SCHEME=scheme,
        SCALE_PER_TILE=scale_per_tile,
        HAS_OFFSETS=qt.offsets is not None,
        HAS_BIAS=kernel_bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        IEEE=x.dtype == torch.float32,
        UPCAST=_interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split == 1:
        return out
    return _reduce_splits(out, bias, x.dtype)


def _reduce_splits(
    partial: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Sum [split, m, n] float32 partials (+ bias), cast: one launch instead of torch's three."""
    split, m, n = partial.shape
    out = torch.empty(m, n, dtype=dtype, device=partial.device)
    block = 1024
    _reduce_splits_kernel[(triton.cdiv(m * n, block),)](
        partial,
        partial if bias is None else bias,
        out,
        m * n,
        n,
        split,
        HAS_BIAS=bias is not None,
        BLOCK=block,
        UPCAST=_interpreting(),
    )
    return out


def _flatten(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def int_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """x [..., k] (bfloat16, float16 or float32) @ W.T (+ bias) for an int8 / int4 weight of
    logical shape [n, k]; [..., n] in x's dtype. `config` overrides the choice by m."""
    _check_qt(qt, ("int8", "int4"))
    _check_x(x, qt)
    n, k = qt.shape
    _check_bias(bias, n, x.device)
    x2 = _flatten(x)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    scheme = INT8 if qt.scheme == "int8" else INT4
    min_block_k = 32 if scheme == INT4 else 16
    cfg = config or choose_config(x2.shape[0], n, k, qt.block[1], x.device, min_block_k)
    return _run_kernel(x2, qt, bias, cfg, scheme).reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------- fp8


def fp8_supported(device: torch.device | str) -> bool:
    """Whether torch._scaled_mm can multiply e4m3 operands here (CUDA sm89+)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _native_fp8(device: torch.device) -> bool:
    """Triton converts e4m3 natively only on sm89+ (and the interpreter)."""
    if device.type != "cuda":
        return _interpreting()
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm_layout(qt: QuantizedTensor) -> str | None:
    """ "tensor" or "channel" where torch._scaled_mm can take this weight's scales, else None
    (block scales, offsets, or sizes that are not multiples of 16, which _scaled_mm demands)."""
    n, k = qt.shape
    if qt.scheme != "fp8" or qt.offsets is not None or n % 16 or k % 16:
        return None
    if qt.block == (n, k):
        return "tensor"
    if qt.block == (1, k):
        return "channel"
    return None


def quantize_activations(x: torch.Tensor, per_token: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] to e4m3 with a dynamic float32 scale: [m, 1] per token (row-wise _scaled_mm) or
    a 0-d one per tensor. x ≈ xq * scale."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_token else xf.abs().amax()
    scale = (amax / FP8_MAX).clamp_min(1e-12)
    xq = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq.contiguous(), scale.contiguous()


def scaled_mm_args(
    x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None, layout: str
) -> tuple[tuple[torch.Tensor, ...], dict[str, object]]:
    """torch._scaled_mm's arguments for x [m, k] and a per-tensor / per-channel e4m3 weight.
    _scaled_mm wants a row-major, b column-major (W [n, k] row-major, transposed: no copy), and
    float32 scales: both 0-d (tensor-wise) or a_scale [m, 1] with b_scale [1, n] (row-wise).
    Row-wise output is bfloat16 only on the CUTLASS path (pre-sm90 and older cuBLAS); the bias
    must have the output's dtype."""
    n = qt.shape[0]
    per_token = layout == "channel"
    xq, x_scale = quantize_activations(x, per_token)
    if per_token:
        w_scale = qt.scales.to(torch.float32).reshape(1, n).contiguous()
        out_dtype = torch.bfloat16
    else:
        w_scale = qt.scales.to(torch.float32).reshape(())
        out_dtype = x.dtype
    kwargs: dict[str, object] = {
        "scale_a": x_scale,
        "scale_b": w_scale,
        "out_dtype": out_dtype,
        "bias": None if bias is None else bias.to(out_dtype),
    }
    return (xq, qt.qweight.t()), kwargs


def fp8_linear(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """x [..., k] @ W.T (+ bias) for an e4m3 weight; [..., n] in x's dtype. Per-tensor and
    per-channel scales use torch._scaled_mm on sm89+ (x quantized to e4m3 on the fly, so the
    result carries x's fp8 rounding too); block scales and other devices run the Triton kernel
    on bf16/fp16/fp32 x (weight-only: x is not quantized)."""
    _check_qt(qt, ("fp8",))
    _check_x(x, qt)
    n, k = qt.shape
    _check_bias(bias, n, x.device)
    x2 = _flatten(x)
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    layout = scaled_mm_layout(qt)
    if layout is not None and x.dtype != torch.float32 and fp8_supported(x.device):
        args, kwargs = scaled_mm_args(x2, qt, bias, layout)
        out = torch._scaled_mm(*args, **kwargs).to(x.dtype)
    else:
        cfg = config or choose_config(x2.shape[0], n, k, min(qt.block[1], k), x.device)
        scheme = FP8_NATIVE if _native_fp8(x.device) else FP8_BITS
        out = _run_kernel(x2, qt, bias, cfg, scheme)
    return out.reshape(*x.shape[:-1], n)

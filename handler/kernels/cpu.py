"""ctypes bindings of the fused CPU kernels (cpu_kernels.c), typed over torch tensors.

Each method checks what the C code relies on (dtype, device, contiguity, shapes) and raises
ValueError otherwise: a wrong call must fail loudly, not read the wrong memory. The forward pass
passes check=False after its first layer: every layer of a step has the same shapes and dtypes,
and repeating the checks per layer would cost a noticeable share of the step. Index values
(positions, slots, block tables) are checked once per step with check_range.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from handler.kernels.build import KernelBuildError, build, compiler, library_path

if TYPE_CHECKING:
    from snapshot.quant.format import QuantizedTensor

log = logging.getLogger(__name__)

ABI_VERSION = 4
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_f32 = ctypes.c_float
# The gated MLP activations the kernel computes (ModelConfig.activation's names).
GATED_ACTIVATIONS = ("silu", "gelu_tanh")
# cpu_qgemm.c's flags: int4 (else int8), float16 scales/offsets (else float32), offsets present,
# every q * s exact in float32.
_Q_INT4, _Q_HALF, _Q_OFFSETS, _Q_FMA = 1, 2, 4, 8
_QWEIGHT_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


# eq=False: comparing would compare the packed tensors; identity is what matters.
@dataclass(frozen=True, eq=False)
class QGemmWeight:
    """A quantized linear weight [n, k] packed for qgemm (cpu_qgemm.c's panels), and its format.

    packed: opaque 1-D uint8 buffer; scheme "int8" or "int4"; group: columns per scale (the
    last group may be shorter when k % group); half_scales: scales/offsets kept as float16;
    offsets: whether W = q * s + o (else q * s); exact_products: every q * s is exact in
    float32 (float16 scales always are), so the kernel computes q * s + o as one fused
    multiply-add, which then rounds exactly as the separate multiply and add do.
    """

    packed: torch.Tensor
    scheme: str
    n: int
    k: int
    group: int
    half_scales: bool
    offsets: bool
    exact_products: bool = False

    @property
    def flags(self) -> int:
        return _qgemm_flags(self.scheme, self.half_scales, self.offsets, self.exact_products)


def _qgemm_flags(scheme: str, half_scales: bool, offsets: bool, exact: bool = False) -> int:
    """cpu_qgemm.c's format flags."""
    return (
        (_Q_INT4 if scheme == "int4" else 0)
        | (_Q_HALF if half_scales else 0)
        | (_Q_OFFSETS if offsets else 0)
        | (_Q_FMA if exact else 0)
    )


def _exact_products(scales: torch.Tensor, scheme: str) -> bool:
    """Whether q * s is exact in float32 for every scale: q has at most 8 significant bits (4
    for int4), so s may have at most 16 (20), i.e. its low 8 (4) mantissa bits are zero, and
    must be normal (or zero) and finite. float16 scales always qualify."""
    if scales.dtype == torch.float16:
        return True
    bits = scales.contiguous().view(torch.int32)
    low = (1 << (4 if scheme == "int4" else 8)) - 1
    exponent = (bits >> 23) & 0xFF
    zero = (bits & 0x7FFFFFFF) == 0
    ok = ((bits & low) == 0) & (((exponent != 0) & (exponent != 0xFF)) | zero)
    return bool(ok.all())


class CpuKernels:
    def __init__(self, lib: ctypes.CDLL) -> None:
        if lib.thaw_kernels_abi() != ABI_VERSION:
            raise KernelBuildError("the CPU kernel library is from another version")
        # Whether attention runs the AVX-512 BF16 path (else portable C), for logs and tests.
        self.avx512_bf16 = bool(lib.thaw_kernels_features() & 1)
        self._norm = lib.thaw_add_rms_norm
        self._norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32]
        self._norm.restype = None
        self._rotary = lib.thaw_rotary
        self._rotary.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr]
        self._rotary.argtypes += [_i64, _f32]
        self._rotary.restype = None
        self._store = lib.thaw_store_kv
        self._store.argtypes = [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr]
        self._store.restype = None
        self._decode = lib.thaw_paged_decode_attention
        self._decode.argtypes = [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, *[_i64] * 5]
        self._decode.argtypes += [_f32, _i64, _f32]
        self._decode.restype = ctypes.c_int
        self._gated_mul = lib.thaw_gated_mul
        self._gated_mul.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_int]
        self._gated_mul.restype = None
        self._lse = lib.thaw_logsumexp_rows
        self._lse.argtypes = [_ptr, _i64, _i64, _ptr]
        self._lse.restype = None
        self._mask = lib.thaw_apply_token_mask
        self._mask.argtypes = [_ptr, _i64, ctypes.c_int, _ptr, _i64, _ptr, _i64]
        self._mask.restype = None
        # The matrix multiply (cpu_gemm.c) needs AVX-512 BF16; a portable build lacks it.
        self.gemm_available = bool(lib.thaw_gemm_available())
        self._gemm_size = lib.thaw_gemm_packed_size
        self._gemm_size.argtypes = [_i64, _i64]
        self._gemm_size.restype = _i64
        self._gemm_pack = lib.thaw_gemm_pack
        self._gemm_pack.argtypes = [_ptr, _i64, _i64, _ptr]
        self._gemm_pack.restype = None
        self._gemm = lib.thaw_gemm
        self._gemm.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64]
        self._gemm.restype = ctypes.c_int
        # int8/int4 weights de-quantized inside the multiply (cpu_qgemm.c); AVX-512 BF16 too.
        self.qgemm_available = bool(lib.thaw_qgemm_available())
        self._qgemm_size = lib.thaw_qgemm_packed_bytes
        self._qgemm_size.argtypes = [_i64, _i64, _i64, ctypes.c_int]
        self._qgemm_size.restype = _i64
        self._qgemm_pack = lib.thaw_qgemm_pack
        self._qgemm_pack.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _i64, ctypes.c_int, _ptr]
        self._qgemm_pack.restype = None
        self._qgemm = lib.thaw_qgemm
        self._qgemm.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64]
        self._qgemm.argtypes += [ctypes.c_int]
        self._qgemm.restype = ctypes.c_int

    def add_rms_norm(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        check: bool = True,
        delta_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden += delta (in place, when given; RMS-normed by delta_weight first when that is
        given, as Gemma norms its attention and MLP outputs), then RMS-normed hidden times
        weight, bf16.

        hidden: the float32 residual stream [rows, dim], never rounded; delta: bf16; weight,
        delta_weight: float32 [dim] (a bf16 weight is widened on every call: models pass
        float32).
        """
        rows, dim = hidden.shape
        if weight.dtype == torch.bfloat16:
            weight = weight.float()
        if check:
            if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
                raise ValueError(f"hidden must be a float32 CPU tensor, got {hidden.dtype}")
            if hidden.dim() != 2 or not hidden.is_contiguous():
                raise ValueError("hidden must be a contiguous [rows, dim] tensor")
            if delta is not None:
                _check_rows(delta, "delta")
                if delta.shape != hidden.shape:
                    raise ValueError(f"delta {tuple(delta.shape)} != hidden {tuple(hidden.shape)}")
            _check_norm_weight(weight, "weight", dim)
            if delta_weight is not None:
                if delta is None:
                    raise ValueError("delta_weight needs a delta")
                _check_norm_weight(delta_weight, "delta_weight", dim)
        out = torch.empty(rows, dim, dtype=torch.bfloat16)
        self._norm(
            hidden.data_ptr(),
            None if delta is None else delta.data_ptr(),
            None if delta_weight is None else delta_weight.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            rows,
            dim,
            eps,
        )
        return out

    def pack_gemm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [n, k] (bf16, k even) -> the 1-D packed panels gemm() reads (cpu_gemm.c)."""
        if not self.gemm_available:
            raise ValueError("this kernel build has no matrix multiply (it needs AVX-512 BF16)")
        _check_rows(weight, "weight")
        n, k = weight.shape
        if n < 1 or k < 2 or k % 2:
            raise ValueError(f"weight must be [n >= 1, k] with k even and >= 2, got [{n}, {k}]")
        packed = torch.empty(self._gemm_size(n, k), dtype=torch.bfloat16)
        self._gemm_pack(weight.data_ptr(), n, k, packed.data_ptr())
        return packed

    def gemm(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """x [rows, k] . weight^T (+ bias) -> bf16 [rows, out_features], weight packed by
        pack_gemm_weight from [out_features, k]; bias float32 [out_features] or None.

        x's rows may be strided (a slice of a wider tensor); its columns must be contiguous.
        """
        if check and x.dim() != 2:
            raise ValueError(f"x must be [rows, k], got {x.dim()} dimensions")
        rows, k = x.shape
        if check:
            _check_bf16(x, "x")
            if x.stride(1) != 1 or (rows > 1 and x.stride(0) < k) or k % 2:
                raise ValueError("x must be [rows, k] with contiguous columns and k even")
            if not self.gemm_available:
                raise ValueError("this kernel build has no matrix multiply")
            _check_bf16(packed, "packed")
            if packed.dim() != 1 or packed.numel() != self._gemm_size(out_features, k):
                raise ValueError(f"packed weight does not hold [{out_features}, {k}]")
            if bias is not None and (
                bias.dtype != torch.float32 or bias.shape != (out_features,) or bias.stride(0) != 1
            ):
                raise ValueError(f"bias must be a contiguous float32 tensor of {out_features}")
        out = torch.empty(rows, out_features, dtype=torch.bfloat16)
        if rows:
            self._gemm(
                x.data_ptr(),
                x.stride(0),
                packed.data_ptr(),
                None if bias is None else bias.data_ptr(),
                out.data_ptr(),
                out_features,
                rows,
                out_features,
                k,
            )
        return out

    def pack_qgemm_weight(self, qt: QuantizedTensor) -> QGemmWeight:
        """An int8 or int4 QuantizedTensor [n, k] (block [1, g], g even, k even) -> the packed
        weight qgemm() reads. A last group shorter than g (k % g) is fine. Raises ValueError for
        another scheme (fp8), block, odd g or k, and parts of the wrong dtype or shape."""
        if not self.qgemm_available:
            raise ValueError("this kernel build has no quantized matrix multiply (AVX-512 BF16)")
        if qt.scheme not in _QWEIGHT_DTYPES:
            raise ValueError(f"qgemm serves int8 and int4 weights, not {qt.scheme!r}")
        n, k = qt.shape
        bn, group = qt.block
        if bn != 1:
            raise ValueError(f"qgemm needs groups along a row (block [1, g]), got {list(qt.block)}")
        if group < 2 or group % 2:
            raise ValueError(f"qgemm needs an even group size >= 2, got {group}")
        if n < 1 or k < 2 or k % 2:
            raise ValueError(f"weight must be [n >= 1, k] with k even and >= 2, got [{n}, {k}]")
        dtype = _QWEIGHT_DTYPES[qt.scheme]
        qshape = (n, k // 2) if qt.scheme == "int4" else (n, k)
        q = qt.qweight
        if q.dtype != dtype or q.device.type != "cpu" or tuple(q.shape) != qshape:
            raise ValueError(
                f"{qt.scheme} qweight must be a {dtype} CPU tensor of {list(qshape)}, "
                f"got {q.dtype} {list(q.shape)} on {q.device}"
            )
        grid = (n, math.ceil(k / group))
        scales, offsets = qt.scales, qt.offsets
        if scales.dtype not in (torch.float16, torch.float32) or tuple(scales.shape) != grid:
            raise ValueError(
                f"scales must be float16 or float32 of {list(grid)}, "
                f"got {scales.dtype} {list(scales.shape)}"
            )
        if scales.device.type != "cpu":
            raise ValueError("scales must be a CPU tensor")
        if offsets is None and qt.scheme == "int4":
            raise ValueError("int4 needs offsets (its values are unsigned)")
        if offsets is not None and (
            offsets.dtype != scales.dtype
            or tuple(offsets.shape) != grid
            or offsets.device.type != "cpu"
        ):
            raise ValueError("offsets must be CPU tensors of the scales' dtype and shape")
        half = scales.dtype == torch.float16
        exact = _exact_products(scales, qt.scheme)
        flags = _qgemm_flags(qt.scheme, half, offsets is not None, exact)
        packed = torch.empty(self._qgemm_size(n, k, group, flags), dtype=torch.uint8)
        q, scales = q.contiguous(), scales.contiguous()
        offsets = None if offsets is None else offsets.contiguous()
        self._qgemm_pack(
            q.data_ptr(),
            scales.data_ptr(),
            None if offsets is None else offsets.data_ptr(),
            n,
            k,
            group,
            flags,
            packed.data_ptr(),
        )
        return QGemmWeight(packed, qt.scheme, n, k, group, half, offsets is not None, exact)

    def qgemm(
        self,
        x: torch.Tensor,
        weight: QGemmWeight,
        bias: torch.Tensor | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """x [rows, k] . W^T (+ bias) -> bf16 [rows, n], W the quantized weight packed by
        pack_qgemm_weight; bias float32 [n] or None. Bit-identical to gemm() on W de-quantized
        in float32 and rounded to bf16.

        x's rows may be strided (a slice of a wider tensor); its columns must be contiguous.
        """
        if check and x.dim() != 2:
            raise ValueError(f"x must be [rows, k], got {x.dim()} dimensions")
        if check and not isinstance(weight, QGemmWeight):
            raise ValueError("weight must be a QGemmWeight from pack_qgemm_weight")
        rows, k = x.shape
        n = weight.n
        if check:
            _check_bf16(x, "x")
            if x.stride(1) != 1 or (rows > 1 and x.stride(0) < k) or k % 2:
                raise ValueError("x must be [rows, k] with contiguous columns and k even")
            if not self.qgemm_available:
                raise ValueError("this kernel build has no quantized matrix multiply")
            packed = weight.packed
            size = self._qgemm_size(n, weight.k, weight.group, weight.flags)
            if (
                k != weight.k
                or packed.dtype != torch.uint8
                or packed.device.type != "cpu"
                or packed.dim() != 1
                or not packed.is_contiguous()
                or packed.numel() != size
            ):
                raise ValueError(f"packed weight does not hold [{n}, {k}]")
            if bias is not None and (
                bias.dtype != torch.float32
                or bias.device.type != "cpu"
                or bias.shape != (n,)
                or bias.stride(0) != 1
            ):
                raise ValueError(f"bias must be a contiguous float32 tensor of {n}")
        out = torch.empty(rows, n, dtype=torch.bfloat16)
        if rows:
            status = self._qgemm(
                x.data_ptr(),
                x.stride(0),
                weight.packed.data_ptr(),
                None if bias is None else bias.data_ptr(),
                out.data_ptr(),
                n,
                rows,
                n,
                k,
                weight.group,
                weight.flags,
            )
            if status == -2:
                raise MemoryError("qgemm could not allocate its scratch panel")
            if status != 0:
                raise ValueError("this kernel build has no quantized matrix multiply")
        return out

    def gated_mul(
        self, gate_up: torch.Tensor, activation: str = "silu", check: bool = True
    ) -> torch.Tensor:
        """gate_up [rows, 2 * inter] (gate then up) -> act(gate) * up, [rows, inter]; act:
        "silu" (SwiGLU) or "gelu_tanh" (GeGLU, ModelConfig.activation's names)."""
        rows, width = gate_up.shape
        if check:
            _check_rows(gate_up, "gate_up")
        if width % 2:
            raise ValueError(f"gate_up must hold gate and up halves, got width {width}")
        if activation not in GATED_ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {GATED_ACTIVATIONS}")
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        gelu = int(activation == "gelu_tanh")
        self._gated_mul(gate_up.data_ptr(), rows, width // 2, out.data_ptr(), gelu)
        return out

    def logsumexp_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 log(sum(exp(row))) of each row of bf16 logits [rows, vocab]."""
        _check_rows(logits, "logits")
        rows, vocab = logits.shape
        out = torch.empty(rows, dtype=torch.float32)
        self._lse(logits.data_ptr(), rows, vocab, out.data_ptr())
        return out

    def apply_token_mask(
        self, logits: torch.Tensor, bits: torch.Tensor, rows: list[int] | None = None
    ) -> None:
        """In place: -inf at every token of logits row rows[i] whose bit is clear in bits[i].

        logits: contiguous float32 or bf16 [batch, vocab] on the CPU; bits: contiguous int32
        [len(rows), words], bit j of word w = token 32 w + j (llguidance's layout); tokens at or
        past 32 * words get -inf. rows None: row i of bits masks logits row i.
        """
        if logits.dtype not in (torch.float32, torch.bfloat16) or logits.device.type != "cpu":
            raise ValueError(f"logits must be float32 or bfloat16 on the CPU, got {logits.dtype}")
        if logits.dim() != 2 or not logits.is_contiguous():
            raise ValueError("logits must be a contiguous [rows, vocab] tensor")
        if bits.dtype != torch.int32 or bits.device.type != "cpu" or bits.dim() != 2:
            raise ValueError(f"bits must be an int32 [rows, words] CPU tensor, got {bits.dtype}")
        if not bits.is_contiguous():
            raise ValueError("bits must be contiguous")
        batch, vocab = logits.shape
        count = batch if rows is None else len(rows)
        if bits.shape[0] != count:
            raise ValueError(f"bits has {bits.shape[0]} rows for {count} masked rows")
        index = None
        if rows is not None:
            index = torch.tensor(rows, dtype=torch.int64)
            check_range(index, "rows", 0, batch)
        if count == 0 or vocab == 0:
            return
        self._mask(
            logits.data_ptr(),
            vocab,
            int(logits.dtype == torch.bfloat16),
            None if index is None else index.data_ptr(),
            count,
            bits.data_ptr(),
            bits.shape[1],
        )

    def rotary(
        self,
        x: torch.Tensor,
        heads: int,
        head_dim: int,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        check: bool = True,
        q_norm: torch.Tensor | None = None,
        k_norm: torch.Tensor | None = None,
        q_heads: int = 0,
        eps: float = 0.0,
    ) -> None:
        """Rotate the first `heads` heads of every row of x [rows, >= heads*head_dim] in place.

        cos, sin: float32 [max_positions, head_dim // 2]; positions: int64 [rows]. q_norm,
        k_norm: float32 [head_dim] per-head RMS norm weights (both or neither), applied before
        the rotation, q_norm to the first q_heads heads and k_norm to the others.
        """
        rows = x.shape[0]
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together")
        if check:
            if q_norm is not None and k_norm is not None:
                _check_norm_weight(q_norm, "q_norm", head_dim)
                _check_norm_weight(k_norm, "k_norm", head_dim)
            _check_bf16(x, "x")
            if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < heads * head_dim:
                raise ValueError("x must be [rows, >= heads * head_dim] with unit column stride")
            _check_index(positions, "positions", rows, torch.int64)
            if cos.dtype != torch.float32 or cos.shape != sin.shape or not cos.is_contiguous():
                raise ValueError("cos and sin must be contiguous float32 tables of one shape")
            if cos.shape[1] != head_dim // 2 or not sin.is_contiguous():
                raise ValueError(f"cos/sin rows must hold head_dim // 2 = {head_dim // 2} values")
        self._rotary(
            x.data_ptr(),
            x.stride(0),
            rows,
            heads,
            head_dim,
            positions.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            None if q_norm is None else q_norm.data_ptr(),
            None if k_norm is None else k_norm.data_ptr(),
            q_heads,
            eps,
        )

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        check: bool = True,
    ) -> None:
        """k, v: [rows, kv_heads, head_dim] (row strides equal); slot -1 writes nothing."""
        rows = k.shape[0]
        width = k.shape[1] * k.shape[2]
        if check:
            _check_bf16(k, "k")
            _check_bf16(v, "v")
            if v.shape != k.shape or k.stride() != v.stride():
                raise ValueError("k and v must have the same shape and strides")
            if k.stride(2) != 1 or k.stride(1) != k.shape[2]:
                raise ValueError("each row of k and v must be contiguous")
            for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
                _check_bf16(cache, name)
                if not cache.is_contiguous() or cache.shape[-2] * cache.shape[-1] != width:
                    raise ValueError(f"{name} must be contiguous with rows of {width} values")
            _check_index(slots, "slots", rows, torch.int64)
        self._store(
            k.data_ptr(),
            v.data_ptr(),
            k.stride(0),
            rows,
            width,
            slots.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
        )

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context_len: int,
        scale: float,
        check: bool = True,
        window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q [seqs, heads, head_dim] (rows may be strided); returns [seqs, heads, head_dim].

        block_tables: int32 [seqs, max_blocks], by logical block; context_lens: int32 [seqs],
        each >= 1 and at most max_context_len, which must fit the table. window: each query
        (its context's last token) sees only the last `window` keys, and table entries before
        them are never read; softcap: scores -> tanh(scores / softcap) * softcap.
        """
        if (window is not None and window < 1) or (softcap is not None and not softcap > 0):
            raise ValueError(f"window must be >= 1 and softcap > 0, got {window}, {softcap}")
        seqs, heads, head_dim = q.shape
        _, block_size, kv_heads, cache_dim = k_cache.shape
        if check:
            _check_bf16(q, "q")
            if q.stride(2) != 1 or q.stride(1) != head_dim:
                raise ValueError("each query row must be contiguous")
            if v_cache.shape != k_cache.shape or cache_dim != head_dim or heads % kv_heads:
                raise ValueError("cache shapes do not match the query heads")
            for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
                _check_bf16(cache, name)
                if not cache.is_contiguous():
                    raise ValueError(f"{name} must be contiguous")
            if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
                raise ValueError("block_tables must be int32 [seqs, max_blocks]")
            if block_tables.shape[0] < seqs or block_tables.stride(1) != 1:
                raise ValueError("block_tables needs a contiguous row per sequence")
            _check_index(context_lens, "context_lens", seqs, torch.int32)
            if max_context_len > block_tables.shape[1] * block_size:
                raise ValueError("a context is longer than its block table")
        out = torch.empty(seqs, heads, head_dim, dtype=q.dtype)
        status = self._decode(
            out.data_ptr(),
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.stride(0),
            context_lens.data_ptr(),
            seqs,
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale,
            0 if window is None else window,
            0.0 if softcap is None else softcap,
        )
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch memory")
        return out


def check_range(values: torch.Tensor, name: str, low: int, high: int) -> None:
    """Every value in [low, high): the kernels index memory with these, unchecked. Callers run
    this once per step on the step's positions, slots and block tables, not once per layer."""
    if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
        raise ValueError(f"{name} must lie in [{low}, {high})")


def _check_norm_weight(t: torch.Tensor, name: str, dim: int) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu" or t.shape != (dim,):
        raise ValueError(f"{name} must be a float32 CPU tensor of {dim} values")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_bf16(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.bfloat16 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a bfloat16 CPU tensor, got {t.dtype} on {t.device}")


def _check_rows(t: torch.Tensor, name: str) -> None:
    _check_bf16(t, name)
    if t.dim() != 2 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [rows, dim] tensor")


def _check_index(t: torch.Tensor, name: str, rows: int, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or t.shape != (rows,) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor of {rows} values")


@functools.lru_cache(maxsize=1)
def load_cpu_kernels(build_if_missing: bool = True) -> CpuKernels | None:
    """The kernels, or None (logged once) when they cannot be built or loaded here."""
    try:
        path = build() if build_if_missing else library_path(cc=compiler())
        return CpuKernels(ctypes.CDLL(str(path)))
    except (KernelBuildError, OSError) as error:
        log.warning("fused CPU kernels unavailable, using torch ops: %s", error)
        return None

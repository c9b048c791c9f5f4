"""thaw's int8/int4-weight matrix multiply (handler/kernels/cpu_qgemm.c).

The property: qgemm on a packed QuantizedTensor is bit-identical to thaw's bf16 gemm on the same
weight de-quantized by QuantizedTensor.dequantize (float32) and rounded to bf16: the kernel
computes each weight as dequantize does and sums in gemm's order.
"""

from __future__ import annotations

import ctypes
import math
import platform

import pytest
import torch

from handler.kernels.build import build, compiler
from handler.kernels.cpu import CpuKernels, QGemmWeight, load_cpu_kernels
from snapshot.quant.format import QuantizedTensor, pack_int4

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    loaded = load_cpu_kernels()
    assert loaded is not None
    if not loaded.qgemm_available:
        pytest.skip("this CPU has no AVX-512 BF16 (the portable build is tested below)")
    return loaded


def _quantized(
    scheme: str,
    n: int,
    k: int,
    group: int,
    *,
    dtype: torch.dtype = torch.float32,
    offsets: bool = True,
    seed: int = 0,
) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    grid = (n, math.ceil(k / group))
    # Scales of varied magnitude and sign, offsets about the weights' size: every rounding
    # step (q * s, + o, to bf16) matters somewhere.
    scales = (torch.randn(grid, generator=gen) * 0.02).to(dtype)
    shift = (torch.randn(grid, generator=gen) * 0.1).to(dtype) if offsets else None
    if scheme == "int8":
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        return QuantizedTensor("int8", (n, k), (1, group), q, scales, shift)
    q4 = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    return QuantizedTensor("int4", (n, k), (1, group), q4, scales, shift)


def _reference(
    kernels: CpuKernels, x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None
) -> torch.Tensor:
    weight = qt.dequantize(torch.float32).to(torch.bfloat16)
    return kernels.gemm(x, kernels.pack_gemm_weight(weight), qt.shape[0], bias)


def _x(rows: int, k: int, seed: int, strided: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if not strided:
        return torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    # A slice of a wider tensor (a fused projection's part): rows further apart than k.
    return torch.randn(rows, k + 24, generator=gen).to(torch.bfloat16)[:, 8 : 8 + k]


ROWS = [1, 2, 7, 8, 9, 16, 32, 33, 40]
CASES = [
    (scheme, offsets, dtype)
    for scheme in ("int8", "int4")
    for offsets in (True, False)
    for dtype in (torch.float16, torch.float32)
    if offsets or scheme == "int8"
]


@pytest.mark.parametrize(("scheme", "offsets", "dtype"), CASES)
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])  # 256: one group per row (g == k)
def test_qgemm_is_bit_identical_to_gemm_of_the_dequantized_weight(
    kernels: CpuKernels, scheme: str, offsets: bool, dtype: torch.dtype, group: int
) -> None:
    k = 256
    for n in (50, 1, 97):  # within one panel, and past a 48-column panel's end
        qt = _quantized(scheme, n, k, group, dtype=dtype, offsets=offsets, seed=n + group)
        packed = kernels.pack_qgemm_weight(qt)
        assert (packed.n, packed.k, packed.group, packed.scheme) == (n, k, group, scheme)
        for i, rows in enumerate(ROWS):
            x = _x(rows, k, seed=rows, strided=i % 2 == 1)
            bias = torch.randn(n, generator=torch.Generator().manual_seed(i)) if i % 3 else None
            out = kernels.qgemm(x, packed, bias)
            assert out.shape == (rows, n) and out.dtype == torch.bfloat16
            assert torch.equal(out, _reference(kernels, x, qt, bias)), (n, rows)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize(("k", "group"), [(80, 32), (80, 128), (40, 16), (2, 2), (6, 4)])
def test_qgemm_serves_a_last_group_shorter_than_the_rest(
    kernels: CpuKernels, scheme: str, k: int, group: int
) -> None:
    # k % g != 0 (and g > k): the scales grid is ceil(k / g) wide, the last group is k % g long.
    qt = _quantized(scheme, 60, k, group, seed=k)
    packed = kernels.pack_qgemm_weight(qt)
    for rows in (1, 5, 12):
        x = _x(rows, k, seed=rows, strided=False)
        assert torch.equal(kernels.qgemm(x, packed), _reference(kernels, x, qt, None))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_qgemm_on_a_model_sized_weight(kernels: CpuKernels, scheme: str) -> None:
    # SmolLM2's qkv: 20 panels, so every thread takes several; rows around the fused/scratch
    # boundary (8) and several tiles.
    qt = _quantized(scheme, 960, 576, 32, dtype=torch.float16, seed=1)
    packed = kernels.pack_qgemm_weight(qt)
    for rows in (1, 8, 9, 33):
        x = _x(rows, 576, seed=rows, strided=rows == 9)
        assert torch.equal(kernels.qgemm(x, packed), _reference(kernels, x, qt, None))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_exact_products_take_one_fma_and_round_the_same(kernels: CpuKernels, scheme: str) -> None:
    # float32 scales that float16 holds exactly (a float16 model's, widened): q * s is exact,
    # so the kernel fuses q * s + o into one FMA; the weight must still equal dequantize's.
    qt = _quantized(scheme, 100, 128, 32, dtype=torch.float16, seed=5)
    assert qt.offsets is not None
    widened = QuantizedTensor(
        scheme, qt.shape, qt.block, qt.qweight, qt.scales.float(), qt.offsets.float()
    )
    packed = kernels.pack_qgemm_weight(widened)
    assert packed.exact_products and not packed.half_scales
    assert kernels.pack_qgemm_weight(qt).exact_products
    for rows in (1, 3, 8, 20):
        x = _x(rows, 128, seed=rows, strided=False)
        assert torch.equal(kernels.qgemm(x, packed), _reference(kernels, x, widened, None))
    # Full float32 mantissas, a subnormal or an infinite scale: two roundings, no FMA.
    assert not kernels.pack_qgemm_weight(_quantized(scheme, 10, 16, 8, seed=6)).exact_products
    assert widened.offsets is not None
    for odd in (2.0**-140, float("inf")):
        scales = widened.scales[:10, :1].clone()
        scales[3, 0] = odd
        tiny = QuantizedTensor(
            scheme,
            (10, 32),
            (1, 32),
            widened.qweight[:10, : 32 if scheme == "int8" else 16],
            scales,
            widened.offsets[:10, :1],
        )
        assert not kernels.pack_qgemm_weight(tiny).exact_products


def test_qgemm_is_close_to_the_float64_product(kernels: CpuKernels) -> None:
    # Not only equal to gemm: both are the float64 product up to float32 sums and one rounding.
    qt = _quantized("int4", 70, 128, 32, seed=3)
    x = _x(9, 128, seed=4, strided=False)
    out = kernels.qgemm(x, kernels.pack_qgemm_weight(qt))
    weight = qt.dequantize(torch.float32).to(torch.bfloat16).double()
    exact = x.double() @ weight.T
    bound = exact.abs() * 2**-8 + (x.double().abs() @ weight.abs().T) * 2**-20 + 1e-30
    assert bool(((out.double() - exact).abs() <= bound).all())


def test_qgemm_of_no_rows_is_empty(kernels: CpuKernels) -> None:
    packed = kernels.pack_qgemm_weight(_quantized("int8", 30, 8, 4))
    out = kernels.qgemm(torch.empty(0, 8, dtype=torch.bfloat16), packed)
    assert out.shape == (0, 30)


def test_pack_qgemm_weight_refuses_what_the_kernel_cannot_read(kernels: CpuKernels) -> None:
    good = _quantized("int8", 20, 16, 8)
    with pytest.raises(ValueError, match="int8 and int4"):
        kernels.pack_qgemm_weight(
            QuantizedTensor(
                "fp8",
                (20, 16),
                (1, 16),
                torch.zeros(20, 16).to(torch.float8_e4m3fn),
                torch.ones(20, 1),
            )
        )
    with pytest.raises(ValueError, match="block"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (2, 8), good.qweight, good.scales[:10])
        )
    for group in (7, 1):
        with pytest.raises(ValueError, match="even group"):
            kernels.pack_qgemm_weight(
                QuantizedTensor(
                    "int8", (20, 16), (1, group), good.qweight, torch.ones(20, 16 // group + 1)
                )
            )
    with pytest.raises(ValueError, match="k even"):
        odd = torch.zeros(20, 15, dtype=torch.int8)
        kernels.pack_qgemm_weight(QuantizedTensor("int8", (20, 15), (1, 8), odd, good.scales))
    with pytest.raises(ValueError, match="qweight"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight.to(torch.uint8), good.scales)
        )
    with pytest.raises(ValueError, match="qweight"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight[:, :8], good.scales)
        )
    with pytest.raises(ValueError, match="qweight"):  # int4 qweight holds two values a byte
        kernels.pack_qgemm_weight(
            QuantizedTensor(
                "int4", (20, 16), (1, 8), torch.zeros(20, 16, dtype=torch.uint8), good.scales
            )
        )
    with pytest.raises(ValueError, match="scales"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight, good.scales.bfloat16())
        )
    with pytest.raises(ValueError, match="scales"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight, good.scales[:, :1])
        )
    with pytest.raises(ValueError, match="offsets"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight, good.scales, good.scales.half())
        )
    with pytest.raises(ValueError, match="offsets"):
        kernels.pack_qgemm_weight(
            QuantizedTensor("int8", (20, 16), (1, 8), good.qweight, good.scales, good.scales[:, :1])
        )
    with pytest.raises(ValueError, match="int4 needs offsets"):
        int4 = _quantized("int4", 20, 16, 8)
        kernels.pack_qgemm_weight(
            QuantizedTensor("int4", (20, 16), (1, 8), int4.qweight, int4.scales)
        )


def test_qgemm_bad_arguments_raise(kernels: CpuKernels) -> None:
    packed = kernels.pack_qgemm_weight(_quantized("int4", 20, 8, 4))
    x = _x(3, 8, seed=9, strided=False)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.qgemm(x.float(), packed)
    with pytest.raises(ValueError, match="dimensions"):
        kernels.qgemm(x.view(3, 2, 4), packed)
    with pytest.raises(ValueError, match="contiguous columns"):
        kernels.qgemm(_x(8, 3, seed=10, strided=False).T, packed)
    with pytest.raises(ValueError, match="does not hold"):
        kernels.qgemm(_x(3, 10, seed=11, strided=False), packed)  # another k
    with pytest.raises(ValueError, match="does not hold"):  # a buffer of another size
        kernels.qgemm(x, QGemmWeight(packed.packed[:-1], "int4", 20, 8, 4, False, True))
    with pytest.raises(ValueError, match="does not hold"):  # a bf16 gemm weight
        bf16 = kernels.pack_gemm_weight(torch.zeros(20, 8, dtype=torch.bfloat16))
        kernels.qgemm(x, QGemmWeight(bf16, "int4", 20, 8, 4, False, True))
    with pytest.raises(ValueError, match="QGemmWeight"):
        kernels.qgemm(x, packed.packed)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias"):
        kernels.qgemm(x, packed, torch.zeros(20, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        kernels.qgemm(x, packed, torch.zeros(19))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable build is x86-64's")
def test_a_build_without_avx512_bf16_has_no_quantized_multiply(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    portable = CpuKernels(ctypes.CDLL(str(build(tmp_path_factory.mktemp("k"), "x86-64-v3"))))
    assert not portable.qgemm_available
    qt = _quantized("int8", 4, 4, 2)
    with pytest.raises(ValueError, match="no quantized matrix multiply"):
        portable.pack_qgemm_weight(qt)
    forged = QGemmWeight(torch.zeros(1, dtype=torch.uint8), "int8", 4, 4, 2, False, True)
    with pytest.raises(ValueError, match="no quantized matrix multiply"):
        portable.qgemm(torch.zeros(1, 4, dtype=torch.bfloat16), forged)

"""thaw's bfloat16 matrix multiply (handler/kernels/cpu_gemm.c) and the linear layers using it."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch
import torch.nn.functional as F

from handler.kernels.build import build, compiler
from handler.kernels.cpu import CpuKernels, load_cpu_kernels
from handler.model.linear import make_linear, packing_supported

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    loaded = load_cpu_kernels()
    assert loaded is not None
    if not loaded.gemm_available:
        pytest.skip("this CPU has no AVX-512 BF16: linear layers stay on oneDNN (tested below)")
    return loaded


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _assert_close_to_exact(
    out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    exact = x.double() @ weight.double().T
    if bias is not None:
        exact += bias.double()
    # float32 sums rounded once to bf16: half a bf16 step of the result, plus float32's own
    # rounding over k products (bounded by the sum of their magnitudes).
    magnitude = x.double().abs() @ weight.double().abs().T
    bound = exact.abs() * 2**-8 + magnitude * 2**-20 + 1e-30
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert bool(((out.double() - exact).abs() <= bound).all())


# Rows around the 8-row tiles, columns around the 48-column panels (and fewer than one panel).
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 32, 33, 64, 100])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (49, 64), (1, 2), (16, 1536), (100, 18)])
def test_gemm_matches_float64_reference(kernels: CpuKernels, rows: int, n: int, k: int) -> None:
    weight, x = _bf16(n, k, seed=n), _bf16(rows, k, seed=rows)
    out = kernels.gemm(x, kernels.pack_gemm_weight(weight), n)
    _assert_close_to_exact(out, x, weight, None)


def test_gemm_adds_a_float32_bias_before_rounding(kernels: CpuKernels) -> None:
    weight, x = _bf16(97, 64, seed=1), _bf16(13, 64, seed=2)
    bias = torch.randn(97, generator=torch.Generator().manual_seed(3)) * 10
    out = kernels.gemm(x, kernels.pack_gemm_weight(weight), 97, bias)
    _assert_close_to_exact(out, x, weight, bias)


def test_gemm_reads_strided_rows(kernels: CpuKernels) -> None:
    # The attention output or a slice of a fused projection: rows further apart than k.
    weight = _bf16(50, 64, seed=4)
    wide = _bf16(11, 160, seed=5)
    x = wide[:, 32:96]
    assert not x.is_contiguous()
    out = kernels.gemm(x, kernels.pack_gemm_weight(weight), 50)
    assert torch.equal(out, kernels.gemm(x.contiguous(), kernels.pack_gemm_weight(weight), 50))
    _assert_close_to_exact(out, x, weight, None)


def test_gemm_of_no_rows_is_empty(kernels: CpuKernels) -> None:
    packed = kernels.pack_gemm_weight(_bf16(30, 8, seed=6))
    assert kernels.gemm(torch.empty(0, 8, dtype=torch.bfloat16), packed, 30).shape == (0, 30)


def test_gemm_rounds_like_torch_mostly_bit_for_bit(kernels: CpuKernels) -> None:
    # Same float32 accumulation as oneDNN, another summation order: the last bf16 bit differs
    # now and then, never more than one step.
    weight, x = _bf16(576, 576, seed=7), _bf16(32, 576, seed=8)
    out, reference = kernels.gemm(x, kernels.pack_gemm_weight(weight), 576), F.linear(x, weight)
    same = (out == reference).float().mean()
    assert float(same) > 0.9
    steps = (out.view(torch.int16).int() - reference.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1


def test_gemm_bad_arguments_raise(kernels: CpuKernels) -> None:
    weight = _bf16(20, 8, seed=9)
    packed = kernels.pack_gemm_weight(weight)
    x = _bf16(3, 8, seed=10)
    with pytest.raises(ValueError, match="k even"):
        kernels.pack_gemm_weight(_bf16(20, 7, seed=11))
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.pack_gemm_weight(weight.float())
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.gemm(x.float(), packed, 20)
    with pytest.raises(ValueError, match="dimensions"):
        kernels.gemm(x.view(3, 2, 4), packed, 20)
    with pytest.raises(ValueError, match="contiguous columns"):
        kernels.gemm(_bf16(8, 3, seed=12).T, packed, 20)
    with pytest.raises(ValueError, match="does not hold"):
        kernels.gemm(_bf16(3, 10, seed=13), packed, 20)  # another k
    with pytest.raises(ValueError, match="does not hold"):
        kernels.gemm(x, packed, 100)  # another n
    with pytest.raises(ValueError, match="does not hold"):
        kernels.gemm(x, weight, 20)  # an unpacked weight
    with pytest.raises(ValueError, match="bias"):
        kernels.gemm(x, packed, 20, torch.zeros(20, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        kernels.gemm(x, packed, 20, torch.zeros(19))


def test_make_linear_chooses_thaws_kernel_for_bfloat16(kernels: CpuKernels) -> None:
    weight, bias = _bf16(40, 32, seed=14), _bf16(40, seed=15)
    linear = make_linear(weight, bias, pack=True, kernels=kernels)
    assert linear.layout == "thaw" and linear.packed
    assert (linear.out_features, linear.in_features) == (40, 32)
    x = _bf16(5, 32, seed=16)
    _assert_close_to_exact(linear(x), x, weight, bias.float())
    # Where the kernel cannot serve: float32 stays plain, an odd width goes to oneDNN.
    assert make_linear(weight.float(), None, pack=True, kernels=kernels).layout == "plain"
    odd = make_linear(_bf16(40, 33, seed=17), None, pack=True, kernels=kernels)
    onednn = packing_supported(torch.bfloat16, odd.weight.device)
    assert odd.layout == ("onednn" if onednn else "plain")
    assert make_linear(weight, None, pack=False, kernels=kernels).layout == "plain"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable build is x86-64's")
def test_a_build_without_avx512_bf16_leaves_linear_layers_to_onednn(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    portable = CpuKernels(ctypes.CDLL(str(build(tmp_path_factory.mktemp("k"), "x86-64-v3"))))
    assert not portable.gemm_available
    with pytest.raises(ValueError, match="no matrix multiply"):
        portable.pack_gemm_weight(_bf16(4, 4, seed=18))
    linear = make_linear(_bf16(4, 4, seed=18), None, pack=True, kernels=portable)
    assert linear.layout != "thaw"

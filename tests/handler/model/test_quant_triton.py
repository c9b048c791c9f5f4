"""The quantized linear kernels (handler/model/quant_triton.py) against QuantizedTensor's own
de-quantization, under Triton's interpreter off CUDA (compiled on CUDA): int8 / int4 groups,
fp8 blocks, split-K, partial tiles, bad input; torch._scaled_mm's arguments run through its CPU
implementation here; and the benchmark script's dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snapshot.quant.format import QuantizedTensor, pack_int4
from tests.support.triton_interpreter import fresh_process_test, import_kernels

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
REPO = Path(__file__).resolve().parents[3]


qk = import_kernels("handler.model.quant_triton")
in_process = pytest.mark.skipif(qk is None, reason="runs in a fresh interpreter process")

if qk is None:
    test_kernels_in_a_fresh_interpreter_process = fresh_process_test(__file__)


def _int_weight(
    scheme: str,
    n: int,
    k: int,
    group: int,
    scale_dtype: torch.dtype,
    offsets: bool,
    gen: torch.Generator,
) -> QuantizedTensor:
    groups = -(-k // group)
    if scheme == "int8":
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        q = pack_int4(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8))
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    offs = (torch.randn(n, groups, generator=gen) * 0.05).to(scale_dtype) if offsets else None
    qt = QuantizedTensor(scheme, (n, k), (1, group), q, scales, offs)
    qt.check("w")
    return qt.to(torch.device(DEVICE))


def _fp8_weight(
    n: int, k: int, block: tuple[int, int], gen: torch.Generator, offsets: bool = False
) -> QuantizedTensor:
    bits = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # no NaN patterns (1.0 instead)
    grid = (-(-n // block[0]), -(-k // block[1]))
    scales = torch.rand(grid, generator=gen) * 0.01 + 1e-3
    offs = torch.randn(grid, generator=gen) * 0.01 if offsets else None
    qt = QuantizedTensor("fp8", (n, k), block, bits.view(torch.float8_e4m3fn), scales, offs)
    qt.check("w")
    return qt.to(torch.device(DEVICE))


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _reference(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    ref = x.double() @ qt.dequantize(torch.float32).double().T
    return ref if bias is None else ref + bias.double()


def _mirror(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's arithmetic in torch: W in float32 rounded to x's dtype, float32 products."""
    out = x.float() @ qt.dequantize(x.dtype).float().T
    return (out if bias is None else out + bias.float()).to(x.dtype)


N, K = 80, 256  # n is not a multiple of any tile width
INT_CASES = [
    (scheme, scale_dtype, offsets, group)
    for scheme in ("int8", "int4")
    for scale_dtype in (torch.float16, torch.float32)
    for offsets in (True, False)
    for group in (16, 32, 128, K)
    if offsets or scheme == "int8"  # int4 always has offsets
    # On CUDA every case compiles kernels: float32 scales only with one group size there.
    if not ON_CUDA or scale_dtype == torch.float16 or group == 128
]


@in_process
@pytest.mark.parametrize("scheme,scale_dtype,offsets,group", INT_CASES)
def test_int_linear_matches_the_dequantized_weight(scheme, scale_dtype, offsets, group):
    gen = torch.Generator().manual_seed(group + 7 * offsets)
    qt = _int_weight(scheme, N, K, group, scale_dtype, offsets, gen)
    for i, m in enumerate((1, 3, 16, 70)):
        dtype = (torch.bfloat16, torch.float16)[i % 2]
        x = torch.randn(m, K, generator=gen).to(dtype).to(DEVICE)
        bias = torch.randn(N, generator=gen).to(dtype).to(DEVICE) if i < 2 else None
        out = qk.int_linear(x, qt, bias)
        assert out.shape == (m, N) and out.dtype == dtype
        # The weight rounds to 16 bits for the dot and the output too: bf16 tolerance.
        assert _rel_error(out, _reference(x, qt, bias)) < 1e-2
        # The same roundings on the host: only the float32 summation order differs.
        assert _rel_error(out, _mirror(x, qt, bias)) < 1e-3


@in_process
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 70])
def test_float32_x_computes_the_same_formula_in_float32(scheme, m):
    gen = torch.Generator().manual_seed(m)
    qt = _int_weight(scheme, N, K, 32, torch.float32, True, gen)
    x = torch.randn(m, K, generator=gen).to(DEVICE)
    bias = torch.randn(N, generator=gen).to(DEVICE)
    out = qk.int_linear(x, qt, bias)
    assert out.dtype == torch.float32
    assert _rel_error(out, _reference(x, qt, bias)) < 1e-5


FORCED = [
    # block_m, block_n, block_k, split_k, scale_per_tile: split-K whose splits hold unequal
    # numbers of K tiles, groups narrower than the K tile (the per-element scale gather).
    (16, 32, 32, 3, None),
    (16, 64, 64, 2, False),
    (32, 32, 32, 1, None),
]


@in_process
@pytest.mark.parametrize("block_m,block_n,block_k,split_k,per_tile", FORCED)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_forced_tilings_agree(scheme, block_m, block_n, block_k, split_k, per_tile):
    gen = torch.Generator().manual_seed(split_k)
    qt = _int_weight(scheme, 50, 224, 16, torch.float32, True, gen)
    x = torch.randn(5, 224, generator=gen).to(DEVICE)
    bias = torch.randn(50, generator=gen).to(DEVICE)
    cfg = qk.Config(block_m, block_n, block_k, split_k)
    scheme_id = qk.INT8 if scheme == "int8" else qk.INT4
    out = qk._run_kernel(x, qt, bias, cfg, scheme_id, scale_per_tile=per_tile)
    assert _rel_error(out, _reference(x, qt, bias)) < 1e-5


@in_process
def test_int4_with_an_odd_k_and_one_group_per_row():
    gen = torch.Generator().manual_seed(3)
    qt = _int_weight("int4", 20, 33, 33, torch.float16, True, gen)
    assert qt.qweight.shape == (20, 17)
    x = torch.randn(2, 4, 33, generator=gen).to(DEVICE)  # leading dims are flattened
    out = qk.int_linear(x, qt)
    assert out.shape == (2, 4, 20)
    assert _rel_error(out, _reference(x.reshape(8, 33), qt, None).reshape(2, 4, 20)) < 1e-5


def qk_or_skip():
    if qk is None:
        pytest.skip("runs in a fresh interpreter process")
    return qk


def test_config_choice_by_m(monkeypatch):
    q = qk_or_skip()
    monkeypatch.setattr(q, "_num_sms", lambda device: 132)  # an H100's count
    device = torch.device("cpu")
    decode = q.choose_config(1, 2048, 8192, 128, device)
    assert decode.block_m == 16 and decode.split_k > 1
    prefill = q.choose_config(2048, 2048, 8192, 128, device)
    assert prefill.block_m >= 64 and prefill.split_k == 1
    # A group of 32 narrows the K tile to it, instead of a per-element scale gather.
    assert q.choose_config(256, 2048, 2048, 32, device).block_k == 32


@in_process
def test_an_empty_batch_gives_an_empty_result():
    gen = torch.Generator().manual_seed(1)
    qt = _int_weight("int4", 32, 64, 32, torch.float16, True, gen)
    out = qk.int_linear(torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE), qt)
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16


@in_process
def test_bad_input_is_a_value_error(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    qt = _int_weight("int8", 32, 64, 32, torch.float16, False, gen)
    x = torch.randn(2, 64).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match="scheme"):
        qk.int_linear(x, _fp8_weight(32, 64, (1, 64), gen))
    with pytest.raises(ValueError, match="in_features"):
        qk.int_linear(x[:, :48], qt)
    rows2 = QuantizedTensor("int8", (32, 64), (2, 32), qt.qweight, qt.scales[:16])
    with pytest.raises(ValueError, match="one row"):
        qk.int_linear(x, rows2)
    with pytest.raises(ValueError, match="devices"):
        qk.int_linear(x.to("meta"), qt)
    with pytest.raises(ValueError, match="dtype|expected one of"):
        qk.int_linear(x.to(torch.int32), qt)
    with pytest.raises(ValueError, match="bias"):
        qk.int_linear(x, qt, torch.zeros(31, dtype=x.dtype, device=DEVICE))
    with pytest.raises(ValueError, match="scheme"):
        qk.fp8_linear(x, qt)
    int4 = _int_weight("int4", 32, 64, 32, torch.float16, True, gen)
    with pytest.raises(ValueError, match="block_k"):  # int4 splits a K tile in two dots
        qk.int_linear(x, int4, config=qk.Config(16, 16, 16))
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            qk.int_linear(x, qt)


# ---------------------------------------------------------------- fp8


@in_process
@pytest.mark.parametrize(
    "n,k,block,offsets",
    [
        (200, 320, (128, 128), False),
        (72, 96, (1, 96), False),
        (72, 96, (72, 96), False),
        (40, 96, (16, 32), True),
    ],
)
def test_fp8_triton_kernel_matches_the_dequantized_weight(n, k, block, offsets):
    gen = torch.Generator().manual_seed(n)
    qt = _fp8_weight(n, k, block, gen, offsets)
    native = qk._native_fp8(torch.device(DEVICE))
    schemes = (qk.FP8_BITS, qk.FP8_NATIVE) if native else (qk.FP8_BITS,)
    for m, dtype in ((1, torch.bfloat16), (19, torch.float32)):
        x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
        bias = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
        cfg = qk.choose_config(m, n, k, min(block[1], k), x.device)
        for scheme in schemes:
            out = qk._run_kernel(x, qt, bias, cfg, scheme)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert _rel_error(out, _reference(x, qt, bias)) < tol, scheme


@in_process
@pytest.mark.parametrize("scheme_name", ["FP8_BITS", "FP8_NATIVE"])
def test_every_e4m3_bit_pattern_decodes_exactly(scheme_name):
    if scheme_name == "FP8_NATIVE" and not qk._native_fp8(torch.device(DEVICE)):
        pytest.skip("the native path needs sm89+")
    bits = torch.arange(256, dtype=torch.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # the two NaNs
    q = bits.reshape(16, 16).T.contiguous()  # W[r, c] = pattern c * 16 + r: all 254 appear
    scales = torch.ones(16, 1)
    qt = QuantizedTensor("fp8", (16, 16), (1, 16), q.view(torch.float8_e4m3fn), scales)
    qt = qt.to(torch.device(DEVICE))
    eye = torch.eye(16, device=DEVICE)  # one-hot rows: the product is W.T, exactly
    out = qk._run_kernel(eye, qt, None, qk.Config(16, 16, 16), getattr(qk, scheme_name))
    assert torch.equal(out.T.cpu(), qt.dequantize().cpu())


@in_process
def test_fp8_linear_routes_by_layout():
    gen = torch.Generator().manual_seed(5)
    per_channel = _fp8_weight(48, 64, (1, 64), gen)
    assert qk.scaled_mm_layout(per_channel) == "channel"
    assert qk.scaled_mm_layout(_fp8_weight(48, 64, (48, 64), gen)) == "tensor"
    assert qk.scaled_mm_layout(_fp8_weight(48, 64, (128, 128), gen)) is None
    assert qk.scaled_mm_layout(_fp8_weight(40, 64, (1, 64), gen)) is None  # n % 16
    assert qk.scaled_mm_layout(_fp8_weight(48, 64, (1, 64), gen, offsets=True)) is None
    assert not qk.fp8_supported("cpu")
    x = torch.randn(3, 64, generator=gen).to(torch.float16).to(DEVICE)
    out = qk.fp8_linear(x, per_channel)
    assert out.dtype == torch.float16 and out.shape == (3, 48)
    # With _scaled_mm x is rounded to e4m3 too; without it, only the output rounds.
    tol = 6e-2 if qk.fp8_supported(DEVICE) else 1e-2
    assert _rel_error(out, _reference(x, per_channel, None)) < tol


@pytest.mark.parametrize("layout,block", [("channel", (1, 64)), ("tensor", (48, 64))])
def test_scaled_mm_arguments(layout, block):
    """_scaled_mm's layouts and scale shapes, run through its CPU implementation."""
    q = qk_or_skip()
    gen = torch.Generator().manual_seed(9)
    qt = _fp8_weight(48, 64, block, gen).to(torch.device("cpu"))
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(48, generator=gen).to(torch.bfloat16)
    args, kwargs = q.scaled_mm_args(x, qt, bias, layout)
    a, b = args
    assert a.dtype == b.dtype == torch.float8_e4m3fn
    assert a.stride(1) == 1 and b.shape == (64, 48) and b.stride(0) == 1  # b column-major
    scale_a, scale_b = kwargs["scale_a"], kwargs["scale_b"]
    assert scale_a.dtype == scale_b.dtype == torch.float32
    if layout == "channel":
        assert scale_a.shape == (5, 1) and scale_b.shape == (1, 48)
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
    else:
        assert scale_a.numel() == scale_b.numel() == 1
    out = torch._scaled_mm(*args, **kwargs)
    assert out.shape == (5, 48)
    assert _rel_error(out, _reference(x, qt, bias)) < 6e-2


def test_activation_quantization_is_within_e4m3_rounding():
    q = qk_or_skip()
    x = torch.randn(4, 32) * torch.tensor([[1e-3], [1.0], [30.0], [0.0]])
    xq, scale = q.quantize_activations(x, per_token=True)
    assert scale.shape == (4, 1) and xq.dtype == torch.float8_e4m3fn
    back = xq.float() * scale
    assert torch.allclose(back, x, rtol=0.07, atol=1e-9)
    assert float(xq.float().abs().max()) <= q.FP8_MAX


# ---------------------------------------------------------------- the benchmark's dry run


@pytest.mark.skipif(ON_CUDA, reason="the device check runs the benchmark itself")
def test_bench_dry_run_writes_json(tmp_path):
    out = tmp_path / "quant.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_quant", "--device", "cpu", "--tiny"]
        + ["--json-out", str(out), "--repeats", "2", "--warmup", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert rows and {"model", "layer", "m", "n", "k"} <= set(rows[0])
    assert {"bf16", "int8", "int4", "fp8_channel", "fp8_block"} <= set(rows[0]["ms"])
    assert all(r["errors"]["int4"] < 2e-2 for r in rows)


# ---------------------------------------------------------------- compiled for real GPUs, here

_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from handler.model import quant_triton as q

fn = q._dequant_matmul_kernel
INTS = ("M N K stride_xm stride_qn stride_sn stride_om stride_split k_per_split half_per_split "
        "packed_k bn bk").split()
for arch, scheme, qdt, xdt, per_tile, cfg in [
    (90, q.INT8, "i8", "bf16", True, q.Config(16, 64, 128, 4)),
    (90, q.INT4, "u8", "fp16", False, q.Config(128, 128, 64, 1, 8, 3)),
    (90, q.FP8_NATIVE, "fp8e4nv", "bf16", True, q.Config(64, 128, 64, 1)),
    (80, q.FP8_BITS, "u8", "fp32", True, q.Config(32, 64, 64, 1)),
]:
    out = "fp32" if cfg.split_k > 1 else xdt
    sig = {"x_ptr": "*" + xdt, "q_ptr": "*" + qdt, "s_ptr": "*fp16", "o_ptr": "*fp16",
           "bias_ptr": "*" + xdt, "out_ptr": "*" + out, **{name: "i32" for name in INTS}}
    consts = dict(SCHEME=scheme, SCALE_PER_TILE=per_tile, HAS_OFFSETS=True, HAS_BIAS=True,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  IEEE=xdt == "fp32", UPCAST=False)
    sig.update({name: "constexpr" for name in consts})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
reduce_sig = {"partial_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16", "total": "i32",
              "N": "i32", "split": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr",
              "UPCAST": "constexpr"}
reduce_consts = dict(HAS_BIAS=True, BLOCK=1024, UPCAST=False)
fn = q._reduce_splits_kernel
src = ASTSource(fn, reduce_sig, {(fn.arg_names.index(c),): v for c, v in reduce_consts.items()})
triton.compile(src, target=GPUTarget("cuda", 90, 32))
print("compiled")
"""


def test_the_kernel_compiles_for_sm90_and_sm80():
    """The interpreter never compiles: build PTX and cubins for an H100 and an A100 here (the
    ptxas that ships with triton), so a kernel that only the interpreter accepts fails now."""
    if ON_CUDA:
        pytest.skip("on CUDA the other tests compile the kernel")
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]

"""The fused CPU kernels (handler/kernels) against plain torch and float64 references.

Both builds are checked: the one serving uses (AVX-512 BF16 where this CPU has it) and the
portable C one (built for x86-64-v3), so the fallback is not dead code nobody ran.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest
import torch

from handler.kernels.build import KernelBuildError, build, compiler
from handler.kernels.cpu import CpuKernels, check_range, load_cpu_kernels
from handler.model.config import RopeConfig
from handler.model.rope import RotaryEmbedding, apply_rotary
from tests.handler.attention.paged_reference import paged_decode_attention_reference

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")


@pytest.fixture(scope="module", params=["serving", "portable"])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CpuKernels:
    if request.param == "serving":
        loaded = load_cpu_kernels()
        assert loaded is not None
        return loaded
    if platform.machine() != "x86_64":
        pytest.skip("the portable build is checked on x86-64")
    path = build(tmp_path_factory.mktemp("kernels"), march="x86-64-v3")
    portable = CpuKernels(ctypes.CDLL(str(path)))
    assert not portable.avx512_bf16
    return portable


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bf16(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(torch.bfloat16)


def test_silu_mul_is_one_rounding_of_the_float32_product(kernels: CpuKernels) -> None:
    gen = _gen(4)
    gate_up = (torch.randn(5, 2 * 200, generator=gen) * 6).to(torch.bfloat16)  # tail of 8
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero gates
    gate, up = gate_up.float().chunk(2, dim=-1)
    exact = torch.nn.functional.silu(gate) * up
    out = kernels.silu_mul(gate_up)
    assert out.shape == (5, 200)
    assert torch.all((out.float() - exact).abs() <= exact.abs() * 2**-7 + 1e-30)


def test_logsumexp_rows_matches_torch(kernels: CpuKernels) -> None:
    logits = (torch.randn(4, 1000 + 7, generator=_gen(5)) * 8).to(torch.bfloat16)
    logits[3] = float("-inf")
    logits[3, 5] = 2.0  # one finite logit: the normaliser is that logit
    expected = torch.logsumexp(logits.float(), dim=-1)
    assert kernels.logsumexp_rows(logits) == pytest.approx(expected.tolist(), abs=1e-4)


def test_rotary_matches_the_torch_rotation(kernels: CpuKernels) -> None:
    gen = _gen(1)
    heads, head_dim, rows = 5, 64, 9
    rope = RotaryEmbedding(
        RopeConfig(theta=10000.0), head_dim, 512, torch.float32, torch.device("cpu")
    )
    qkv = _bf16(rows, (heads + 2) * head_dim, gen=gen)
    positions = torch.randint(0, 512, (rows,), generator=gen)
    cos, sin = rope.lookup(positions)
    heads_view = qkv[:, : heads * head_dim].float().view(rows, heads, head_dim)
    expected = apply_rotary(heads_view, cos, sin).to(torch.bfloat16).view(rows, -1)
    untouched = qkv[:, heads * head_dim :].clone()
    kernels.rotary(qkv, heads, head_dim, positions, rope.cos_half, rope.sin_half)
    # One rounding of the float32 result: at most one bf16 step from the float32 reference.
    diff = (qkv[:, : heads * head_dim].float() - expected.float()).abs()
    assert float(diff.max()) <= float(expected.float().abs().max()) * 2**-7
    assert torch.equal(qkv[:, heads * head_dim :], untouched)


def test_store_kv_writes_slots_and_skips_padding(kernels: CpuKernels) -> None:
    gen = _gen(2)
    k_cache = torch.zeros(4, 4, 2, 8, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    qkv = _bf16(3, 48, gen=gen)  # q, then k and v: strided views as the model makes them
    k = qkv[:, 16:32].view(3, 2, 8)
    v = qkv[:, 32:].view(3, 2, 8)
    slots = torch.tensor([5, -1, 15])
    kernels.store_kv(k, v, slots, k_cache, v_cache)
    flat_k, flat_v = k_cache.view(16, 2, 8), v_cache.view(16, 2, 8)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_v[15], v[2])
    written = torch.zeros(16, dtype=torch.bool)
    written[[5, 15]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any()


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [
        (9, 3, 64, 16),
        (8, 2, 128, 16),
        (4, 4, 32, 8),
        (6, 2, 48, 4),
        (14, 2, 64, 16),
        (16, 1, 64, 16),  # a group of 16 query heads: several passes over the values
        (4, 2, 256, 16),
    ],
)
# 8 sequences: one task per sequence; 3: one per (sequence, KV head).
@pytest.mark.parametrize("seqs", [8, 3])
def test_decode_attention_matches_float64_reference(
    kernels: CpuKernels, heads: int, kv_heads: int, head_dim: int, block_size: int, seqs: int
) -> None:
    gen = _gen(3)
    num_blocks = 64
    k_cache = _bf16(num_blocks, block_size, kv_heads, head_dim, gen=gen)
    v_cache = _bf16(num_blocks, block_size, kv_heads, head_dim, gen=gen)
    # Contexts around the 16-key steps of the AVX-512 path, and one long one.
    lens = torch.tensor([1, 5, 16, 17, 33, 130, 3, 47][:seqs], dtype=torch.int32)
    if seqs == 3:
        lens = torch.tensor([130, 15, 32], dtype=torch.int32)
    width = -(-int(lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in lens]).int()
    # q as the model hands it over: a strided view of the projection output.
    qkv = _bf16(len(lens), (heads + 2 * kv_heads) * head_dim, gen=gen)
    q = qkv[:, : heads * head_dim].view(len(lens), heads, head_dim)
    scale = head_dim**-0.5
    out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, int(lens.max()), scale)
    exact = paged_decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), tables, lens, scale
    )
    # Float32 math rounded once to bfloat16: within one bf16 step of the exact result.
    assert float((out.double() - exact).abs().max()) <= float(exact.abs().max()) * 2**-7


def test_decode_attention_is_finite_on_extreme_scores(kernels: CpuKernels) -> None:
    # Large keys drive exp far below float32's range for all but the top score.
    k_cache = torch.zeros(2, 4, 1, 32, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_cache[0, :, 0, 0] = torch.tensor([300.0, -300.0, 0.0, 250.0])
    v_cache[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    q = torch.zeros(1, 1, 32, dtype=torch.bfloat16)
    q[0, 0, 0] = 30.0
    tables = torch.tensor([[0]], dtype=torch.int32)
    out = kernels.decode_attention(
        q, k_cache, v_cache, tables, torch.tensor([4], dtype=torch.int32), 4, 1.0
    )
    assert torch.isfinite(out).all()
    assert float(out[0, 0, 0]) == 1.0  # all the weight on the largest score


def test_add_rms_norm_keeps_a_float32_residual_stream_unrounded(kernels: CpuKernels) -> None:
    gen = _gen(1)
    hidden = torch.randn(5, 576, generator=gen) * 3
    delta = _bf16(5, 576, gen=gen)
    weight = torch.rand(576, generator=gen).to(torch.bfloat16)
    expected_hidden = hidden + delta.float()
    out = kernels.add_rms_norm(hidden, delta, weight, 1e-5)
    # The add happened in place, in float32 (summation order aside): nothing rounded to bf16.
    assert torch.allclose(hidden, expected_hidden, rtol=0, atol=1e-6)
    assert not torch.equal(hidden, hidden.to(torch.bfloat16).float())
    x = expected_hidden.double()
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    # Rounded once: within half a bf16 step of the exact value.
    assert out.dtype == torch.bfloat16
    assert torch.all((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6)
    # Without a delta the stream is left alone.
    before = hidden.clone()
    again = kernels.add_rms_norm(hidden, None, weight, 1e-5)
    assert torch.equal(hidden, before) and torch.equal(again, out)


def test_bad_arguments_raise_instead_of_reading_wrong_memory() -> None:
    kernels = load_cpu_kernels()
    assert kernels is not None
    hidden = torch.zeros(2, 8, dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    stream = hidden.float()
    with pytest.raises(ValueError, match="float32"):
        kernels.add_rms_norm(hidden, None, weight, 1e-5)  # a bf16 stream
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.add_rms_norm(stream, None, weight.float(), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.add_rms_norm(torch.zeros(8, 4).t(), None, weight, 1e-5)
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.add_rms_norm(stream, stream, weight, 1e-5)
    with pytest.raises(ValueError, match="weight"):
        kernels.add_rms_norm(stream, None, torch.ones(7, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="delta"):
        kernels.add_rms_norm(stream, torch.zeros(3, 8, dtype=torch.bfloat16), weight, 1e-5)
    cache = torch.zeros(2, 4, 1, 8, dtype=torch.bfloat16)
    tables = torch.zeros(1, 2, dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    q = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="longer than its block table"):
        kernels.decode_attention(q, cache, cache, tables, lens, 9, 1.0)
    with pytest.raises(ValueError, match="int32"):
        kernels.decode_attention(q, cache, cache, tables.long(), lens, 3, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        kernels.decode_attention(q, cache, cache, tables, lens.long(), 3, 1.0)
    with pytest.raises(ValueError, match="slots"):
        kernels.store_kv(q[:, :1], q[:, :1], torch.tensor([0, 1]), cache, cache)
    with pytest.raises(ValueError, match=r"block_tables must lie in \[0, 2\)"):
        check_range(torch.tensor([0, 2]), "block_tables", 0, 2)


def test_a_broken_compiler_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(KernelBuildError, match="simulated failure"):
        build(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-built library left behind

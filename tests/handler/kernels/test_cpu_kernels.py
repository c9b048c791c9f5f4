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
    out = kernels.gated_mul(gate_up)
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
    q = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    positions, table = torch.zeros(1, dtype=torch.int64), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="float32"):
        kernels.add_rms_norm(hidden, None, weight, 1e-5)  # a bf16 stream
    with pytest.raises(ValueError, match="float32"):
        kernels.add_rms_norm(stream, None, weight.double(), 1e-5)
    with pytest.raises(ValueError, match="delta_weight needs a delta"):
        kernels.add_rms_norm(stream, None, weight, 1e-5, delta_weight=weight.float())
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        kernels.rotary(q.view(1, -1), 1, 8, positions, table, table, q_norm=weight.float())
    with pytest.raises(ValueError, match="activation"):
        kernels.gated_mul(torch.zeros(1, 8, dtype=torch.bfloat16), "relu")
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
    with pytest.raises(ValueError, match="longer than its block table"):
        kernels.decode_attention(q, cache, cache, tables, lens, 9, 1.0)
    with pytest.raises(ValueError, match="int32"):
        kernels.decode_attention(q, cache, cache, tables.long(), lens, 3, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        kernels.decode_attention(q, cache, cache, tables, lens.long(), 3, 1.0)
    with pytest.raises(ValueError, match="window must be"):
        kernels.decode_attention(q, cache, cache, tables, lens, 3, 1.0, window=0)
    with pytest.raises(ValueError, match="softcap > 0"):
        kernels.decode_attention(q, cache, cache, tables, lens, 3, 1.0, softcap=0.0)
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


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(4, 1, 256, 16), (8, 2, 64, 4), (6, 2, 48, 8), (4, 2, 16, 4)],
)
@pytest.mark.parametrize(("window", "softcap"), [(5, None), (20, 2.0), (1000, None), (None, 2.0)])
@pytest.mark.parametrize("seqs", [8, 3])
def test_decode_attention_windows_and_softcaps_match_the_reference(
    kernels: CpuKernels,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    window: int | None,
    softcap: float | None,
    seqs: int,
) -> None:
    """Windows shorter and longer than the contexts, soft-caps that bite (scores of a few
    units against a cap of 2), GQA, head sizes of both code paths. Each table reads as a window
    group's does: the blocks the window released are entries of block 0, which holds NaN here,
    so reading any of them would poison the output."""
    gen = _gen(6)
    num_blocks = 96
    k_cache = _bf16(num_blocks, block_size, kv_heads, head_dim, gen=gen) * 2
    v_cache = _bf16(num_blocks, block_size, kv_heads, head_dim, gen=gen)
    lens = torch.tensor([1, 6, 16, 17, 33, 131, 3, 48][:seqs], dtype=torch.int32)
    if seqs == 3:
        lens = torch.tensor([131, 21, 5], dtype=torch.int32)
    width = -(-int(lens.max()) // block_size)
    tables = torch.stack(
        [torch.randperm(num_blocks - 1, generator=gen)[:width] + 1 for _ in lens]
    ).int()
    if window is not None:
        k_cache[0], v_cache[0] = float("nan"), float("nan")
        for row, length in zip(tables, lens.tolist(), strict=True):
            released = max(0, length - window) // block_size
            row[:released] = 0
    qkv = _bf16(len(lens), (heads + 2 * kv_heads) * head_dim, gen=gen)
    q = qkv[:, : heads * head_dim].view(len(lens), heads, head_dim)
    scale = head_dim**-0.5 * 4  # scores of several units: the cap of 2 bends them
    out = kernels.decode_attention(
        q, k_cache, v_cache, tables, lens, int(lens.max()), scale, window=window, softcap=softcap
    )
    clean_k, clean_v = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    exact = paged_decode_attention_reference(
        q.double(),
        clean_k.double(),
        clean_v.double(),
        tables,
        lens,
        scale,
        window=window,
        softcap=softcap,
    )
    assert torch.isfinite(out).all()
    assert float((out.double() - exact).abs().max()) <= float(exact.abs().max()) * 2**-7
    if window is not None and window < int(lens.max()):
        plain = paged_decode_attention_reference(
            q.double(), clean_k.double(), clean_v.double(), tables, lens, scale, softcap=softcap
        )
        assert float((plain - exact).abs().max()) > 0.05  # the window changed the result


def test_gelu_tanh_mul_is_one_rounding_of_the_float32_product(kernels: CpuKernels) -> None:
    gen = _gen(7)
    gate_up = (torch.randn(5, 2 * 200, generator=gen) * 4).to(torch.bfloat16)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    gate, up = gate_up.double().chunk(2, dim=-1)
    exact = torch.nn.functional.gelu(gate, approximate="tanh") * up
    out = kernels.gated_mul(gate_up, "gelu_tanh")
    # Far negative gates: float64's tanh saturates to -1 (exactly 0) where the kernel's
    # sigmoid form keeps a value below 1e-12.
    assert torch.all((out.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-12)


def test_add_rms_norm_norms_the_delta_by_its_own_weight(kernels: CpuKernels) -> None:
    """Gemma: hidden += norm(delta) * delta_weight, then the norm of hidden, float32 weights."""
    gen = _gen(8)
    hidden = torch.randn(6, 640, generator=gen) * 3
    delta = _bf16(6, 640, gen=gen) * 5
    delta_weight, weight = 1 + torch.rand(640, generator=gen), 1 + torch.rand(640, generator=gen)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()

    expected_hidden = hidden.double() + rms(delta.double(), delta_weight)
    out = kernels.add_rms_norm(hidden, delta, weight, 1e-6, delta_weight=delta_weight)
    assert torch.allclose(hidden.double(), expected_hidden, rtol=0, atol=1e-5)
    exact = rms(expected_hidden, weight)
    assert torch.all((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5)


def test_rotary_norms_each_head_first_when_given_norms(kernels: CpuKernels) -> None:
    """Qwen3's and Gemma 3's q/k norms, fused into the rotation: one rounding for both."""
    gen = _gen(9)
    q_heads, kv_heads, head_dim, rows = 4, 2, 64, 7
    rope = RotaryEmbedding(
        RopeConfig(theta=10000.0), head_dim, 256, torch.float32, torch.device("cpu")
    )
    qkv = _bf16(rows, (q_heads + 2 * kv_heads) * head_dim, gen=gen) * 3
    positions = torch.randint(0, 256, (rows,), generator=gen)
    q_norm, k_norm = torch.rand(head_dim, generator=gen) + 0.5, torch.rand(head_dim, generator=gen)
    heads = q_heads + kv_heads
    x = qkv[:, : heads * head_dim].double().view(rows, heads, head_dim)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    weights = torch.stack([q_norm] * q_heads + [k_norm] * kv_heads).double()
    cos, sin = rope.lookup(positions)
    expected = apply_rotary(normed * weights, cos.double(), sin.double()).view(rows, -1)
    values = qkv[:, heads * head_dim :].clone()
    kernels.rotary(
        qkv,
        heads,
        head_dim,
        positions,
        rope.cos_half,
        rope.sin_half,
        True,
        q_norm,
        k_norm,
        q_heads,
        1e-6,
    )
    diff = (qkv[:, : heads * head_dim].double() - expected).abs()
    assert float(diff.max()) <= float(expected.abs().max()) * 2**-7
    assert torch.equal(qkv[:, heads * head_dim :], values)


def _mask_bits(rows: int, words: int, gen: torch.Generator) -> torch.Tensor:
    """Random grammar bitmasks with every kind of word: zero, all-ones, sign bit, partial."""
    bits = torch.randint(-(2**31), 2**31 - 1, (rows, words), generator=gen, dtype=torch.int64)
    bits = bits.to(torch.int32)
    bits[:, 0::4] = 0
    bits[:, 1::5] = -1
    bits[:, 2::7] = -(2**31)
    return bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("vocab", "words", "rows"),
    [
        (320, 10, [0, 1, 2, 3]),  # every row, vocab a multiple of 32
        (300, 10, [1, 3]),  # some rows; the last word cut by the vocab
        (333, 9, [0, 2, 3]),  # a vocab wider than the mask (padded embedding rows)
        (70, 5, [2]),  # a mask wider than the vocab
    ],
)
def test_apply_token_mask_matches_the_torch_path(
    kernels: CpuKernels, dtype: torch.dtype, vocab: int, words: int, rows: list[int]
) -> None:
    from handler.engine.constraint import TokenMasks
    from handler.engine.logit_adjust import apply_masks

    gen = _gen(11)
    logits = torch.randn(4, vocab, generator=gen).to(dtype)
    masks = TokenMasks(rows, _mask_bits(len(rows), words, gen))
    expected = logits.clone()
    apply_masks(expected, masks)  # no kernels: the torch path
    out = logits.clone()
    apply_masks(out, masks, kernels)
    assert torch.equal(out, expected)
    assert out.isneginf().any() and not out.isneginf().all()
    # Rows passed explicitly, in place through the binding.
    direct = logits.clone()
    kernels.apply_token_mask(direct, masks.bits, rows)
    assert torch.equal(direct, expected)


def test_apply_token_mask_covers_the_batch_without_rows(kernels: CpuKernels) -> None:
    gen = _gen(12)
    bits = _mask_bits(3, 40, gen)
    logits = torch.randn(3, 40 * 32 + 5, generator=gen).to(torch.bfloat16)
    kernels.apply_token_mask(logits, bits)
    allowed = ((bits.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool()
    allowed = torch.cat([allowed.reshape(3, -1), torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    assert torch.equal(logits.isneginf(), ~allowed)


def test_a_greedy_masked_step_with_kernels_samples_as_the_torch_path() -> None:
    from handler.engine.constraint import TokenMasks
    from handler.engine.params import SamplingParams
    from handler.engine.sampler import Sampler
    from handler.engine.sequence import Sequence

    kernels = load_cpu_kernels()
    assert kernels is not None

    class Unfinished:
        def is_stopped(self) -> bool:
            return False

    gen = _gen(13)
    vocab = 1000
    logits = (torch.randn(5, vocab, generator=gen) * 4).to(torch.bfloat16)
    seqs = []
    for i in range(5):
        # Row 4: EOS held back under its grammar as well (ignore_eos).
        params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=i == 4, logprobs=2)
        seq = Sequence(i, [1, 2], params, None)
        seqs.append(seq)
    for row in (1, 2, 4):
        seqs[row].matcher = Unfinished()  # type: ignore[assignment]
    masks = TokenMasks([1, 2, 4], _mask_bits(3, 32, gen))
    untouched = logits.clone()
    fast = Sampler(kernels)(logits, seqs, masks)
    plain = Sampler()(logits, seqs, masks)
    assert torch.equal(logits, untouched)  # the masks went to a copy
    assert fast.token_ids == plain.token_ids and not fast.failed and not plain.failed
    assert fast.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    allowed = TokenMasks([1, 2, 4], masks.bits).allowed(vocab, logits.device)
    for i, row in enumerate((1, 2, 4)):
        assert allowed[i, fast.token_ids[row]]
    # The logprobs are the model's, not renormalised over the allowed tokens.
    model = torch.log_softmax(logits.float(), dim=-1)
    picked = model[torch.arange(5), torch.tensor(fast.token_ids)]
    assert fast.logprobs == pytest.approx(picked.tolist(), abs=1e-4)
    assert fast.top_logprobs[1] is not None and fast.top_logprobs[1][0][0] == int(model[1].argmax())


def test_apply_token_mask_refuses_bad_arguments() -> None:
    kernels = load_cpu_kernels()
    assert kernels is not None
    logits = torch.zeros(2, 64)
    bits = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernels.apply_token_mask(logits.double(), bits)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.apply_token_mask(torch.zeros(64, 2).t(), bits)
    with pytest.raises(ValueError, match="int32"):
        kernels.apply_token_mask(logits, bits.long())
    with pytest.raises(ValueError, match="bits must be contiguous"):
        kernels.apply_token_mask(logits, torch.zeros(2, 2, dtype=torch.int32).t())
    with pytest.raises(ValueError, match="bits has 2 rows for 1"):
        kernels.apply_token_mask(logits, bits, [0])
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        kernels.apply_token_mask(logits, bits, [0, 2])

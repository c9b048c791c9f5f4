"""Round-to-nearest quantization of dense weights, and the logit agreement measure."""

from __future__ import annotations

import math

import pytest
import torch

from snapshot.quant.accuracy import logit_agreement
from snapshot.quant.format import QuantizedTensor
from snapshot.quant.rtn import default_group, quantize_rtn, quantized_state


def expanded(t: torch.Tensor, group: int, k: int) -> torch.Tensor:
    return t.to(torch.float32).repeat_interleave(group, dim=1)[:, :k]


def assert_within_half_step(weight: torch.Tensor, qt: QuantizedTensor) -> None:
    """|W - dequantize(W)| <= scale / 2 per element (plus float32 rounding of q * s + o)."""
    w = weight.to(torch.float32)
    error = (qt.dequantize(torch.float32) - w).abs()
    half_step = expanded(qt.scales, qt.group_size, w.shape[1]) / 2
    slack = 4 * torch.finfo(torch.float32).eps * (w.abs() + half_step)
    assert bool((error <= half_step + slack).all()), float((error - half_step).max())


def levels(qt: QuantizedTensor) -> torch.Tensor:
    return qt.unpacked().to(torch.int32)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_is_at_most_half_a_step(scheme: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weight = (torch.randn(48, 256) * torch.logspace(-4, 1, 48).unsqueeze(1)).to(dtype)
    group = default_group(scheme, 256)
    qt = quantize_rtn(weight, scheme, group)
    qt.check("w")
    assert_within_half_step(weight, qt)


def test_int8_layout() -> None:
    weight = torch.randn(8, 256)
    qt = quantize_rtn(weight, "int8", 128)
    assert (qt.scheme, qt.shape, qt.block) == ("int8", (8, 256), (1, 128))
    assert qt.qweight.dtype == torch.int8 and qt.qweight.shape == (8, 256)
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == (8, 2)
    assert qt.offsets is None
    assert int(levels(qt).abs().max()) == 127  # the group maximum uses the top level
    # Scales are absmax / 127, rounded up to float16 (never below it).
    absmax = weight.abs().reshape(8, 2, 128).amax(-1) / 127
    assert bool((qt.scales.float() >= absmax).all())
    assert bool((qt.scales.float() <= absmax * (1 + 2**-10)).all())


def test_int4_layout() -> None:
    weight = torch.randn(8, 64) + 3.0
    qt = quantize_rtn(weight, "int4", 32)
    assert (qt.scheme, qt.shape, qt.block) == ("int4", (8, 64), (1, 32))
    assert qt.qweight.dtype == torch.uint8 and qt.qweight.shape == (8, 32)
    assert qt.scales.dtype == qt.offsets.dtype == torch.float16  # type: ignore[union-attr]
    assert qt.scales.shape == qt.offsets.shape == (8, 2)  # type: ignore[union-attr]
    q = levels(qt)
    assert int(q.min()) == 0 and int(q.max()) == 15
    # The offset is the group minimum rounded down: no weight lies below the lowest level.
    minimum = weight.reshape(8, 2, 32).amin(-1)
    assert bool((qt.offsets.float() <= minimum).all())  # type: ignore[union-attr]


def test_int4_large_offsets_small_range_stay_within_half_a_step() -> None:
    # Values near 1000 spanning 0.01: float16's step at 1000 (0.5) is far coarser than the
    # group's range, so a plainly rounded offset would miss every weight.
    weight = 1000.0 + torch.rand(4, 64) * 0.01
    qt = quantize_rtn(weight, "int4", 32)
    assert_within_half_step(weight, qt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_zero_and_constant_groups(scheme: str) -> None:
    weight = torch.randn(4, 96)
    weight[0] = 0.0  # all-zero row
    weight[1, :32] = 0.0  # one zero group
    weight[2, 32:64] = 0.25  # a constant group
    qt = quantize_rtn(weight, scheme, 32)
    w = qt.dequantize(torch.float32)
    assert bool(torch.isfinite(w).all())
    assert bool((w[0] == 0).all()) and bool((w[1, :32] == 0).all())
    if scheme == "int4":  # the offset holds a constant group exactly (scale 0)
        assert bool((w[2, 32:64] == 0.25).all())
    assert_within_half_step(weight, qt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("k", [1, 31, 100, 129])
def test_partial_last_group(scheme: str, k: int) -> None:
    torch.manual_seed(k)
    weight = torch.randn(5, k)
    weight[:, -1] = 7.0  # the short group's own extreme must set its scale
    qt = quantize_rtn(weight, scheme, 32)
    qt.check("w")
    assert qt.scales.shape == (5, math.ceil(k / 32))
    assert qt.qweight.shape == ((5, (k + 1) // 2) if scheme == "int4" else (5, k))
    assert_within_half_step(weight, qt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_values_beyond_float16_keep_float32_scales(scheme: str) -> None:
    weight = torch.randn(4, 64) * 1e7
    qt = quantize_rtn(weight, scheme, 32)
    assert qt.scales.dtype == torch.float32
    assert qt.offsets is None or qt.offsets.dtype == torch.float32
    assert_within_half_step(weight, qt)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_tiny_values_do_not_collapse(scheme: str) -> None:
    weight = torch.randn(4, 64) * 1e-9  # absmax / 127 is below float16's smallest subnormal
    qt = quantize_rtn(weight, scheme, 32)
    assert bool(torch.isfinite(qt.dequantize()).all())
    assert_within_half_step(weight, qt)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not 'fp8'"):
        quantize_rtn(torch.ones(2, 4), "fp8", 2)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.ones(2, 2, 4), "int8", 2)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(torch.tensor([[1.0, math.nan]]), "int8", 2)


def test_default_group() -> None:
    assert default_group("int8", 4096) == 128
    assert default_group("int4", 4096) == 32
    assert default_group("int4", 20) == 20  # a row shorter than a group
    assert default_group("int8", 576) == 96  # 128 does not divide 576: a divisor near it
    assert default_group("int4", 1000) == 25
    assert default_group("int4", 2 * 37) == 32  # no divisor in [16, 32]: a short last group
    with pytest.raises(ValueError):
        default_group("fp8", 128)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(100, 64),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(64),
        "model.layers.0.mlp.down_proj.weight": torch.randn(64, 128),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 64, 256),
        "model.layers.0.mlp.experts.0.up_proj.weight": torch.randn(128, 64),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 64),  # the MoE router
        "model.norm.weight": torch.ones(64),
        "lm_head.weight": torch.randn(100, 64),
    }


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_state_picks_linears_and_keeps_tables_int8(scheme: str) -> None:
    state = _state()
    out = quantized_state(state, {"tie_word_embeddings": False}, scheme)
    assert sorted(out) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
    ]
    assert out["model.layers.0.self_attn.q_proj.weight"].scheme == scheme
    assert out["model.layers.0.mlp.down_proj.weight"].group_size == default_group(scheme, 128)
    assert out["model.embed_tokens.weight"].scheme == "int8"
    assert out["lm_head.weight"].scheme == "int8"
    for name, qt in out.items():
        qt.check(name)
        assert_within_half_step(state[name], qt)


def test_quantized_state_tied_head_is_the_embedding() -> None:
    state = _state()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    out = quantized_state(state, {"tie_word_embeddings": True}, "int4")
    assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


def test_logit_agreement() -> None:
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 50)
    same = logit_agreement(ref, ref.clone())
    assert same == {"kl": pytest.approx(0.0, abs=1e-12), "top1": 1.0}
    noisy = logit_agreement(ref, ref + 0.1 * torch.randn(2, 5, 50))
    assert 0.0 < noisy["kl"] < 0.05 and 0.5 <= noisy["top1"] <= 1.0
    flipped = logit_agreement(ref, -ref)
    assert flipped["top1"] == 0.0 and flipped["kl"] > 1.0
    # KL against a hand-computed value: two tokens, p = (0.5, 0.5), q = (0.8, 0.2).
    q = torch.tensor([[0.8, 0.2]], dtype=torch.float64).log()
    two = logit_agreement(torch.tensor([[0.0, 0.0]]), q)
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert two["kl"] == pytest.approx(expected, rel=1e-12)
    # A token the reference masks out (-inf) adds nothing; bf16 logits are accepted.
    masked = torch.tensor([[0.0, -math.inf, 1.0]])
    assert logit_agreement(masked, masked.to(torch.bfloat16))["kl"] == pytest.approx(0.0)
    with pytest.raises(ValueError):
        logit_agreement(torch.zeros(2, 3), torch.zeros(3, 2))

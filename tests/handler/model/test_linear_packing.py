"""oneDNN-packed linear layers: bit-identical to F.linear, used only where they are, same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from handler.engine.params import SamplingParams
from handler.model.linear import make_linear, packing_supported
from tests.support.engine_fixtures import build_tiny, random_prompts, run_staggered

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(
    not packing_supported(torch.bfloat16, CPU),
    reason="this torch build or CPU cannot pack bfloat16 weights for oneDNN (no mkldnn ops, or "
    "its packed probe differs from F.linear), so the engine runs plain F.linear here",
)

IN_FEATURES, OUT_FEATURES = 96, 160
ARRIVALS = [0, 0, 0, 1, 2, 4]  # batches of changing size: prefill and decode rows mixed
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)


def _weights(dtype: torch.dtype, with_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator).to(dtype)
    bias = torch.randn(OUT_FEATURES, generator=generator).to(dtype) if with_bias else None
    return weight, bias


def _input(batch: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, IN_FEATURES, generator=torch.Generator().manual_seed(batch)).to(dtype)


@needs_packing
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("batch", [1, 7, 32, 100])
def test_packed_linear_equals_f_linear(batch: int, with_bias: bool) -> None:
    weight, bias = _weights(torch.bfloat16, with_bias)
    linear = make_linear(weight, bias, pack=True)
    assert linear.packed
    x = _input(batch, torch.bfloat16)
    assert torch.equal(linear(x), F.linear(x, weight, bias))


@needs_packing
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_packed_linear_equals_f_linear_on_a_non_contiguous_input(with_bias: bool) -> None:
    weight, bias = _weights(torch.bfloat16, with_bias)
    linear = make_linear(weight, bias, pack=True)
    # Every other column of a wider tensor: rows strided, as a slice of a fused output is.
    wide = torch.randn(19, 2 * IN_FEATURES, generator=torch.Generator().manual_seed(2))
    x = wide.to(torch.bfloat16)[:, ::2]
    assert not x.is_contiguous()
    assert torch.equal(linear(x), F.linear(x, weight, bias))


@pytest.mark.parametrize(
    ("dtype", "pack"),
    [(torch.float32, True), (torch.bfloat16, False), (torch.float32, False)],
    ids=["float32", "bfloat16-pack-off", "float32-pack-off"],
)
def test_make_linear_leaves_these_weights_unpacked(dtype: torch.dtype, pack: bool) -> None:
    weight, bias = _weights(dtype, with_bias=True)
    linear = make_linear(weight, bias, pack=pack)
    assert not linear.packed
    assert linear.weight is weight  # the caller's tensor, untouched
    x = _input(7, dtype)
    assert torch.equal(linear(x), F.linear(x, weight, bias))


@needs_packing
@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_packed_engine_gives_the_unpacked_engines_tokens(architecture: str) -> None:
    # Qwen2 adds q, k, v biases, so the packed bias path runs inside the model too.
    tiny = build_tiny(architecture, seed=3)
    prompts = random_prompts(len(ARRIVALS), 2, 40, seed=4)
    packed = tiny.engine(dtype=torch.bfloat16, pack_cpu_weights=True)
    plain = tiny.engine(dtype=torch.bfloat16, pack_cpu_weights=False)
    layer = packed.runner.model.weights.layers[0]
    assert layer.qkv.packed and layer.o.packed and layer.gate_up.packed and layer.down.packed
    assert packed.runner.model.weights.lm_head.packed
    assert not plain.runner.model.weights.layers[0].qkv.packed
    packed_tokens = run_staggered(packed, prompts, GREEDY, ARRIVALS)
    plain_tokens = run_staggered(plain, prompts, GREEDY, ARRIVALS)
    assert packed_tokens == plain_tokens
    assert all(len(tokens) == GREEDY.max_new_tokens for tokens in packed_tokens.values())

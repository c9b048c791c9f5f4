"""The grouped expert kernel (handler/model/moe_triton.py) against the plain reference
(moe.run_experts), under Triton's interpreter off CUDA, across shapes, top-k and dtypes."""

from __future__ import annotations

import pytest
import torch

from handler.model.moe import ExpertWeights, run_experts
from tests.support.triton_interpreter import fresh_process_test, import_kernels

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


mt = import_kernels("handler.model.moe_triton")
in_process = pytest.mark.skipif(mt is None, reason="runs in a fresh interpreter process")

if mt is None:
    test_kernels_in_a_fresh_interpreter_process = fresh_process_test(__file__)


def _weights(experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        router=torch.randn(experts, hidden, generator=gen).to(dtype).to(DEVICE),
        gate_up=(torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5)
        .to(dtype)
        .to(DEVICE),
        down=(torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype).to(DEVICE),
    )


CASES = [
    # tokens, experts, top_k, hidden, expert intermediate size
    (1, 4, 2, 64, 32),
    (7, 6, 2, 64, 48),
    (33, 8, 3, 96, 64),
    (40, 5, 1, 32, 80),
]


@in_process
@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_grouped_experts_match_the_reference(
    tokens, experts, top_k, hidden, inter, dtype, activation
):
    gen = torch.Generator().manual_seed(tokens * 100 + experts)
    w = _weights(experts, hidden, inter, dtype, seed=experts)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype).to(DEVICE)
    # Some experts get no token at all (skewed choices), others several tiles' worth.
    choices = torch.stack(
        [torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]
    ).to(DEVICE)
    if tokens > 8:
        choices[: tokens // 2, 0] = 0
    routing = torch.rand(tokens, top_k, generator=gen).to(DEVICE)
    expected = run_experts(x.double(), routing.double(), choices, _double(w), activation)
    out = mt.run_experts_grouped(x, routing, choices, w, activation)
    assert out.shape == x.shape and out.dtype == dtype
    error = float((out.double() - expected).norm() / expected.norm())
    assert error < (2e-5 if dtype == torch.float32 else 2e-2), error


def _double(w: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(w.router.double(), w.gate_up.double(), w.down.double())


@in_process
def test_alignment_pads_each_experts_rows_to_whole_tiles() -> None:
    choices = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)
    rows, tile_experts, padded = mt.align_by_expert(choices, 4, block_m=4)
    # Expert 0: rows 1, 4; expert 1: row 3; expert 2: rows 0, 2, 5; expert 3: none.
    assert int(padded) == 12
    assert rows[:12].tolist() == [1, 4, 6, 6, 3, 6, 6, 6, 0, 2, 5, 6]
    assert tile_experts[:3].tolist() == [0, 1, 2]

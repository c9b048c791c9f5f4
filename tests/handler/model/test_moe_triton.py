"""The grouped expert kernel (handler/model/moe_triton.py) against the plain reference
(moe.run_experts), under Triton's interpreter off CUDA, across shapes, top-k and dtypes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from handler.model.moe import ExpertWeights, run_experts

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"


def _kernels_in_this_process():
    """Import moe_triton, under the interpreter when there is no GPU; None when triton was
    already imported without it in this session (then a fresh process runs these tests)."""
    if ON_CUDA:
        from handler.model import moe_triton

        return moe_triton
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    os.environ["TRITON_INTERPRET"] = "1"
    from handler.model import moe_triton

    return moe_triton


mt = _kernels_in_this_process()
in_process = pytest.mark.skipif(mt is None, reason="runs in a fresh interpreter process")

if mt is None:

    def test_kernels_in_a_fresh_interpreter_process() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


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

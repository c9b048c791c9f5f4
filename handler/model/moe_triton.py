"""A grouped expert kernel in Triton: the GPU's run_experts (moe.py keeps the plain reference).

Each (token, k-th choice) pair is one row. Rows are sorted by expert and each expert's rows padded
to a multiple of BLOCK_M, on the device (no host sync, so the count of rows per expert never
leaves the GPU). One launch of the grouped matmul then multiplies every M-tile of rows by its
expert's weights: first the tokens by gate_up, then act(gate) * up by down, scaled by the
routing weight, and the k rows of a token are summed. The padding rows read nothing and write
nothing.

Under TRITON_INTERPRET=1 (set before triton is imported) the kernel runs on the CPU, which is
how the tests check it against the reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from handler.model.moe import ExpertWeights, activate

BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    row_weights_ptr,
    sorted_rows_ptr,
    tile_experts_ptr,
    num_padded_ptr,
    num_rows,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_DIV: tl.constexpr,  # row r reads activation row r // A_DIV (the token, for the first matmul)
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    if tile * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = tl.load(sorted_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_rows  # padding rows hold num_rows
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    a_rows = (rows // A_DIV).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + k[None, :],
            mask=valid[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + expert * stride_be + n[None, :].to(tl.int64) * stride_bn + k[:, None],
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            # The interpreter multiplies bfloat16 tiles as raw bits: widen them first.
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if MUL_WEIGHT:
        acc = acc * tl.load(row_weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    out_rows = rows.to(tl.int64)
    tl.store(
        c_ptr + out_rows[:, None] * stride_cm + n[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=valid[:, None] & n_mask[None, :],
    )


def align_by_expert(
    experts: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (token * top_k + choice) sorted by expert, each expert's run padded to a multiple of
    block_m with the row id num_rows; the expert of each tile; the padded length (a device
    scalar). The buffers are sized for the worst case, so nothing is read back to the host."""
    flat = experts.reshape(-1).to(torch.int64)
    num_rows = flat.shape[0]
    device = flat.device
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_rows, device=device) - first_of_expert[sorted_experts]
    destination = (ends - padded)[sorted_experts] + rank
    capacity = -(-(num_rows + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_rows = torch.full((capacity,), num_rows, dtype=torch.int64, device=device)
    sorted_rows[destination] = order
    tile_starts = torch.arange(0, capacity, block_m, device=device)
    tile_experts = torch.searchsorted(ends, tile_starts, right=True).clamp(max=num_experts - 1)
    return sorted_rows, tile_experts, ends[-1:].clone()


def _grouped_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    row_weights: torch.Tensor | None,
    aligned: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_div: int,
) -> None:
    sorted_rows, tile_experts, num_padded = aligned
    n, k = b.shape[1], b.shape[2]
    grid = (sorted_rows.shape[0] // BLOCK_M, triton.cdiv(n, BLOCK_N))
    _grouped_matmul_kernel[grid](
        a,
        b,
        out,
        out if row_weights is None else row_weights,
        sorted_rows,
        tile_experts,
        num_padded,
        out.shape[0],
        n,
        k,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        A_DIV=a_div,
        MUL_WEIGHT=row_weights is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        UPCAST=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    )


def run_experts_grouped(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w: ExpertWeights,
    activation: str,
) -> torch.Tensor:
    """moe.run_experts with the grouped kernel: sum over each token's k experts of
    weight * down(act(gate(x)) * up(x)). Rows of hidden and the weights must be contiguous."""
    num_tokens, top_k = experts.shape
    num_experts, two_inter, hidden_size = w.gate_up.shape
    if hidden.stride(1) != 1 or w.gate_up.stride(2) != 1 or w.down.stride(2) != 1:
        raise ValueError("hidden and the expert weights need contiguous rows")
    aligned = align_by_expert(experts, num_experts)
    num_rows = num_tokens * top_k
    gate_up = torch.empty(num_rows, two_inter, dtype=hidden.dtype, device=hidden.device)
    _grouped_matmul(hidden, w.gate_up, gate_up, None, aligned, top_k)
    gate, up = gate_up.chunk(2, dim=-1)
    inner = (activate(gate, activation) * up).contiguous()
    down = torch.empty(num_rows, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _grouped_matmul(inner, w.down, down, weights.reshape(-1).contiguous(), aligned, 1)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1)

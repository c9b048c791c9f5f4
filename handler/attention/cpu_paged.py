"""Paged attention on the CPU with the fused C kernels (handler/kernels), bfloat16 only.

Decodes read the paged cache in place, one kernel call per layer for the whole batch: no
gathered copies, transposes or masks. A sliding window and logit soft-capping are done in the
kernel too: a windowed decode reads only its window's keys (never the blocks a window group
released), so it costs the window, not the context. Prefill chunks go through the torch
backend's path, windows and soft-caps included (a step holds few of them and SDPA is efficient
on many query rows). Keys and values are stored by a kernel that skips padding slots (-1).
"""

from __future__ import annotations

import torch

from handler.attention.base import AttentionBackend, AttentionMetadata
from handler.attention.torch_backend import PrefillPlan, attend_prefill, plan_prefills
from handler.kernels.cpu import CpuKernels, check_range, load_cpu_kernels


class CpuKernelUnavailableError(RuntimeError):
    """The "cpu" backend was chosen but its kernels could not be built or loaded."""


class CpuPagedBackend(AttentionBackend):
    name = "cpu"

    def __init__(self, kernels: CpuKernels | None = None) -> None:
        kernels = kernels or load_cpu_kernels()
        if kernels is None:
            raise CpuKernelUnavailableError(
                "the cpu attention backend needs the fused CPU kernels (a C compiler); "
                "use attention_backend 'torch'"
            )
        self.kernels = kernels
        self._prefills: list[PrefillPlan] = []
        self._unchecked = False

    def fresh(self) -> CpuPagedBackend:
        return CpuPagedBackend(self.kernels)

    def prepare(self, meta: AttentionMetadata) -> None:
        self._prefills = plan_prefills(meta)
        self._unchecked = True

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
    ) -> torch.Tensor:
        # The first layer of a step checks shapes and indices; the others share them.
        check = self._unchecked
        if check:
            # The C code indexes memory with these: check them once per step, not per layer.
            num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
            check_range(meta.slot_mapping, "slot_mapping", -1, num_blocks * block_size)
            check_range(meta.block_tables, "block_tables", 0, num_blocks)
            check_range(meta.context_lens, "context_lens", 1, meta.max_context_len + 1)
            self._unchecked = False
        self.kernels.store_kv(k, v, meta.slot_mapping, k_cache, v_cache, check)
        nd = meta.num_decode_tokens
        decoded = None
        if nd:
            decoded = self.kernels.decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                meta.block_tables,
                meta.context_lens[:nd],
                meta.max_context_len,
                scale,
                check,
                sliding_window,
                logit_softcap,
            )
        if not self._prefills and decoded is not None:
            return decoded
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if decoded is not None:
            out[:nd] = decoded
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        for plan in self._prefills:
            out[plan.start : plan.end] = attend_prefill(
                q, k, v, k_flat, v_flat, plan, scale, sliding_window, logit_softcap
            )
        return out

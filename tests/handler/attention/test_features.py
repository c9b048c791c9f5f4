"""Per-layer attention features: every backend (the torch reference, the fused CPU kernels, the
Triton kernels, flash-attn) implements windows and soft-capping; a backend without one refuses
it rather than compute plain attention, and the backend choice follows what the model needs."""

from __future__ import annotations

import pytest
import torch

from handler.attention import registry
from handler.attention.base import (
    LOGIT_SOFTCAP,
    SLIDING_WINDOW,
    UnsupportedAttentionError,
    refuse_features,
)
from handler.attention.registry import resolve_backend_name

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BOTH = frozenset({SLIDING_WINDOW, LOGIT_SOFTCAP})


def test_auto_picks_a_backend_that_has_what_the_model_needs() -> None:
    assert resolve_backend_name("auto", CPU, 16, cpu_kernels=True) == "cpu"
    assert resolve_backend_name("auto", CPU, 16, cpu_kernels=True, needs=BOTH) == "cpu"
    assert resolve_backend_name("auto", CPU, 16, cpu_kernels=False, needs=BOTH) == "torch"
    assert resolve_backend_name("cpu", CPU, 16, needs=BOTH) == "cpu"
    assert resolve_backend_name("auto", CUDA, 16) == "triton"
    assert resolve_backend_name("auto", CUDA, 16, needs=BOTH) == "triton"
    assert resolve_backend_name("torch", CUDA, 16, needs=BOTH) == "torch"
    assert resolve_backend_name("triton", CUDA, 16, needs=BOTH) == "triton"
    assert resolve_backend_name("flash", CUDA, 256, needs=BOTH) == "flash"


def test_a_backend_without_the_feature_is_refused_or_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No backend lacks a feature today: a stand-in table where the cpu kernels lack both."""
    monkeypatch.setitem(registry.FEATURES, "cpu", frozenset())
    name = "cpu"
    assert resolve_backend_name("auto", CPU, 16, cpu_kernels=True, needs=BOTH) == "torch"
    with pytest.raises(ValueError, match="sliding-window attention.*use attention backend"):
        resolve_backend_name(name, CUDA, 256, needs=frozenset({SLIDING_WINDOW}))
    with pytest.raises(ValueError, match="logit soft-capping"):
        resolve_backend_name(name, CUDA, 256, needs=frozenset({LOGIT_SOFTCAP}))


def test_a_backend_without_a_feature_refuses_it_at_run_time() -> None:
    refuse_features("future", None, None)
    with pytest.raises(UnsupportedAttentionError, match="future .* sliding-window attention"):
        refuse_features("future", 4096, None)
    with pytest.raises(UnsupportedAttentionError, match="or logit soft-capping"):
        refuse_features("future", 4096, 50.0)


def test_flash_gets_the_window_and_softcap_as_its_own_arguments() -> None:
    """flash-attn is not installed here: a stand-in module records what the backend passes."""
    from types import SimpleNamespace

    from handler.attention.base import AttentionMetadata
    from handler.attention.flash import FlashAttentionBackend

    calls: list[tuple[str, dict[str, object]]] = []

    def record(name: str):
        def call(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
            calls.append((name, kwargs))
            return torch.zeros_like(q)

        return call

    backend = FlashAttentionBackend.__new__(FlashAttentionBackend)
    backend._flash = SimpleNamespace(  # type: ignore[assignment]
        flash_attn_with_kvcache=record("decode"), flash_attn_varlen_func=record("prefill")
    )
    backend._store = lambda *args: None
    cache = torch.zeros(2, 256, 1, 8)
    meta = AttentionMetadata(
        num_seqs=2,
        num_decode_tokens=1,
        slot_mapping=torch.tensor([5, 0, 1]),
        block_tables=torch.tensor([[0], [1]], dtype=torch.int32),
        context_lens=torch.tensor([6, 2], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 3], dtype=torch.int32),
        max_query_len=2,
        max_context_len=6,
        block_size=256,
        query_start_loc_host=[0, 1, 3],
        context_lens_host=[6, 2],
    )
    q, kv = torch.zeros(3, 2, 8), torch.zeros(3, 1, 8)
    backend.forward(q, kv, kv, cache, cache, meta, 0.5, sliding_window=4, logit_softcap=30.0)
    assert [name for name, _ in calls] == ["decode", "prefill"]
    for _, kwargs in calls:
        assert kwargs["window_size"] == (3, 0) and kwargs["softcap"] == 30.0
    calls.clear()
    backend.forward(q, kv, kv, cache, cache, meta, 0.5)
    assert all("window_size" not in kw and "softcap" not in kw for _, kw in calls)

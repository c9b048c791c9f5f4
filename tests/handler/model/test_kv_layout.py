"""Layer groups for the KV cache (handler/model/kv_layout.py): by attention kind, of equal size."""

from __future__ import annotations

from dataclasses import replace

from handler.model.config import ModelConfig, RopeConfig
from handler.model.kv_layout import KVLayout

BASE = ModelConfig(
    architecture="Gemma3ForCausalLM",
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_layers=18,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
)


def _pattern(num_layers: int, every: int, window: int) -> tuple[int | None, ...]:
    return tuple(None if (i + 1) % every == 0 else window for i in range(num_layers))


def test_gemma3_270m_five_local_to_one_global() -> None:
    config = replace(BASE, layer_windows=_pattern(18, 6, 512))
    layout = KVLayout.of(config, 32768)
    # 3 global layers, 15 local: groups of 3 layers, one global and five window groups.
    assert layout.slots == 3 and layout.group_windows == (None,) + (512,) * 5
    assert [layout.layer_groups[i] for i in (5, 11, 17)] == [0, 0, 0]
    assert layout.layer_slots[:6] == (0, 1, 2, 0, 1, 0)
    # Every (group, slot) pair is one layer: no two layers share a cache tensor's pages.
    pairs = set(zip(layout.layer_groups, layout.layer_slots, strict=True))
    assert len(pairs) == 18
    # A 4096-token sequence in blocks of 16 (chunks of 256): 256 global blocks, window groups
    # at most (511 + 256) // 16 + 2 = 49 each, against 6 * 256 without groups.
    assert layout.blocks_for(4096, 16, 256) == 256 + 5 * 49


def test_an_uneven_kind_leaves_its_last_group_short() -> None:
    config = replace(BASE, num_layers=26, layer_windows=_pattern(26, 6, 512))
    layout = KVLayout.of(config, 32768)
    assert layout.slots == 4 and layout.group_windows == (None,) + (512,) * 6
    assert layout.layer_groups.count(6) == 2  # 22 local layers: five groups of 4, one of 2


def test_one_kind_keeps_todays_layout() -> None:
    assert KVLayout.of(BASE, 4096) == KVLayout.single(18)
    mistral = KVLayout.of(replace(BASE, layer_windows=(4096,) * 18), 32768)
    assert mistral.group_windows == (4096,) and mistral.layer_slots == tuple(range(18))
    # A window as long as the context is global attention.
    assert KVLayout.of(replace(BASE, layer_windows=(4096,) * 18), 4096) == KVLayout.single(18)


def test_too_many_groups_or_longrope_keep_every_layers_context() -> None:
    one_window = replace(BASE, num_layers=28, layer_windows=(None,) * 27 + (64,))
    assert KVLayout.of(one_window, 4096) == KVLayout.single(28)
    longrope = RopeConfig(rope_type="longrope", short_factor=(1.0,), long_factor=(2.0,))
    phi3 = replace(BASE, layer_windows=(64,) * 18, rope=longrope)
    assert KVLayout.of(phi3, 4096) == KVLayout.single(18)

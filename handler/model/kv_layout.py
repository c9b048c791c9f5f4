"""How the layers' KV caches share one block pool: layer groups by attention kind.

A layer with a sliding window shorter than the context needs only the last `window` tokens'
keys and values; a global layer needs them all. So layers are grouped by kind (global, or window
W), and each group keeps its own block table per sequence: a window group's table drops the
blocks no query still to come can see, a global group's grows with the context.

All groups draw from one pool of block ids, as in vLLM's hybrid allocator: every group has the
same number of layers (`slots`, the layer count of the smallest kind; a kind whose count does
not divide evenly leaves its last group short), and cache tensor s holds, for each group, its
s-th layer. A block id is then one page in every tensor, and whichever group holds it uses those
pages for its layers. A model whose layers are all of one kind has one group of every layer:
today's layout, one tensor per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from handler.model.config import ModelConfig

# Beyond this many groups the per-step bookkeeping (a block table per group) outweighs the
# memory saved: such models keep every layer's KV for the whole context.
MAX_GROUPS = 8


@dataclass(frozen=True)
class KVLayout:
    group_windows: tuple[int | None, ...]  # per group: its layers' window (None: global)
    layer_groups: tuple[int, ...]  # per layer: its group
    layer_slots: tuple[int, ...]  # per layer: the cache tensor it reads and writes
    slots: int  # cache tensors (layers per group)

    @property
    def num_groups(self) -> int:
        return len(self.group_windows)

    @classmethod
    def single(cls, num_layers: int) -> KVLayout:
        return cls((None,), (0,) * num_layers, tuple(range(num_layers)), num_layers)

    @classmethod
    def of(cls, config: ModelConfig, context: int) -> KVLayout:
        """The layout for contexts up to `context` tokens: a window at least as long as the
        context is global. LongRoPE models keep every token's KV (a sequence crossing the
        original context is recomputed whole, earliest tokens included)."""
        n = config.num_layers
        windows = [config.window_of(i) for i in range(n)]
        windows = [w if w is not None and w < context else None for w in windows]
        if config.rope.has_long_variant or all(w is None for w in windows):
            return cls.single(n)
        kinds = sorted(set(windows), key=lambda w: -1 if w is None else w)
        if len(kinds) == 1:
            return cls((kinds[0],), (0,) * n, tuple(range(n)), n)
        by_kind = {kind: [i for i in range(n) if windows[i] == kind] for kind in kinds}
        slots = min(len(layers) for layers in by_kind.values())
        group_windows: list[int | None] = []
        layer_groups, layer_slots = [0] * n, [0] * n
        for kind in kinds:
            layers = by_kind[kind]
            for start in range(0, len(layers), slots):
                for slot, layer in enumerate(layers[start : start + slots]):
                    layer_groups[layer], layer_slots[layer] = len(group_windows), slot
                group_windows.append(kind)
        if len(group_windows) > MAX_GROUPS:
            return cls.single(n)
        return cls(tuple(group_windows), tuple(layer_groups), tuple(layer_slots), slots)

    def blocks_for(self, num_tokens: int, block_size: int, chunk: int) -> int:
        """Blocks a sequence of num_tokens tokens holds at most, over all groups, when it
        computes at most `chunk` tokens a step: a window group holds the blocks its window
        reaches back to, plus the step's."""
        full = -(-num_tokens // block_size)
        total = 0
        for window in self.group_windows:
            if window is None:
                total += full
            else:
                total += min(full, (window - 1 + chunk) // block_size + 2)
        return total

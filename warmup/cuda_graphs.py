"""CUDA graphs for decode steps: one graph per batch size, replayed with the inputs copied into
static buffers.

Graphs are captured largest batch first so that every later, smaller graph fits in the memory pool
the first one reserved (they share it). A step of B sequences replays the smallest captured size
>= B; the rows past B are padding: slot -1 (their KV writes nowhere) and context length 0. The
graph ends at the hidden states: the LM head and sampling run outside it on just the real rows.

warmup knows nothing of the engine: the engine passes its forward with the KV caches bound
(DecodeModel) and a function that turns a graph's DecodeView into its attention metadata. The
attention backend must read only device tensors and Python ints fixed at capture (the Triton
backend does; the torch reference backend, which reads host lists, is not graph-safe).

A model whose layers keep their KV in several groups (each with its own block tables, e.g.
sliding-window and global layers) has static buffers for every group's block tables and slots.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)

SMALL_SIZES = (1, 2, 4, 8)
LARGE_STEP = 8  # after 8: 16, 24, 32, ...


class DecodeModel(Protocol):
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: Any
    ) -> torch.Tensor:
        """Hidden states [batch, hidden] for one decode token per sequence; writes their KV."""
        ...


@dataclass(frozen=True)
class DecodeView:
    """What a graph of `batch` rows reads: views of the static buffers, and the longest context
    a block table can address (fixed at capture)."""

    batch: int
    slot_mapping: torch.Tensor  # [batch] int64, -1 = padding
    block_tables: torch.Tensor  # [batch, blocks] int32
    context_lens: torch.Tensor  # [batch] int32
    query_start_loc: torch.Tensor  # [batch + 1] int32: 0, 1, ..., batch
    max_context_len: int
    block_size: int
    # The block tables [batch, blocks] and slots [batch] of the KV groups after the first.
    group_block_tables: tuple[torch.Tensor, ...] = ()
    group_slot_mappings: tuple[torch.Tensor, ...] = ()


# The engine's translation of a DecodeView into the metadata its attention backends read.
DecodeMetadataFn = Callable[[DecodeView], Any]


# capture(step, pool) -> (replay, output, pool): record `step` once, return a function that
# re-runs it and the tensor it writes. The default records a CUDA graph; tests pass an eager one.
CaptureFn = Callable[
    [Callable[[], torch.Tensor], Any], tuple[Callable[[], None], torch.Tensor, Any]
]


def capture_cuda_graph(
    step: Callable[[], torch.Tensor], pool: Any
) -> tuple[Callable[[], None], torch.Tensor, Any]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return graph.replay, output, graph.pool()


def capture_eagerly(
    step: Callable[[], torch.Tensor], pool: Any
) -> tuple[Callable[[], None], torch.Tensor, Any]:
    """A stand-in for capture off CUDA: replay re-runs the step into the same output tensor, so
    the runner's buffer handling can be checked on a CPU."""
    output = step()
    return (lambda: output.copy_(step())), output, pool


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture, ascending: 1, 2, 4, 8, 16, 24, 32, ... up to max_batch, which is
    always included so that every batch up to it has a graph."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    sizes = [s for s in SMALL_SIZES if s <= max_batch]
    sizes += list(range(2 * LARGE_STEP, max_batch + 1, LARGE_STEP))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def pick_graph_size(sizes: Sequence[int], batch: int) -> int | None:
    """The smallest of the ascending `sizes` that holds `batch`; None when none does."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeInputs:
    """One decode step's rows: a token per sequence, where it goes and what it attends to."""

    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64
    block_tables: torch.Tensor  # [B, blocks] int32
    context_lens: torch.Tensor  # [B] int32
    # The KV groups after the first: block tables [B, blocks] and slots [B] of each.
    group_block_tables: list[torch.Tensor] = field(default_factory=list)
    group_slot_mappings: list[torch.Tensor] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class StaticDecodeBuffers:
    """The tensors a captured graph reads; every step's inputs are copied into them."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    query_start_loc: torch.Tensor
    # [groups - 1, max_batch, max_blocks_per_seq] and [groups - 1, max_batch]: the other groups.
    group_block_tables: torch.Tensor
    group_slot_mappings: torch.Tensor

    @classmethod
    def allocate(
        cls,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device | str,
        kv_groups: int = 1,
    ) -> StaticDecodeBuffers:
        extra = kv_groups - 1
        buffers = cls(
            input_ids=torch.zeros(max_batch, dtype=torch.int64, device=device),
            positions=torch.zeros(max_batch, dtype=torch.int64, device=device),
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
            block_tables=torch.zeros(
                max_batch, max_blocks_per_seq, dtype=torch.int32, device=device
            ),
            context_lens=torch.zeros(max_batch, dtype=torch.int32, device=device),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            group_block_tables=torch.zeros(
                extra, max_batch, max_blocks_per_seq, dtype=torch.int32, device=device
            ),
            group_slot_mappings=torch.full(
                (extra, max_batch), -1, dtype=torch.int64, device=device
            ),
        )
        return buffers

    @property
    def max_batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def max_blocks_per_seq(self) -> int:
        return self.block_tables.shape[1]

    def fill(self, step: DecodeInputs, graph_batch: int) -> None:
        """Copy the step's rows in and make rows batch..graph_batch padding that writes nowhere."""
        batch = step.batch
        if not 1 <= batch <= graph_batch <= self.max_batch:
            raise ValueError(
                f"need 1 <= batch ({batch}) <= graph batch ({graph_batch}) <= {self.max_batch}"
            )
        for name in ("positions", "slot_mapping", "context_lens"):
            if getattr(step, name).shape != (batch,):
                raise ValueError(f"{name} must have shape [{batch}]")
        if step.block_tables.dim() != 2 or step.block_tables.shape[0] != batch:
            raise ValueError(f"block_tables must be [{batch}, blocks]")
        width = step.block_tables.shape[1]
        if width > self.max_blocks_per_seq:
            raise ValueError(
                f"block tables of {width} blocks exceed the captured {self.max_blocks_per_seq}"
            )
        extra = self.group_block_tables.shape[0]
        if len(step.group_block_tables) != extra or len(step.group_slot_mappings) != extra:
            raise ValueError(f"the graphs were captured for {extra + 1} KV groups")
        for g, (table, slots) in enumerate(
            zip(step.group_block_tables, step.group_slot_mappings, strict=True)
        ):
            if table.shape != step.block_tables.shape or slots.shape != (batch,):
                raise ValueError(f"KV group {g + 1}'s block tables or slots have another shape")
            self.group_block_tables[g, :batch, :width].copy_(table, non_blocking=True)
            self.group_block_tables[g, :batch, width:].zero_()
            self.group_slot_mappings[g, :batch].copy_(slots, non_blocking=True)
        self.input_ids[:batch].copy_(step.input_ids, non_blocking=True)
        self.positions[:batch].copy_(step.positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(step.slot_mapping, non_blocking=True)
        self.context_lens[:batch].copy_(step.context_lens, non_blocking=True)
        self.block_tables[:batch, :width].copy_(step.block_tables, non_blocking=True)
        self.block_tables[:batch, width:].zero_()
        self.pad(batch, graph_batch)

    def pad(self, start: int, stop: int) -> None:
        """Rows start..stop become padding: token 0 at position 0, slot -1, empty context."""
        self.input_ids[start:stop].zero_()
        self.positions[start:stop].zero_()
        self.slot_mapping[start:stop].fill_(-1)
        self.context_lens[start:stop].zero_()
        self.block_tables[start:stop].zero_()
        self.group_block_tables[:, start:stop].zero_()
        self.group_slot_mappings[:, start:stop].fill_(-1)

    def view(self, graph_batch: int, block_size: int) -> DecodeView:
        """The rows a graph of graph_batch reads (views of these buffers)."""
        return DecodeView(
            batch=graph_batch,
            slot_mapping=self.slot_mapping[:graph_batch],
            block_tables=self.block_tables[:graph_batch],
            context_lens=self.context_lens[:graph_batch],
            query_start_loc=self.query_start_loc[: graph_batch + 1],
            max_context_len=self.max_blocks_per_seq * block_size,
            block_size=block_size,
            group_block_tables=tuple(t[:graph_batch] for t in self.group_block_tables),
            group_slot_mappings=tuple(s[:graph_batch] for s in self.group_slot_mappings),
        )


@dataclass(frozen=True)
class CaptureTiming:
    batch: int
    seconds: float


class CudaGraphDecodeRunner:
    """Captures decode graphs for a model and replays the right one for each step."""

    def __init__(
        self,
        model: DecodeModel,
        decode_metadata: DecodeMetadataFn,
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device | str,
        capture_fn: CaptureFn = capture_cuda_graph,
        kv_groups: int = 1,
    ) -> None:
        self.model = model
        self.decode_metadata = decode_metadata
        self.block_size = block_size
        self.device = torch.device(device)
        self.buffers = StaticDecodeBuffers.allocate(
            max_batch, max_blocks_per_seq, self.device, kv_groups
        )
        self._capture_fn = capture_fn
        self._replays: dict[int, Callable[[], None]] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.sizes: list[int] = []
        self.timings: list[CaptureTiming] = []

    def capture(self, sizes: Sequence[int] | None = None) -> list[CaptureTiming]:
        """Capture one graph per size, largest first in one shared pool; returns their timings."""
        wanted = sorted(set(sizes or capture_sizes(self.buffers.max_batch)))
        if not wanted or wanted[0] < 1 or wanted[-1] > self.buffers.max_batch:
            raise ValueError(f"capture sizes must lie in [1, {self.buffers.max_batch}]: {wanted}")
        # Every row is padding while capturing: warm-up and capture write no KV anywhere.
        self.buffers.pad(0, self.buffers.max_batch)
        pool = None
        timings = []
        for size in reversed(wanted):
            started = time.perf_counter()
            step = self._step_fn(size)
            step()  # warm-up outside the graph: kernel compilation, library handles
            self._synchronize()
            replay, output, pool = self._capture_fn(step, pool)
            self._synchronize()
            seconds = time.perf_counter() - started
            self._replays[size] = replay
            self._outputs[size] = output
            timings.append(CaptureTiming(size, seconds))
            log.info("captured the decode graph for batch %d in %.1f ms", size, seconds * 1e3)
        self.sizes = wanted
        self.timings = timings
        return timings

    def _step_fn(self, size: int) -> Callable[[], torch.Tensor]:
        buffers = self.buffers
        meta = self.decode_metadata(buffers.view(size, self.block_size))
        input_ids, positions = buffers.input_ids[:size], buffers.positions[:size]
        return lambda: self.model.forward(input_ids, positions, meta)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def graph_size_for(self, step: DecodeInputs) -> int | None:
        """The captured size this step would replay, or None (run it eagerly instead)."""
        if not self.sizes or step.block_tables.shape[1] > self.buffers.max_blocks_per_seq:
            return None
        return pick_graph_size(self.sizes, step.batch)

    def run(self, step: DecodeInputs) -> torch.Tensor:
        """Hidden states [B, hidden] of the step's real rows (a view into the graph's output,
        valid until the next replay)."""
        size = self.graph_size_for(step)
        if size is None:
            raise ValueError(
                f"no captured graph holds a batch of {step.batch} with "
                f"{step.block_tables.shape[1]} blocks per sequence; run this step eagerly"
            )
        self.buffers.fill(step, size)
        self._replays[size]()
        return self._outputs[size][: step.batch]

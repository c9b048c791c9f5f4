"""Streaming weight files into one preallocated buffer: reader threads fill a ring of (pinned)
host buffers, and asynchronous copies on a CUDA stream overlap the reads.

The plan is a pure function and the streaming also runs with a CPU destination, so both are
tested without a GPU.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from snapshot.errors import SnapshotError
from snapshot.tensorfile import TensorFile

CHUNK_BYTES = 16 * 1024 * 1024
BASE_ALIGN = 256  # each file's bytes start at a multiple of this in the device buffer
# Page-cache reads run at a few GB/s per thread; PCIe 5 wants ~50 GB/s.
READER_THREADS = min(8, os.cpu_count() or 1)
RING_BUFFERS = 2 * READER_THREADS


@dataclass(frozen=True)
class Chunk:
    """Bytes [file_offset, file_offset + length) of file `file_index` go to `dest_offset`."""

    file_index: int
    file_offset: int
    length: int
    dest_offset: int


@dataclass(frozen=True)
class CopyPlan:
    file_bases: list[int]  # where each file's data section starts in the buffer
    total_bytes: int
    chunks: list[Chunk]


def plan_copy(files: Sequence[TensorFile], chunk_bytes: int = CHUNK_BYTES) -> CopyPlan:
    """Lay the data sections of `files` out back to back (aligned) and cut them into chunks."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    bases, chunks, cursor = [], [], 0
    for index, file in enumerate(files):
        cursor += -cursor % BASE_ALIGN
        bases.append(cursor)
        for start in range(0, file.data_bytes, chunk_bytes):
            length = min(chunk_bytes, file.data_bytes - start)
            chunks.append(Chunk(index, file.data_start + start, length, cursor + start))
        cursor += file.data_bytes
    return CopyPlan(bases, cursor, chunks)


def stream_into(
    files: Sequence[TensorFile],
    plan: CopyPlan,
    dest: Any,
    threads: int = READER_THREADS,
    ring: int = RING_BUFFERS,
    staged: bool | None = None,
) -> None:
    """Fill `dest` (a uint8 torch tensor of plan.total_bytes, on CUDA or the CPU) from the files.

    A CPU destination is read into directly. A CUDA one goes through the ring of pinned buffers
    (staged=True forces the ring on the CPU too, which is how it is tested without a GPU).
    """
    if not plan.chunks:
        return
    fds = [os.open(f.path, os.O_RDONLY) for f in files]
    try:
        if dest.is_cuda if staged is None else staged:
            chunk_bytes = max(c.length for c in plan.chunks)
            staging = _StagingRing(dest, chunk_bytes, ring)
            try:
                move = staging.move
                _in_parallel(plan.chunks, lambda c: move(fds[c.file_index], c, files), threads)
            finally:
                staging.finish()  # no copy may still read a buffer once this returns
        else:

            def read_in_place(chunk: Chunk) -> None:
                target = dest[chunk.dest_offset : chunk.dest_offset + chunk.length]
                _read_exactly(fds[chunk.file_index], target.numpy(), chunk, files)

            _in_parallel(plan.chunks, read_in_place, threads)
    finally:
        for fd in fds:
            os.close(fd)


class _StagingRing:
    """Host buffers (pinned for CUDA) that reader threads fill and a copy stream empties.

    A buffer is reused only after the event recorded behind its last copy has fired, so reads
    of the next chunks overlap the copies of the previous ones.
    """

    def __init__(self, dest: Any, chunk_bytes: int, size: int) -> None:
        import torch

        self.torch = torch
        self.dest = dest
        cuda = dest.is_cuda
        self.buffers = [
            torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(size)
        ]
        self.events: list[Any] = [None] * size
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(size):
            self.free.put(slot)
        self.stream = torch.cuda.Stream(device=dest.device) if cuda else None

    def move(self, fd: int, chunk: Chunk, files: Sequence[TensorFile]) -> None:
        torch = self.torch
        slot = self.free.get()
        try:
            if self.events[slot] is not None:
                self.events[slot].synchronize()
            buffer = self.buffers[slot][: chunk.length]
            _read_exactly(fd, buffer.numpy(), chunk, files)
            target = self.dest[chunk.dest_offset : chunk.dest_offset + chunk.length]
            if self.stream is None:
                target.copy_(buffer)
                return
            with torch.cuda.stream(self.stream):
                target.copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events[slot] = event
        finally:
            self.free.put(slot)

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


def _in_parallel(chunks: Sequence[Chunk], work: Callable[[Chunk], None], threads: int) -> None:
    """Run `work` on every chunk from `threads` threads; the first error stops the rest."""
    todo: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
    for chunk in chunks:
        todo.put(chunk)
    failed = threading.Event()

    def worker() -> None:
        while not failed.is_set():
            try:
                chunk = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(chunk)
            except BaseException:
                failed.set()
                raise

    count = max(1, threads)
    with ThreadPoolExecutor(max_workers=count) as pool:
        for future in [pool.submit(worker) for _ in range(count)]:
            future.result()


def _read_exactly(fd: int, into: Any, chunk: Chunk, files: Sequence[TensorFile]) -> None:
    view = memoryview(into)
    done = 0
    while done < chunk.length:
        n = os.preadv(fd, [view[done:]], chunk.file_offset + done)
        if n == 0:
            name = files[chunk.file_index].path.name
            raise SnapshotError(f"{name}: ends before byte {chunk.file_offset + chunk.length}")
        done += n

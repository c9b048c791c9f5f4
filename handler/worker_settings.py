"""The worker's settings: one object, read from the environment the gateway passes (README's
worker table), before torch is imported."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from handler.engine.config import DEVICE_AUTO, EngineConfig
from handler.engine.faults import FaultInjection
from handler.env import EnvReader, SettingsError


@dataclass(frozen=True)
class WorkerSettings:
    socket_path: str  # THAW_SOCKET: the gateway's Unix socket
    snapshot: str  # THAW_SNAPSHOT: the snapshot directory
    engine: EngineConfig

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """SettingsError naming the variable when one is unusable."""
        read = EnvReader(env)
        socket_path = read.optional_text("THAW_SOCKET")
        snapshot = read.optional_text("THAW_SNAPSHOT")
        if socket_path is None or snapshot is None:
            raise SettingsError(
                "the worker needs THAW_SOCKET and THAW_SNAPSHOT (set by the gateway)"
            )
        defaults = EngineConfig()
        faults = None
        fault_options = read.options("THAW_FAULT_INJECT")
        if fault_options:
            try:
                faults = FaultInjection.from_options(fault_options)
            except ValueError as exc:
                raise SettingsError(f"THAW_FAULT_INJECT: {exc}") from None
        try:
            engine = EngineConfig(
                device=read.text("THAW_DEVICE", DEVICE_AUTO),
                dtype=read.optional_text("THAW_DTYPE"),
                kv_cache_bytes=read.optional_integer("THAW_KV_CACHE_BYTES", minimum=1),
                max_num_seqs=read.integer("THAW_MAX_NUM_SEQS", defaults.max_num_seqs, 1),
                max_num_batched_tokens=read.integer(
                    "THAW_MAX_BATCHED_TOKENS", defaults.max_num_batched_tokens, 1
                ),
                block_size=read.integer("THAW_BLOCK_SIZE", defaults.block_size, 1),
                attention_backend=read.text("THAW_ATTENTION_BACKEND", defaults.attention_backend),
                gpu_memory_fraction=read.number(
                    "THAW_GPU_MEMORY_FRACTION", defaults.gpu_memory_fraction
                ),
                cuda_graph_max_batch=read.integer(
                    "THAW_CUDA_GRAPH_MAX_BATCH", defaults.cuda_graph_max_batch, 0
                ),
                cpu_kernels=read.flag("THAW_CPU_KERNELS", defaults.cpu_kernels),
                # The warm profile is read from and recorded in the served snapshot.
                snapshot_dir=snapshot,
                fault_injection=faults,
            )
        except ValueError as exc:
            if isinstance(exc, SettingsError):
                raise
            raise SettingsError(str(exc)) from None
        return cls(socket_path=socket_path, snapshot=snapshot, engine=engine)

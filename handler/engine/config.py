"""The engine's settings: one object, built by the worker from its environment
(handler/worker_settings.py) or by callers in process. No torch here, so the worker can read its
settings before it imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from handler.engine.faults import FaultInjection

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_AUTO = "auto"


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # wins over kv_cache_bytes when both are set
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    enable_prefix_caching: bool = True
    device: str = "cpu"  # "auto" = cuda when available, else cpu
    # None = the weights' dtype; a name in DTYPES (a torch.dtype is taken and named)
    dtype: str | None = None
    # "auto" (flash or triton on CUDA, cpu or torch off it) or a backend name
    # (handler/attention/registry.py)
    attention_backend: str = "auto"
    # On CUDA, without num_kv_blocks/kv_cache_bytes: the share of the memory free after the
    # weights that the KV cache and one step's activations may take.
    gpu_memory_fraction: float = 0.9
    cuda_graph_max_batch: int = 64  # decode CUDA graphs up to this batch; 0 = off (CUDA only)
    snapshot_dir: str | None = None  # where the warm profile is read and recorded, if any
    # Pack bfloat16 CPU weights at load (handler/model/linear.py): for thaw's matrix multiply
    # when the kernels have it, else for oneDNN (same outputs as F.linear). Faster matmuls, a
    # copy of the weights in memory instead of the mapped files.
    pack_cpu_weights: bool = True
    # Fused C kernels with bfloat16 on the CPU (handler/kernels); float32 keeps plain torch ops,
    # bit-exact with transformers.
    cpu_kernels: bool = True
    # Test-only faults (THAW_FAULT_INJECT); None = none, the engine then carries no injector.
    fault_injection: FaultInjection | None = None

    def __post_init__(self) -> None:
        """ValueError naming the first bad setting; checked on every device, so a config tested
        on the CPU cannot fail first on the GPU."""
        if self.dtype is not None and not isinstance(self.dtype, str):
            self.dtype = _dtype_name(self.dtype)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _positive(name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        fraction = self.gpu_memory_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"gpu_memory_fraction must be a number, got {fraction!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {fraction}")
        graphs = self.cuda_graph_max_batch
        if isinstance(graphs, bool) or not isinstance(graphs, int) or graphs < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {graphs!r}")

    @property
    def graph_max_batch(self) -> int:
        # A decode step never holds more sequences than the scheduler runs at once.
        return min(self.cuda_graph_max_batch, self.max_num_seqs)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _dtype_name(dtype: Any) -> str:
    # torch.float32 prints as "torch.float32"; torch is not imported here.
    return str(dtype).removeprefix("torch.")

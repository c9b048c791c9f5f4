"""The worker process: connects to the gateway, loads the snapshot, drains submits.

Started by the gateway with THAW_SOCKET (the gateway's Unix socket) and THAW_SNAPSHOT (the
snapshot directory) in its environment. The handshake happens before torch is imported, so the
gateway knows within milliseconds that the worker is alive; each start-up phase is reported as it
ends. See docs/protocol.md.
"""

from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from handler.protocol import (
    PROTOCOL_VERSION,
    FrameSocket,
    ProtocolError,
    message,
    output_item,
    validate_submit,
)

_T0 = time.perf_counter()
STATS_INTERVAL_S = 0.5
EXIT_REJECTED = 3
EXIT_PROTOCOL = 4


def _ms() -> float:
    return (time.perf_counter() - _T0) * 1000.0


def log(text: str) -> None:
    print(f"[worker {os.getpid()}] {text}", file=sys.stderr, flush=True)


@dataclass
class WorkerSettings:
    """Engine settings from the environment (documented in README's configuration table)."""

    socket_path: str
    snapshot: str
    device: str
    dtype: str | None
    kv_cache_bytes: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    attention_backend: str
    gpu_memory_fraction: float
    cuda_graph_max_batch: int
    cpu_kernels: bool

    @classmethod
    def from_env(cls, env: dict[str, str]) -> WorkerSettings:
        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return float(raw)
            except ValueError:
                raise SystemExit(f"{name} must be a number, got {raw!r}") from None

        def integer(name: str, default: int | None) -> int | None:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                return int(raw)
            except ValueError:
                raise SystemExit(f"{name} must be an integer, got {raw!r}") from None

        def flag(name: str, default: bool) -> bool:
            raw = (env.get(name) or "").strip().lower()
            if not raw:
                return default
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            raise SystemExit(f"{name} must be true or false, got {env.get(name)!r}")

        socket_path = env.get("THAW_SOCKET", "")
        snapshot = env.get("THAW_SNAPSHOT", "")
        if not socket_path or not snapshot:
            raise SystemExit("the worker needs THAW_SOCKET and THAW_SNAPSHOT (set by the gateway)")
        return cls(
            socket_path=socket_path,
            snapshot=snapshot,
            device=env.get("THAW_DEVICE", "auto"),
            dtype=env.get("THAW_DTYPE") or None,
            kv_cache_bytes=integer("THAW_KV_CACHE_BYTES", None),
            max_num_seqs=integer("THAW_MAX_NUM_SEQS", 64) or 64,
            max_num_batched_tokens=integer("THAW_MAX_BATCHED_TOKENS", 2048) or 2048,
            block_size=integer("THAW_BLOCK_SIZE", 16) or 16,
            attention_backend=env.get("THAW_ATTENTION_BACKEND") or "auto",
            gpu_memory_fraction=number("THAW_GPU_MEMORY_FRACTION", 0.9),
            cuda_graph_max_batch=integer("THAW_CUDA_GRAPH_MAX_BATCH", 64) or 0,
            cpu_kernels=flag("THAW_CPU_KERNELS", True),
        )


class Inbox:
    """Frames from the gateway, read on a thread so the engine never blocks on the socket."""

    def __init__(self, conn: FrameSocket) -> None:
        self.conn = conn
        self.frames: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, name="inbox", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                self.frames.put(self.conn.recv())
            except BaseException as exc:  # EOF or a protocol error ends the inbox
                self.frames.put(exc)
                return

    def get(self, timeout: float | None) -> dict[str, Any] | BaseException | None:
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty:
            return None


def handshake(conn: FrameSocket) -> None:
    conn.send(message("hello", version=PROTOCOL_VERSION, pid=os.getpid()))
    reply = conn.recv()
    if reply["t"] == "reject":
        log(f"gateway rejected protocol version {PROTOCOL_VERSION}: {reply.get('reason')}")
        raise SystemExit(EXIT_REJECTED)
    if reply["t"] != "welcome":
        raise ProtocolError(f"expected welcome, got {reply['t']}")


def main() -> int:
    settings = WorkerSettings.from_env(dict(os.environ))
    conn = FrameSocket.connect(settings.socket_path)
    handshake(conn)
    inbox = Inbox(conn)
    inbox.start()
    try:
        engine = start_engine(settings, conn)
    except Exception as exc:  # any start-up failure is reported, then the process exits
        log(f"start-up failed: {exc!r}")
        conn.send(message("fatal", message=f"{type(exc).__name__}: {exc}"))
        return 1
    try:
        return serve(engine, conn, inbox)
    finally:
        # Back under the collector, so interpreter shutdown frees it as usual.
        gc.unfreeze()


def start_engine(settings: WorkerSettings, conn: FrameSocket) -> Any:
    import torch

    conn.send(message("phase", name="torch_imported", ms=_ms()))
    from handler.engine import EngineConfig, LLMEngine
    from handler.model.config import ModelConfig
    from snapshot.loader import load_snapshot

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = None
    if settings.dtype is not None:
        dtype = getattr(torch, settings.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"THAW_DTYPE {settings.dtype!r} is not a torch dtype")
    loaded = load_snapshot(settings.snapshot, device=device)
    conn.send(message("phase", name="weights_mapped", ms=_ms()))
    eos = loaded.generation_config.get("eos_token_id", [])
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    config = EngineConfig(
        block_size=settings.block_size,
        kv_cache_bytes=settings.kv_cache_bytes,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        device=device,
        dtype=dtype,
        attention_backend=settings.attention_backend,
        gpu_memory_fraction=settings.gpu_memory_fraction,
        cuda_graph_max_batch=settings.cuda_graph_max_batch,
        cpu_kernels=settings.cpu_kernels,
        snapshot_dir=settings.snapshot,  # where the warm profile is read and recorded
    )
    model_config = ModelConfig.from_hf_config(loaded.config)
    engine = LLMEngine(
        model_config,
        loaded.weights,
        eos_ids,
        config,
        on_phase=lambda name: conn.send(message("phase", name=name, ms=_ms())),
    )
    # Everything built so far lives as long as the process: take it out of the cyclic
    # collector's scans, which otherwise walk it on every full collection (~1 ms a step).
    gc.freeze()
    stats = engine.stats()
    conn.send(
        message(
            "ready",
            model=str(loaded.manifest.get("source") or loaded.config.get("_name_or_path") or ""),
            max_context=int(engine.max_model_len),
            kv_blocks=int(stats.kv_total_blocks),
            block_size=int(settings.block_size),
            max_running=int(settings.max_num_seqs),
            eos_token_ids=eos_ids,
        )
    )
    log(
        f"ready in {_ms():.0f} ms on {device}: {stats.kv_total_blocks} KV blocks, "
        f"{engine.attention_backend} attention, {len(engine.graph_timings)} decode graphs"
    )
    return engine


def submit(engine: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
    """Add one request to the engine; return an error message for the gateway if it is unusable."""
    from handler.engine import SamplingParams

    problem = validate_submit(msg)
    request_id = msg.get("id") if isinstance(msg.get("id"), int) else -1
    if problem is None:
        params = msg["params"]
        try:
            engine.add_request(
                request_id,
                list(msg["prompt"]),
                SamplingParams(
                    max_new_tokens=params["max_new_tokens"],
                    temperature=float(params["temperature"]),
                    top_k=params["top_k"],
                    top_p=float(params["top_p"]),
                    min_p=float(params["min_p"]),
                    repetition_penalty=float(params["repetition_penalty"]),
                    presence_penalty=float(params["presence_penalty"]),
                    frequency_penalty=float(params["frequency_penalty"]),
                    seed=params["seed"],
                    stop_token_ids=list(params["stop_token_ids"]),
                    ignore_eos=params["ignore_eos"],
                    logprobs=params["logprobs"],
                ),
            )
            return None
        except ValueError as exc:
            problem = str(exc)
    return message("error", id=max(request_id, 0), message=problem)


def serve(engine: Any, conn: FrameSocket, inbox: Inbox) -> int:
    step = 0
    last_stats = 0.0
    while True:
        # Block only while idle; while busy, take whatever has arrived and step again.
        timeout = 0.0 if engine.has_unfinished() else STATS_INTERVAL_S
        frame = inbox.get(timeout)
        while frame is not None:
            if isinstance(frame, EOFError):
                log("gateway closed the connection; exiting")
                return 0
            if isinstance(frame, BaseException):
                log(f"protocol error: {frame}")
                return EXIT_PROTOCOL
            kind = frame["t"]
            if kind == "submit":
                reply = submit(engine, frame)
                if reply is not None:
                    conn.send(reply)
            elif kind == "cancel":
                cancelled = engine.abort(frame.get("id"))
                if cancelled is not None:
                    item = output_item(cancelled.request_id, None, None, None, "cancelled")
                    conn.send(message("outputs", step=step, items=[item]))
            elif kind == "shutdown":
                log("shutdown requested")
                return 0
            else:
                log(f"ignoring unexpected {kind!r} frame")
            frame = inbox.get(0.0)
        if engine.has_unfinished():
            outputs = engine.step()
            step += 1
            if outputs:
                items = [
                    output_item(
                        o.request_id, o.token_id, o.logprob, o.top_logprobs, o.finish_reason
                    )
                    for o in outputs
                ]
                conn.send(message("outputs", step=step, items=items))
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            last_stats = now
            s = engine.stats()
            conn.send(
                message(
                    "stats",
                    running=s.running,
                    waiting=s.waiting,
                    kv_used=s.kv_used_blocks,
                    kv_total=s.kv_total_blocks,
                    prefix_hits=s.prefix_hit_tokens,
                    preemptions=s.preemptions,
                )
            )


if __name__ == "__main__":
    sys.exit(main())

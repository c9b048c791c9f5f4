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
from typing import Any

from handler.engine.faults import crash
from handler.env import SettingsError
from handler.protocol import (
    PROTOCOL_VERSION,
    FrameSocket,
    ProtocolError,
    fork_of,
    message,
    output_item,
    prompt_logprobs_items,
    sampling_params,
)
from handler.worker_settings import WorkerSettings

_T0 = time.perf_counter()
STATS_INTERVAL_S = 0.5
EXIT_REJECTED = 3
EXIT_PROTOCOL = 4


def _ms() -> float:
    return (time.perf_counter() - _T0) * 1000.0


def log(text: str) -> None:
    print(f"[worker {os.getpid()}] {text}", file=sys.stderr, flush=True)


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
    try:
        settings = WorkerSettings.from_env(os.environ)
    except SettingsError as exc:
        log(f"bad settings: {exc}")
        return 1
    conn = FrameSocket.connect(settings.socket_path)
    handshake(conn)
    faults = settings.engine.fault_injection
    if faults is not None:
        log(f"fault injection on (THAW_FAULT_INJECT={faults.describe()}): for tests only")
        if faults.crash_at_start:
            crash()
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
    import torch  # noqa: F401 - imported here so its cost is its own phase

    conn.send(message("phase", name="torch_imported", ms=_ms()))
    from handler.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_snapshot(
        settings.snapshot,
        settings.engine,
        on_phase=lambda name: conn.send(message("phase", name=name, ms=_ms())),
    )
    # Everything built so far lives as long as the process: take it out of the cyclic
    # collector's scans, which otherwise walk it on every full collection.
    gc.freeze()
    stats = engine.stats()
    conn.send(
        message(
            "ready",
            model=engine.model_name,
            max_context=int(engine.max_model_len),
            kv_blocks=int(stats.kv_total_blocks),
            block_size=int(engine.config.block_size),
            max_running=int(engine.config.max_num_seqs),
            eos_token_ids=engine.eos_token_ids,
        )
    )
    log(
        f"ready in {_ms():.0f} ms on {engine.device}: {stats.kv_total_blocks} KV blocks, "
        f"{engine.attention_backend} attention, {len(engine.graph_timings)} decode graphs"
    )
    return engine


def submit(engine: Any, msg: dict[str, Any]) -> dict[str, Any] | None:
    """Add one request to the engine; return an error message for the gateway if it is unusable."""
    request_id = msg.get("id") if isinstance(msg.get("id"), int) else -1
    try:
        prompt, params = sampling_params(msg)
        engine.add_request(request_id, prompt, params, fork_of=fork_of(msg))
        return None
    except (ProtocolError, ValueError) as exc:
        return message("error", id=max(request_id, 0), message=str(exc))


def send_failures(conn: FrameSocket, outputs: list[Any]) -> None:
    """An `error` frame for each request that failed alone in this step; it is finished."""
    for o in outputs:
        if o.error is not None:
            log(f"request {o.request_id} failed: {o.error}")
            conn.send(message("error", id=o.request_id, message=o.error))


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
            # An exception here is one no request can be blamed for: it ends the worker, and
            # the gateway restarts it (the engine fails a request alone when it can).
            outputs = engine.step()
            step += 1
            if outputs:
                # A request's prompt logprobs come once, before its first outputs item.
                for o in outputs:
                    if o.prompt_logprobs is not None and o.error is None:
                        items = prompt_logprobs_items(o.prompt_logprobs)
                        conn.send(message("prompt_logprobs", id=o.request_id, items=items))
                items = [
                    output_item(
                        o.request_id, o.token_id, o.logprob, o.top_logprobs, o.finish_reason
                    )
                    for o in outputs
                    if o.error is None
                ]
                if items:
                    conn.send(message("outputs", step=step, items=items))
                if len(items) < len(outputs):
                    send_failures(conn, outputs)
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

"""A worker that speaks the gateway protocol without torch, for gateway tests and benchmarks.

It echoes each prompt's token ids back cyclically, one token per request per step, so outputs
are deterministic and decode to a known text. Behaviour is set by environment variables:

  STUB_TOKENS              tokens per request before it ends with EOS (default 8)
  STUB_TOKEN_DELAY_S       sleep per engine step (default 0)
  STUB_START_DELAY_S       sleep before `ready`, as if importing torch (default 0)
  STUB_MAX_RUNNING         `max_running` announced in `ready` (default 64)
  STUB_MAX_CONTEXT         `max_context` announced in `ready` (default 2048)
  STUB_EOS_ID              the EOS token id (default 0)
  STUB_FAIL_AT_START       when "1": print an error, send `fatal`, exit 1
  STUB_CRASH_AFTER_SUBMITS exit abruptly when this many submits arrived...
  STUB_CRASH_ONCE_FILE     ...but only if this file does not exist yet (it is created)
  STUB_CRASH_ON_MAX_TOKENS exit abruptly on every submit whose max_new_tokens is this (a poison
                           request that kills each worker it reaches)
  STUB_CRASH_AFTER_READY_S exit abruptly this many seconds after `ready` (a crash loop)
  STUB_ENV_FILE            write the environment the stub was started with there (JSON)
  STUB_SUBMIT_LOG          append each accepted submit there, one JSON line: id, fork_of, params
  STUB_SCRIPT              comma-separated token ids every request generates, in order, instead
                           of echoing its prompt; then EOS (a scripted model output)

A submit with `fork_of` waits until the request it names has produced its first token (its
prefill) or is gone, as the real worker does. A request with `prompt_logprobs` gets its
`prompt_logprobs` message before its first token: token i of the prompt scores -i/8, and each
of its k alternatives is the token itself.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class StubConfig:
    tokens: int
    token_delay_s: float
    start_delay_s: float
    max_running: int
    max_context: int
    eos_id: int
    fail_at_start: bool
    crash_after_submits: int
    crash_once_file: str
    crash_on_max_tokens: int
    crash_after_ready_s: float
    script: list[int] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> StubConfig:
        env = os.environ
        return cls(
            tokens=int(env.get("STUB_TOKENS", "8")),
            token_delay_s=float(env.get("STUB_TOKEN_DELAY_S", "0")),
            start_delay_s=float(env.get("STUB_START_DELAY_S", "0")),
            max_running=int(env.get("STUB_MAX_RUNNING", "64")),
            max_context=int(env.get("STUB_MAX_CONTEXT", "2048")),
            eos_id=int(env.get("STUB_EOS_ID", "0")),
            fail_at_start=env.get("STUB_FAIL_AT_START") == "1",
            crash_after_submits=int(env.get("STUB_CRASH_AFTER_SUBMITS", "0")),
            crash_once_file=env.get("STUB_CRASH_ONCE_FILE", ""),
            crash_on_max_tokens=int(env.get("STUB_CRASH_ON_MAX_TOKENS", "0")),
            crash_after_ready_s=float(env.get("STUB_CRASH_AFTER_READY_S", "0")),
            script=[int(i) for i in env.get("STUB_SCRIPT", "").split(",") if i.strip()],
        )


@dataclass
class StubRequest:
    prompt: list[int]
    max_new_tokens: int
    logprobs: int
    prompt_logprobs: int | None = None
    fork_of: int | None = None
    produced: int = 0


@dataclass
class StubEngine:
    config: StubConfig
    requests: dict[int, StubRequest] = field(default_factory=dict)
    submits: int = 0
    step: int = 0

    def submit(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Admit a submit; returns an `error` message when it is refused."""
        self.submits += 1
        self.maybe_crash()
        poison = self.config.crash_on_max_tokens
        if poison and msg.get("params", {}).get("max_new_tokens") == poison:
            print(
                f"stub: crashing on a poison request (max_new_tokens={poison})",
                file=sys.stderr,
                flush=True,
            )
            os._exit(18)
        problem = None
        try:
            _prompt, sampling = sampling_params(msg)
            sampling.validate(vocab_size=2**31)
        except (ProtocolError, ValueError) as exc:
            problem = str(exc)
        if problem is None and len(msg["prompt"]) > self.config.max_context:
            problem = f"prompt of {len(msg['prompt'])} tokens exceeds the context"
        if problem is not None:
            return message("error", id=msg.get("id", 0), message=problem)
        params = msg["params"]
        parent = fork_of(msg)
        self.requests[msg["id"]] = StubRequest(
            msg["prompt"],
            params["max_new_tokens"],
            params["logprobs"],
            prompt_logprobs=params.get("prompt_logprobs"),
            fork_of=parent,
        )
        if log := os.environ.get("STUB_SUBMIT_LOG"):
            with open(log, "a") as out:
                out.write(json.dumps({"id": msg["id"], "fork_of": parent, "params": params}) + "\n")
        return None

    def maybe_crash(self) -> None:
        limit = self.config.crash_after_submits
        if not limit or self.submits < limit:
            return
        marker = Path(self.config.crash_once_file) if self.config.crash_once_file else None
        if marker is not None and marker.exists():
            return
        if marker is not None:
            marker.touch()
        print(f"stub: crashing after {self.submits} submits", file=sys.stderr, flush=True)
        os._exit(17)

    def cancel(self, request_id: int) -> dict[str, Any] | None:
        if self.requests.pop(request_id, None) is None:
            return None
        return output_item(request_id, None, None, None, "cancelled")

    def waiting_for_parent(self, request: StubRequest) -> bool:
        parent = self.requests.get(request.fork_of) if request.fork_of is not None else None
        return parent is not None and parent.produced == 0

    def prompt_logprobs(self) -> list[dict[str, Any]]:
        """The prompt_logprobs messages due before this step's first tokens."""
        messages = []
        for request_id, request in self.requests.items():
            k = request.prompt_logprobs
            if k is None or request.produced or self.waiting_for_parent(request):
                continue
            entries = [
                (-i / 8, [(token, -i / 8)] * k if k else None)
                for i, token in enumerate(request.prompt[1:], start=1)
            ]
            messages.append(
                message("prompt_logprobs", id=request_id, items=prompt_logprobs_items(entries))
            )
        return messages

    def run_step(self) -> list[dict[str, Any]]:
        """One token for every running request (forks wait for their parent's first)."""
        items = []
        ready = [
            (request_id, request)
            for request_id, request in self.requests.items()
            if not self.waiting_for_parent(request)
        ]
        for request_id, request in ready:
            limit = min(request.max_new_tokens, self.config.tokens)
            request.produced += 1
            produced, script = request.produced, self.config.script
            if script and produced > len(script):
                token, finish = self.config.eos_id, "eos_token"
            elif script:
                token = script[produced - 1]
                finish = "length" if produced >= request.max_new_tokens else None
            elif produced >= self.config.tokens and produced < request.max_new_tokens:
                token, finish = self.config.eos_id, "eos_token"
            else:
                token = request.prompt[(request.produced - 1) % len(request.prompt)]
                finish = "length" if request.produced >= limit else None
            top = [(token, -0.5)] * request.logprobs if request.logprobs else None
            items.append(output_item(request_id, token, -0.5, top, finish))
            if finish is not None:
                del self.requests[request_id]
        self.step += 1
        return items


def start_up(sock: FrameSocket, config: StubConfig, started: float) -> None:
    sock.send(message("hello", version=PROTOCOL_VERSION, pid=os.getpid()))
    reply = sock.recv()
    if reply["t"] != "welcome":
        print(f"stub: handshake refused: {reply}", file=sys.stderr, flush=True)
        sys.exit(3)
    if config.fail_at_start:
        print("stub: simulated start-up failure (STUB_FAIL_AT_START)", file=sys.stderr, flush=True)
        sock.send(message("fatal", message="simulated start-up failure"))
        sys.exit(1)
    time.sleep(config.start_delay_s)
    for phase in ("torch_imported", "weights_mapped", "kv_allocated"):
        sock.send(message("phase", name=phase, ms=(time.monotonic() - started) * 1000.0))
    sock.send(
        message(
            "ready",
            model="stub",
            max_context=config.max_context,
            kv_blocks=1024,
            block_size=16,
            max_running=config.max_running,
            eos_token_ids=[config.eos_id],
        )
    )


def serve(sock: FrameSocket, engine: StubEngine) -> int:
    crash_at = None
    if engine.config.crash_after_ready_s:
        crash_at = time.monotonic() + engine.config.crash_after_ready_s
    while True:
        timeout = engine.config.token_delay_s if engine.requests else None
        if crash_at is not None:
            left = crash_at - time.monotonic()
            if left <= 0:
                print("stub: crashing (STUB_CRASH_AFTER_READY_S)", file=sys.stderr, flush=True)
                os._exit(19)
            timeout = left if timeout is None else min(timeout, left)
        readable, _, _ = select.select([sock.sock], [], [], timeout)
        if readable:
            msg = sock.recv()
            if msg["t"] == "shutdown":
                return 0
            if msg["t"] == "submit" and (error := engine.submit(msg)) is not None:
                sock.send(error)
            if msg["t"] == "cancel" and (item := engine.cancel(msg["id"])) is not None:
                sock.send(message("outputs", step=engine.step, items=[item]))
            if engine.config.token_delay_s and engine.requests:
                continue  # take every queued frame before the next timed step
        if engine.requests:
            for scored in engine.prompt_logprobs():
                sock.send(scored)
            sock.send(message("outputs", step=engine.step, items=engine.run_step()))


def write_env(path: str) -> None:
    """The environment this process got, for tests of what the gateway passes to its worker."""
    Path(path).write_text(json.dumps(dict(os.environ)))


def main() -> int:
    started = time.monotonic()
    config = StubConfig.from_env()
    if os.environ.get("STUB_ENV_FILE"):
        write_env(os.environ["STUB_ENV_FILE"])
    sock = FrameSocket.connect(os.environ["THAW_SOCKET"])
    start_up(sock, config, started)
    try:
        return serve(sock, StubEngine(config))
    except EOFError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker side of the gateway protocol (docs/protocol.md): frames and message shapes.

Messages are plain dicts whose key order follows the document, so encodings are canonical
and match the golden frames byte for byte.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import fields
from typing import Any

import msgpack

from handler.engine.params import SamplingParams

PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 64 * 1024 * 1024
_LEN = struct.Struct(">I")

# Keys of each message type, in canonical order (docs/protocol.md).
MESSAGE_KEYS: dict[str, tuple[str, ...]] = {
    "hello": ("version", "pid"),
    "phase": ("name", "ms"),
    "ready": ("model", "max_context", "kv_blocks", "block_size", "max_running", "eos_token_ids"),
    "outputs": ("step", "items"),
    "error": ("id", "message"),
    "stats": ("running", "waiting", "kv_used", "kv_total", "prefix_hits", "preemptions"),
    "prompt_logprobs": ("id", "items"),
    "fatal": ("message",),
    "welcome": ("version",),
    "reject": ("reason",),
    "submit": ("id", "prompt", "params", "fork_of"),
    "cancel": ("id",),
    "shutdown": (),
}
# The submit frame's sampling parameters are SamplingParams' fields, in order
# (docs/sampling_contract.json is the contract both sides test against).
PARAM_KEYS = tuple(f.name for f in fields(SamplingParams))


class ProtocolError(Exception):
    """A frame or message that breaks docs/protocol.md."""


def message(t: str, **fields: Any) -> dict[str, Any]:
    """Build a message of type `t` with every key present, in canonical order."""
    keys = MESSAGE_KEYS.get(t)
    if keys is None:
        raise ProtocolError(f"unknown message type {t!r}")
    unknown = set(fields) - set(keys)
    if unknown:
        raise ProtocolError(f"{t}: unknown keys {sorted(unknown)}")
    msg: dict[str, Any] = {"t": t}
    for key in keys:
        msg[key] = fields.get(key)
    return msg


def output_item(
    request_id: int,
    token: int | None,
    logprob: float | None,
    top: list[tuple[int, float]] | None,
    finish: str | None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "token": token,
        "logprob": None if logprob is None else float(logprob),
        "top": None if top is None else [[int(t), float(lp)] for t, lp in top],
        "finish": finish,
    }


def prompt_logprobs_items(
    entries: list[tuple[float, list[tuple[int, float]] | None]],
) -> list[list[Any]]:
    """A prompt_logprobs message's items: [logprob, [[token, logprob]] or nil] per token."""
    return [
        [float(lp), None if top is None else [[int(t), float(v)] for t, v in top]]
        for lp, top in entries
    ]


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: big-endian length, then the MessagePack body (floats as float64)."""
    body = msgpack.packb(msg, use_bin_type=True, use_single_float=False)
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolError("frame is not a map with a string 't'")
    if msg["t"] not in MESSAGE_KEYS:
        raise ProtocolError(f"unknown message type {msg['t']!r}")
    return msg


def sampling_params(msg: dict[str, Any]) -> tuple[list[int], SamplingParams]:
    """The prompt and parameters of a submit message; ProtocolError when its shape is wrong.
    The values are checked by SamplingParams.validate when the engine takes the request."""
    if not isinstance(msg.get("id"), int) or msg["id"] < 0:
        raise ProtocolError("submit.id must be a non-negative integer")
    prompt = msg.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ProtocolError("submit.prompt must be a non-empty list of token ids")
    if not all(type(t) is int and t >= 0 for t in prompt):
        raise ProtocolError("submit.prompt must hold non-negative integers")
    params = msg.get("params")
    if not isinstance(params, dict):
        raise ProtocolError("submit.params must be a map")
    for key in PARAM_KEYS:
        if key not in params:
            raise ProtocolError(f"submit.params.{key} is missing")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ProtocolError(f"submit.params has unknown keys {unknown}")
    stop = params["stop_token_ids"]
    if not isinstance(stop, list):
        raise ProtocolError("submit.params.stop_token_ids must be a list of integers")
    bias = params["logit_bias"]
    if not isinstance(bias, list):
        raise ProtocolError("submit.params.logit_bias must be a list of [token, bias] pairs")
    # Pairs become tuples when well formed; SamplingParams.validate names anything else.
    bias = [tuple(e) if isinstance(e, list) else e for e in bias]
    return list(prompt), SamplingParams(
        **{**params, "stop_token_ids": list(stop), "logit_bias": bias}
    )


def fork_of(msg: dict[str, Any]) -> int | None:
    """A submit's fork_of: nil, or the id of an earlier request with the same prompt."""
    parent = msg.get("fork_of")
    if parent is not None and (type(parent) is not int or parent < 0):
        raise ProtocolError("submit.fork_of must be nil or a non-negative integer")
    return parent


class FrameSocket:
    """Blocking frame reader/writer over a connected Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, path: str) -> FrameSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return cls(sock)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(encode(msg))

    def _read_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self.sock.recv(min(n - len(chunks), 1 << 20))
            if not chunk:
                raise EOFError("gateway closed the connection")
            chunks += chunk
        return bytes(chunks)

    def recv(self) -> dict[str, Any]:
        (length,) = _LEN.unpack(self._read_exact(4))
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame length {length} exceeds {MAX_FRAME_BYTES}")
        return decode_body(self._read_exact(length))

    def close(self) -> None:
        self.sock.close()

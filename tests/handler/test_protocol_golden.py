"""The golden frames of docs/protocol_golden.json, checked against handler/protocol.py.

The Rust gateway checks the same file (rust_gateway/src/protocol/golden_tests.rs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from handler.protocol import (
    MESSAGE_KEYS,
    ProtocolError,
    decode_body,
    encode,
    sampling_params,
)

GOLDEN = Path(__file__).resolve().parents[2] / "docs" / "protocol_golden.json"


def goldens() -> list[dict]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("golden", goldens(), ids=lambda g: g["name"])
def test_golden_frame_encodes_and_decodes_byte_for_byte(golden: dict) -> None:
    frame = bytes.fromhex(golden["hex"])
    assert encode(golden["message"]) == frame
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    decoded = decode_body(frame[4:])
    assert decoded == golden["message"]
    assert list(decoded) == ["t", *MESSAGE_KEYS[decoded["t"]]], "canonical key order"
    assert encode(decoded) == frame


def test_every_message_type_has_a_golden_frame() -> None:
    assert {g["message"]["t"] for g in goldens()} == set(MESSAGE_KEYS)


def test_golden_submits_are_valid() -> None:
    for golden in goldens():
        if golden["message"]["t"] == "submit":
            _prompt, params = sampling_params(golden["message"])
            params.validate(vocab_size=2**31)


def test_unknown_type_is_a_protocol_error() -> None:
    body = encode({"t": "bogus"})[4:]
    with pytest.raises(ProtocolError):
        decode_body(body)

"""The real worker process over the real socket, with this test playing the gateway.

A tiny random-weight Llama is built into a snapshot; the worker is spawned as the gateway would
spawn it, and every exchange of docs/protocol.md is driven frame by frame, bad input included.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler.protocol import PROTOCOL_VERSION, FrameSocket, message

PARAMS = {
    "max_new_tokens": 6,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "seed": None,
    "stop_token_ids": [],
    "ignore_eos": True,
    "logprobs": 0,
    "logit_bias": [],
    "min_tokens": 0,
    "constraint": None,
    "prompt_logprobs": None,
}
PROMPTS = [[1, 5, 9, 13], [1, 100, 200, 300, 400, 500, 7], [1, 42]]


@pytest.fixture(scope="module")
def tiny_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(root / "hf")
    _write_tokenizer(root / "hf")
    out = root / "snap"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "thaw.cli",
            "snapshot",
            "build",
            "--from",
            str(root / "hf"),
            "--out",
            str(out),
            "--dtype",
            "float32",
        ],
        check=True,
        capture_output=True,
    )
    return out


def _write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary, so the snapshot is complete."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"bos_token": "w1", "eos_token": "w2", "tokenizer_class": "PreTrainedTokenizerFast"}'
    )


class FakeGateway:
    """Listens like the gateway does, spawns the worker, speaks frames."""

    def __init__(self, snapshot: Path, extra_env: dict[str, str] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="thaw-test-")
        self.path = os.path.join(self.dir, "worker.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(60)
        env = dict(os.environ, THAW_SOCKET=self.path, THAW_SNAPSHOT=str(snapshot))
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "handler.worker"], env=env, stderr=subprocess.PIPE
        )
        sock, _ = self.listener.accept()
        sock.settimeout(60)
        self.conn = FrameSocket(sock)

    def start(self) -> dict:
        hello = self.conn.recv()
        assert hello["t"] == "hello" and hello["version"] == PROTOCOL_VERSION
        assert hello["pid"] == self.proc.pid
        self.conn.send(message("welcome", version=PROTOCOL_VERSION))
        phases = []
        while True:
            msg = self.conn.recv()
            if msg["t"] == "phase":
                phases.append(msg["name"])
                continue
            assert msg["t"] == "ready", msg
            assert phases[0] == "torch_imported" and "weights_mapped" in phases
            return msg

    def collect(self, ids: set[int]) -> dict[int, dict]:
        """Read frames until every id has finished; return tokens and finish reason per id."""
        results: dict[int, dict] = {i: {"tokens": [], "finish": None, "error": None} for i in ids}
        pending = set(ids)
        while pending:
            msg = self.conn.recv()
            if msg["t"] == "error":
                results[msg["id"]]["error"] = msg["message"]
                pending.discard(msg["id"])
            elif msg["t"] == "outputs":
                for item in msg["items"]:
                    entry = results[item["id"]]
                    if item["token"] is not None:
                        entry["tokens"].append(item["token"])
                    if item["finish"] is not None:
                        entry["finish"] = item["finish"]
                        pending.discard(item["id"])
        return results

    def close(self) -> int:
        try:
            self.conn.send(message("shutdown"))
        except OSError:
            pass
        code = self.proc.wait(timeout=30)
        self.conn.close()
        self.listener.close()
        return code


@pytest.fixture
def gateway(tiny_snapshot: Path) -> Iterator[FakeGateway]:
    gw = FakeGateway(tiny_snapshot)
    yield gw
    if gw.proc.poll() is None:
        gw.proc.kill()
        gw.proc.wait()


def reference_greedy(snapshot: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n
    )
    return out[0, len(prompt) :].tolist()


def test_ready_reports_capacity(gateway: FakeGateway) -> None:
    ready = gateway.start()
    assert ready["max_context"] == 256
    assert ready["kv_blocks"] > 0 and ready["block_size"] > 0
    assert ready["eos_token_ids"] == [2]
    assert gateway.close() == 0


def test_greedy_tokens_match_transformers(gateway: FakeGateway, tiny_snapshot: Path) -> None:
    gateway.start()
    for i, prompt in enumerate(PROMPTS):
        gateway.conn.send(message("submit", id=i, prompt=prompt, params=PARAMS))
    results = gateway.collect(set(range(len(PROMPTS))))
    for i, prompt in enumerate(PROMPTS):
        assert results[i]["finish"] == "length"
        assert results[i]["tokens"] == reference_greedy(tiny_snapshot, prompt, 6)
    assert gateway.close() == 0


def test_bad_submits_get_errors_and_worker_keeps_serving(gateway: FakeGateway) -> None:
    gateway.start()
    bad = [
        message("submit", id=10, prompt=[], params=PARAMS),
        message("submit", id=11, prompt=[1, -5], params=PARAMS),
        message("submit", id=12, prompt=[1, 2], params={**PARAMS, "max_new_tokens": 0}),
        message("submit", id=13, prompt=[1, 2], params={"temperature": 0.0}),
        message("submit", id=14, prompt=[1, 2], params={**PARAMS, "top_p": "high"}),
        message("submit", id=15, prompt=[1, 99999], params=PARAMS),  # beyond the vocabulary
        message("submit", id=16, prompt=[1] * 300, params=PARAMS),  # beyond the context
    ]
    for msg in bad:
        gateway.conn.send(msg)
    gateway.conn.send(message("submit", id=17, prompt=[1, 2, 3], params=PARAMS))
    results = gateway.collect({10, 11, 12, 13, 14, 15, 16, 17})
    for i in range(10, 17):
        assert results[i]["error"], f"submit {i} should have been refused"
    assert results[17]["finish"] == "length" and len(results[17]["tokens"]) == 6
    assert gateway.close() == 0


def test_protocol_2_keys_bad_values_get_errors_alone(gateway: FakeGateway) -> None:
    gateway.start()
    bad = [
        message("submit", id=20, prompt=[1, 2], params={**PARAMS, "logit_bias": [[512, 1.0]]}),
        message("submit", id=21, prompt=[1, 2], params={**PARAMS, "logit_bias": [[5, 101.0]]}),
        message("submit", id=22, prompt=[1, 2], params={**PARAMS, "logit_bias": {"5": 1.0}}),
        message("submit", id=23, prompt=[1, 2], params={**PARAMS, "min_tokens": 7}),
        message("submit", id=24, prompt=[1, 2], params={**PARAMS, "constraint": "{not json"}),
        message("submit", id=25, prompt=[1, 2], params={**PARAMS, "prompt_logprobs": 21}),
        message("submit", id=26, prompt=[1, 2], params=PARAMS, fork_of=-1),
    ]
    for msg in bad:
        gateway.conn.send(msg)
    gateway.conn.send(message("submit", id=27, prompt=[1, 2, 3], params=PARAMS))
    results = gateway.collect({20, 21, 22, 23, 24, 25, 26, 27})
    for i, field in zip(
        range(20, 27),
        ["logit_bias", "logit_bias", "logit_bias", "min_tokens", "constraint", "prompt_logprobs"]
        + ["fork_of"],
        strict=True,
    ):
        assert field in (results[i]["error"] or ""), (i, results[i])
    assert results[27]["finish"] == "length" and len(results[27]["tokens"]) == 6
    assert gateway.close() == 0


def test_prompt_logprobs_come_before_the_first_output(gateway: FakeGateway) -> None:
    gateway.start()
    prompt = PROMPTS[1]
    params = {**PARAMS, "prompt_logprobs": 2, "max_new_tokens": 3}
    gateway.conn.send(message("submit", id=1, prompt=prompt, params=params))
    gateway.conn.send(message("submit", id=2, prompt=prompt, params=PARAMS, fork_of=1))
    seen: list[str] = []
    pending = {1, 2}
    while pending:
        msg = gateway.conn.recv()
        if msg["t"] == "prompt_logprobs":
            assert msg["id"] == 1 and "outputs" not in seen
            assert len(msg["items"]) == len(prompt) - 1
            assert all(isinstance(lp, float) and len(top) == 2 for lp, top in msg["items"])
            seen.append("prompt_logprobs")
        elif msg["t"] == "outputs":
            for item in msg["items"]:
                if item["id"] == 1:
                    seen.append("outputs")
                if item["finish"] is not None:
                    pending.discard(item["id"])
        assert msg["t"] != "error", msg
    assert seen[0] == "prompt_logprobs" and seen.count("prompt_logprobs") == 1
    assert gateway.close() == 0


def test_cancel_stops_a_request(gateway: FakeGateway) -> None:
    gateway.start()
    long_params = {**PARAMS, "max_new_tokens": 200}
    gateway.conn.send(message("submit", id=1, prompt=[1, 2, 3], params=long_params))
    gateway.conn.send(message("cancel", id=1))
    gateway.conn.send(message("cancel", id=999))  # unknown id: ignored
    results = gateway.collect({1})
    assert results[1]["finish"] == "cancelled"
    assert len(results[1]["tokens"]) < 200
    assert gateway.close() == 0


def test_rejected_handshake_exits(tiny_snapshot: Path) -> None:
    gw = FakeGateway(tiny_snapshot)
    assert gw.conn.recv()["t"] == "hello"
    gw.conn.send(message("reject", reason="version 1 is too old"))
    assert gw.proc.wait(timeout=30) == 3


def test_garbage_frame_ends_the_worker_cleanly(gateway: FakeGateway) -> None:
    gateway.start()
    gateway.conn.sock.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    assert gateway.proc.wait(timeout=30) == 4


def test_broken_snapshot_is_reported_as_fatal(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    gw = FakeGateway(tmp_path)
    assert gw.conn.recv()["t"] == "hello"
    gw.conn.send(message("welcome", version=PROTOCOL_VERSION))
    msg = gw.conn.recv()
    while msg["t"] == "phase":
        msg = gw.conn.recv()
    assert msg["t"] == "fatal" and msg["message"]
    assert gw.proc.wait(timeout=30) != 0


def test_gateway_going_away_stops_the_worker(gateway: FakeGateway) -> None:
    gateway.start()
    gateway.conn.close()
    assert gateway.proc.wait(timeout=30) == 0


def test_worker_builds_the_engine_from_snapshot_builds(tiny_snapshot: Path, tmp_path: Path) -> None:
    """One construction path: what the worker reports at ready is the engine that
    LLMEngine.from_snapshot builds from the same snapshot and the same settings. The snapshot's
    generation_config.json has no eos_token_id, so both must fall back to config.json's."""
    import json
    import shutil

    from handler.engine.llm_engine import LLMEngine
    from handler.worker_settings import WorkerSettings
    from tests.support.snapshot_fixtures import rewrite_manifest_checksums

    snap = tmp_path / "snap"
    shutil.copytree(tiny_snapshot, snap)
    generation = json.loads((snap / "generation_config.json").read_text())
    generation.pop("eos_token_id", None)
    (snap / "generation_config.json").write_text(json.dumps(generation))
    assert json.loads((snap / "config.json").read_text())["eos_token_id"] == 2
    rewrite_manifest_checksums(snap)

    env = {"THAW_MAX_NUM_SEQS": "8", "THAW_KV_CACHE_BYTES": str(4 << 20)}
    gw = FakeGateway(snap, env)
    try:
        ready = gw.start()
    finally:
        gw.close()
    settings = WorkerSettings.from_env({"THAW_SOCKET": "s", "THAW_SNAPSHOT": str(snap), **env})
    engine = LLMEngine.from_snapshot(snap, settings.engine)
    assert ready["eos_token_ids"] == engine.eos_token_ids == [2]
    assert ready["max_context"] == engine.max_model_len
    assert ready["kv_blocks"] == engine.stats().kv_total_blocks
    assert ready["block_size"] == engine.config.block_size
    assert ready["max_running"] == engine.config.max_num_seqs == 8
    assert ready["model"] == engine.model_name


# ------------------------------------------------------------ fault injection (THAW_FAULT_INJECT)
POISON = 77


def test_a_request_with_nan_logits_fails_alone(tiny_snapshot: Path) -> None:
    gw = FakeGateway(tiny_snapshot, {"THAW_FAULT_INJECT": f"nan_logits_token={POISON}"})
    try:
        gw.start()
        long_params = {**PARAMS, "max_new_tokens": 12}
        gw.conn.send(message("submit", id=1, prompt=PROMPTS[0], params=long_params))
        gw.conn.send(message("submit", id=2, prompt=[1, 5, POISON, 9], params=PARAMS))
        gw.conn.send(message("submit", id=3, prompt=PROMPTS[1], params=long_params))
        results = gw.collect({1, 2, 3})
        assert "non-finite logits" in results[2]["error"] and results[2]["tokens"] == []
        for i, prompt in ((1, PROMPTS[0]), (3, PROMPTS[1])):
            assert results[i]["error"] is None and results[i]["finish"] == "length"
            assert results[i]["tokens"] == reference_greedy(tiny_snapshot, prompt, 12)
        # The worker keeps serving, and every KV block came back.
        gw.conn.send(message("submit", id=4, prompt=PROMPTS[2], params=PARAMS))
        assert gw.collect({4})[4]["finish"] == "length"
        stats = gw.conn.recv()
        while stats["t"] != "stats" or stats["running"]:
            stats = gw.conn.recv()
        assert stats["kv_used"] == 0
        assert gw.close() == 0
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()


def test_a_poison_request_kills_the_worker_when_scheduled(tiny_snapshot: Path) -> None:
    gw = FakeGateway(tiny_snapshot, {"THAW_FAULT_INJECT": f"crash_token={POISON}"})
    try:
        gw.start()
        gw.conn.send(message("submit", id=1, prompt=PROMPTS[0], params=PARAMS))
        assert gw.collect({1})[1]["finish"] == "length"  # the worker serves until then
        gw.conn.send(message("submit", id=2, prompt=[1, POISON], params=PARAMS))
        assert gw.proc.wait(timeout=60) == 70
        with pytest.raises(EOFError):
            while True:
                msg = gw.conn.recv()
                assert msg["t"] == "stats", msg  # nothing about request 2
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()


def test_crash_at_start_exits_before_ready(tiny_snapshot: Path) -> None:
    gw = FakeGateway(tiny_snapshot, {"THAW_FAULT_INJECT": "crash_at_start"})
    try:
        assert gw.conn.recv()["t"] == "hello"
        gw.conn.send(message("welcome", version=PROTOCOL_VERSION))
        assert gw.proc.wait(timeout=60) == 70
        with pytest.raises(EOFError):
            gw.conn.recv()
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()


def test_a_bad_fault_injection_setting_stops_the_worker(tiny_snapshot: Path) -> None:
    env = dict(os.environ, THAW_SOCKET="/nonexistent", THAW_SNAPSHOT=str(tiny_snapshot))
    env["THAW_FAULT_INJECT"] = "explode"
    done = subprocess.run(
        [sys.executable, "-m", "handler.worker"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "THAW_FAULT_INJECT: unknown fault 'explode'" in done.stderr


def test_a_constrained_request_through_the_socket(tiny_snapshot: Path, tmp_path: Path) -> None:
    """A snapshot whose tokenizer.json is byte-level: a grammar constrains its tokens, the
    request ends with EOS, and a bad grammar beside it fails alone."""
    import re
    import shutil

    import llguidance

    from tests.handler.engine.grammar_fixtures import decode, write_byte_tokenizer
    from tests.support.snapshot_fixtures import rewrite_manifest_checksums

    snap = tmp_path / "snap"
    shutil.copytree(tiny_snapshot, snap)
    write_byte_tokenizer(snap / "tokenizer.json")
    rewrite_manifest_checksums(snap)
    gw = FakeGateway(snap)
    try:
        gw.start()
        regex = "(true|false|[a-d]{2,5})"
        grammar = llguidance.LLMatcher.grammar_from_regex(regex)
        params = {**PARAMS, "max_new_tokens": 12, "ignore_eos": False, "constraint": grammar}
        gw.conn.send(message("submit", id=1, prompt=PROMPTS[0], params=params))
        gw.conn.send(
            message("submit", id=2, prompt=PROMPTS[1], params={**params, "constraint": "{"})
        )
        gw.conn.send(message("submit", id=3, prompt=PROMPTS[2], params=PARAMS))
        results = gw.collect({1, 2, 3})
        assert results[1]["finish"] == "eos_token" and results[1]["tokens"][-1] == 2
        text = decode(snap / "tokenizer.json", results[1]["tokens"][:-1])
        assert re.fullmatch(regex, text), text
        assert "constraint" in results[2]["error"]
        assert results[3]["finish"] == "length"
        assert gw.close() == 0
    finally:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()

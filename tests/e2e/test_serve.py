"""`thaw serve` end to end: requests fired at exec are all answered, with transformers' text.

The real gateway and the real worker serve the default snapshot (SmolLM2-135M-Instruct). Requests
are sent while the port may not even be bound yet; each must come back with exactly the text that
transformers' greedy `generate` produces for the same prompt (both in float32).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.serve_fixtures import Server, ensure_default_snapshot

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "Water boils at",
    "The three primary colors are",
    "Q: What is the largest planet?\nA:",
    "Roses are red,",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_default_snapshot()


@pytest.fixture(scope="module")
def expected_texts(snapshot: Path) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    texts = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        texts[prompt] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return texts


def post_generate(base_url: str, prompt: str, deadline: float) -> dict:
    body = json.dumps(
        {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}}
    ).encode()
    while True:
        req = urllib.request.Request(
            f"{base_url}/generate", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=180) as resp:
                return json.loads(resp.read())
        except urllib.error.URLError as err:
            # Only "not yet listening" is retried; an HTTP error status is a failure.
            if isinstance(err, urllib.error.HTTPError) or time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def test_requests_at_exec_are_all_answered_with_the_right_text(
    snapshot: Path, expected_texts: dict[str, str]
) -> None:
    server = Server(snapshot)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        server.start()
        deadline = time.monotonic() + 30
        try:
            futures = {p: pool.submit(post_generate, server.base_url, p, deadline) for p in PROMPTS}
            answers = {p: f.result(timeout=240) for p, f in futures.items()}
        finally:
            code = server.stop()
    for prompt in PROMPTS:
        assert answers[prompt]["generated_text"] == expected_texts[prompt], prompt
        assert answers[prompt]["details"]["generated_tokens"] <= NEW_TOKENS
    assert code == 0, server.logs()


def test_ready_reports_every_phase(snapshot: Path) -> None:
    server = Server(snapshot).start()
    try:
        server.wait_ready()
        with urllib.request.urlopen(f"{server.base_url}/ready", timeout=5) as resp:
            ready = json.loads(resp.read())
        assert ready["ready"] is True
        timings = ready["timings_ms"]
        for phase in (
            "port_bound",
            "tokenizer_loaded",
            "worker_spawned",
            "torch_imported",
            "weights_mapped",
            "kv_allocated",
            "ready",
        ):
            assert phase in timings, (phase, timings)
        assert timings["port_bound"] < timings["ready"]
    finally:
        assert server.stop() == 0

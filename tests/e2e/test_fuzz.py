"""Fuzz: schemathesis (the real tool) against the live gateway's /openapi.json, with the real
worker serving the default snapshot. Every operation, with and without the API key, a bounded
number of examples each: zero 5xx, zero responses that break the document (status codes,
content types, bodies and stream events), and afterwards the gateway and the worker still
answer /ready and a greedy request exactly as before.

Traffic stays on loopback: schemathesis talks only to the server's 127.0.0.1 URL, and the hook
module strips every `webhook` field from generated bodies (tests/support/fuzz_hooks.py).
THAW_FUZZ_EXAMPLES sets the examples per operation and phase (default 12).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.serve_fixtures import Server, serving

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("THAW_FUZZ_EXAMPLES", "12"))
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)
GREEDY = {
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    env = {
        "THAW_API_KEY": KEY,
        # Short answers: the fuzzer's requests are many, the worker runs on 2 CPU cores.
        "THAW_MAX_INPUT_TOKENS": "64",
        "THAW_MAX_TOTAL_TOKENS": "96",
        "THAW_DEFAULT_MAX_NEW_TOKENS": "8",
        "THAW_DTYPE": "bfloat16",
        # A second line of defence behind the hook: no webhook target is allowed at all.
        "THAW_WEBHOOK_ALLOWLIST_ONLY": "true",
    }
    with serving(env) as srv:
        yield srv


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def greedy_answer(server: Server) -> str:
    resp = requests.post(
        server.base_url + "/v1/chat/completions", json=GREEDY, headers=auth(), timeout=60
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"]


def run_schemathesis(server: Server, tmp_path: Path, with_key: bool) -> tuple[int, str]:
    cmd = [
        str(Path(sys.executable).parent / "st"),
        "run",
        server.base_url + "/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        str(EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "60",
        # One worker: with several, hypothesis parses lambda sources on concurrent threads and
        # CPython 3.11's ast.parse then fails now and then (an internal error, not a finding).
        "--workers",
        "1",
        "--max-redirects",
        "0",
        "--suppress-health-check",
        "all",
    ]
    if with_key:
        cmd += ["-H", f"Authorization: Bearer {KEY}"]
    env = dict(os.environ, SCHEMATHESIS_HOOKS="tests.support.fuzz_hooks", NO_COLOR="1")
    done = subprocess.run(
        cmd,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    (tmp_path / f"schemathesis-{'key' if with_key else 'nokey'}.log").write_text(output)
    return done.returncode, output


def generated_counts(output: str) -> tuple[int, int]:
    match = re.search(r"(\d+) generated, (\d+) passed", output)
    if match is None:
        match = re.search(r"(\d+) generated", output)
        assert match is not None, output[-3000:]
        return int(match.group(1)), 0
    return int(match.group(1)), int(match.group(2))


@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_fuzz_every_operation(server: Server, tmp_path: Path, with_key: bool) -> None:
    before = greedy_answer(server)
    code, output = run_schemathesis(server, tmp_path, with_key)
    generated, passed = generated_counts(output)
    operations = re.search(r"Tested: (\d+)", output)
    print(
        f"schemathesis {'with' if with_key else 'without'} the key: "
        f"{operations.group(1) if operations else '?'} operations, {generated} examples, "
        f"{passed} passed"
    )
    assert code == 0, output[-6000:]
    assert generated >= 100 and passed == generated
    # Still serving, and still right.
    ready = requests.get(server.base_url + "/ready", headers=auth(), timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert greedy_answer(server) == before
    assert server.proc is not None and server.proc.poll() is None

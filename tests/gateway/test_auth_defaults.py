"""Safe defaults through the real binary: no open gateway on a reachable address, no empty key,
the unauthenticated opt-out, /ready split between probes and key holders, idle time counted only
from authenticated requests, the worker's allowlisted environment, and the job store's cap.

Every gateway here is reached on loopback; the one started with HOST=0.0.0.0 is only connected
to through 127.0.0.1."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import requests

from tests.support.gateway_fixtures import ROOT, free_port, gateway_env

KEY = "s3cret"
NEW_SETTINGS = [
    "THAW_ALLOW_UNAUTHENTICATED",
    "THAW_WEBHOOK_ALLOW",
    "THAW_WEBHOOK_ALLOWLIST_ONLY",
    "THAW_MAX_JOBS",
    "THAW_WORKER_ENV_PASS",
    "THAW_TOOL_PARSER",
]


def run_to_exit(binary: Path, snapshot: Path, **overrides: str) -> subprocess.CompletedProcess:
    """Runs the gateway expecting it to refuse to start; it must not get as far as listening."""
    env = gateway_env(snapshot, free_port(), **overrides)
    return subprocess.run(
        [str(binary)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20
    )


def test_no_key_on_a_reachable_address_is_refused_before_binding(
    gateway_binary: Path, tiny_snapshot: Path
) -> None:
    for host in ("0.0.0.0", "::"):
        done = run_to_exit(gateway_binary, tiny_snapshot, HOST=host)
        assert done.returncode == 2, done
        assert f"refusing to listen on {host} without an API key" in done.stderr
        for hint in ("THAW_API_KEY", "HOST=127.0.0.1", "THAW_ALLOW_UNAUTHENTICATED=true"):
            assert hint in done.stderr, done.stderr
        # Refused before the log even starts: nothing was bound, no worker was spawned.
        assert "listening" not in done.stderr and "port_bound" not in done.stderr


def test_an_empty_key_is_refused(gateway_binary: Path, tiny_snapshot: Path) -> None:
    for host in ("127.0.0.1", "0.0.0.0"):
        done = run_to_exit(gateway_binary, tiny_snapshot, HOST=host, THAW_API_KEY="")
        assert done.returncode == 2, done
        assert "THAW_API_KEY (--api-key) is set but empty" in done.stderr
        assert "misconfiguration" in done.stderr


def test_a_bad_webhook_allowlist_is_refused(gateway_binary: Path, tiny_snapshot: Path) -> None:
    done = run_to_exit(gateway_binary, tiny_snapshot, THAW_WEBHOOK_ALLOW="10.0.0.0/33")
    assert done.returncode == 2
    assert "THAW_WEBHOOK_ALLOW" in done.stderr and "10.0.0.0/33" in done.stderr


def test_the_opt_out_serves_with_a_warning(launch) -> None:
    gateway = launch(HOST="0.0.0.0", THAW_ALLOW_UNAUTHENTICATED="true")
    gateway.wait_ready()
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    assert gateway.post("/generate", json=body).status_code == 200
    warning = next(line for line in gateway.log().splitlines() if "auth:" in line)
    assert "WARN" in warning and "unauthenticated opt-out on 0.0.0.0" in warning


def test_the_auth_mode_is_logged(launch) -> None:
    loopback = launch()
    keyed = launch(HOST="0.0.0.0", THAW_API_KEY=KEY)
    for gateway in (loopback, keyed):
        gateway.wait_ready()
    assert re.search(r"INFO.*auth: none \(loopback only\)", loopback.log())
    assert re.search(r"INFO.*auth: bearer key", keyed.log())
    assert KEY not in keyed.log()


def test_ready_is_bare_without_the_key_and_detailed_with_it(launch) -> None:
    gateway = launch(THAW_API_KEY=KEY)
    gateway.wait_ready()
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        bare = gateway.get("/ready", headers=headers)
        assert bare.status_code == 200
        assert bare.json() == {"ready": True, "phase": "ready"}
    detailed = gateway.get("/ready", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert detailed["ready"] is True and "worker_ready" in detailed["timings_ms"]
    # The other public routes stay public; the rest need the key.
    for path in ("/health", "/ping", "/openapi.json"):
        assert gateway.get(path).status_code == 200, path
    for path in ("/metrics", "/info", "/v1/models"):
        assert gateway.get(path).status_code == 401, path


def test_a_failed_start_shows_its_reason_only_to_key_holders(launch) -> None:
    gateway = launch(THAW_API_KEY=KEY, STUB_FAIL_AT_START="1", THAW_MAX_START_FAILURES="1")
    deadline = time.monotonic() + 20
    while gateway.get("/ready").json()["phase"] != "failed":
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.05)
    bare = gateway.get("/ready")
    assert bare.status_code == 503 and bare.json() == {"ready": False, "phase": "failed"}
    detailed = gateway.get("/ready", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "simulated start-up failure" in " ".join(detailed["worker_log"])


def test_without_a_key_ready_is_detailed(gateway) -> None:
    assert "timings_ms" in gateway.get("/ready").json()


def test_refused_requests_do_not_keep_an_idle_gateway_alive(launch) -> None:
    gateway = launch(THAW_API_KEY=KEY, THAW_IDLE_TIMEOUT="1.5")
    gateway.wait_ready()
    deadline = time.monotonic() + 15
    while gateway.process.poll() is None:
        assert time.monotonic() < deadline, "401s kept the gateway alive"
        try:
            # 503 once the idle exit has begun.
            assert gateway.get("/v1/models", timeout=2).status_code in (401, 503)
            gateway.get("/openapi.json", timeout=2)
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    assert gateway.process.returncode == 0
    assert "idle timeout" in gateway.log()


def test_authenticated_requests_keep_it_alive(launch) -> None:
    gateway = launch(THAW_API_KEY=KEY, THAW_IDLE_TIMEOUT="1.5")
    gateway.wait_ready()
    until = time.monotonic() + 3
    while time.monotonic() < until:
        answer = gateway.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200
        time.sleep(0.2)
    assert gateway.process.poll() is None


def test_the_worker_gets_an_allowlisted_environment(launch, tmp_path: Path) -> None:
    seen = tmp_path / "worker_env.json"
    gateway = launch(
        THAW_API_KEY=KEY,
        AWS_ACCESS_KEY_ID="AKIA-test",
        AWS_SECRET_ACCESS_KEY="aws-secret",
        RUNPOD_API_KEY="runpod-secret",
        HF_TOKEN="hf-secret",
        THAW_DEVICE="cpu",
        THAW_DTYPE="float32",
        MY_EXTRA="kept",
        THAW_WORKER_ENV_PASS="STUB_*,MY_EXTRA",
        STUB_ENV_FILE=str(seen),
    )
    gateway.wait_ready()
    env = json.loads(seen.read_text())
    for secret in (
        "THAW_API_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "RUNPOD_API_KEY",
        "HF_TOKEN",
        "THAW_WEBHOOK_ALLOW",
        "THAW_WORKER_CMD",
    ):
        assert secret not in env, secret
    secrets = {KEY, "AKIA-test", "aws-secret", "runpod-secret", "hf-secret"}
    assert not secrets & set(env.values())
    for needed in ("THAW_SOCKET", "THAW_SNAPSHOT", "THAW_DEVICE", "THAW_DTYPE", "PATH"):
        assert needed in env, needed
    assert env["PYTHONPATH"] == str(ROOT)
    assert env["MY_EXTRA"] == "kept" and env["STUB_ENV_FILE"] == str(seen)


def test_a_full_job_store_answers_429_until_a_slot_frees(launch) -> None:
    gateway = launch(
        THAW_MAX_JOBS="2",
        THAW_JOB_RETENTION_S="1",
        STUB_TOKEN_DELAY_S="0.05",
        STUB_TOKENS="1000",
    )
    gateway.wait_ready()
    body = {"input": {"prompt": "hello", "sampling_params": {"max_tokens": 200}}}
    first = gateway.post("/run", json=body).json()["id"]
    second = gateway.post("/run", json=body).json()["id"]
    refused = gateway.post("/run", json=body)
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "overloaded"
    assert "THAW_MAX_JOBS" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert gateway.post("/runsync", json=body).status_code == 429
    # A finished job holds its slot for its retention, and says so in Retry-After.
    assert gateway.post(f"/cancel/{first}").json()["status"] == "CANCELLED"
    deadline = time.monotonic() + 10
    while (answer := gateway.post("/run", json=body)).status_code == 429:
        assert 1 <= int(answer.headers["Retry-After"]) <= 2
        assert time.monotonic() < deadline, "the cancelled job's slot never freed"
        time.sleep(0.1)
    assert answer.status_code == 200
    for job_id in (second, answer.json()["id"]):
        gateway.post(f"/cancel/{job_id}")


def test_new_settings_are_in_help_and_docs(gateway_binary: Path) -> None:
    help_text = subprocess.run(
        [str(gateway_binary), "--help"], capture_output=True, text=True, check=True
    ).stdout
    docs = (ROOT / "docs" / "gateway.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in NEW_SETTINGS:
        assert name in help_text, name
        assert f"`{name}`" in docs, name
        assert f"`{name}`" in readme, name

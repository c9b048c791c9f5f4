"""`thaw bench coldstart`: exec → first token, against the floor and the plain Hugging Face path.

Each thaw run execs the gateway with a fresh worker and, at the same instant, starts a client that
sends a one-token generation request (retrying only while the port is not yet bound) and polls
/health. The phases come from the gateway's /ready timings. In the same run:

- floor: `python -c "import torch"` — no cold start of a torch worker can beat it;
- hf_path: a fresh Python that imports transformers, calls `from_pretrained` on the same snapshot
  directory (it is a valid Hugging Face directory) and generates one token.

The page cache is warm for all three (each is run once before timing).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from thaw.serve import REPO, find_gateway, gateway_env

PROMPT = "The capital of France is"
HF_SCRIPT = """
import sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
ids = tok(sys.argv[2], return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:]), flush=True)
"""


@dataclass
class ThawRun:
    first_token_s: float
    health_first_200_ms: float
    phases_ms: dict[str, float] = field(default_factory=dict)
    text: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _until_connected(port: int, deadline: float, fn):  # retry only "connection refused"
    while time.perf_counter() < deadline:
        try:
            return fn()
        except (ConnectionRefusedError, ConnectionResetError):
            time.sleep(0.0005)
    raise TimeoutError("the gateway never accepted a connection")


def thaw_once(snapshot: str, timeout_s: float) -> ThawRun:
    port = free_port()
    env = gateway_env(snapshot, port, "127.0.0.1")
    gateway = str(find_gateway())
    health_ms: list[float] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [gateway], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = t0 + timeout_s

    def poll_health() -> None:
        while time.perf_counter() < deadline:
            try:
                if _request(port, "GET", "/health")[0] == 200:
                    health_ms.append((time.perf_counter() - t0) * 1000)
                    return
            except OSError:
                time.sleep(0.0005)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}
        status, raw = _until_connected(
            port, deadline, lambda: _request(port, "POST", "/generate", body)
        )
        first_token_s = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"/generate answered {status}: {raw[:300]!r}")
        text = json.loads(raw).get("generated_text", "")
        poller.join(timeout=5)
        ready = json.loads(_request(port, "GET", "/ready")[1])
        phases = {k: float(v) for k, v in (ready.get("timings_ms") or {}).items()}
        return ThawRun(first_token_s, health_ms[0] if health_ms else float("nan"), phases, text)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed_command(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot", default=str(REPO / ".thaw/snapshots/default"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hf-runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    snapshot = str(Path(args.snapshot).resolve())
    floor_cmd = [sys.executable, "-c", "import torch"]
    hf_cmd = [sys.executable, "-c", HF_SCRIPT, snapshot, PROMPT]
    # Warm the page cache for every contender before timing anything.
    timed_command(floor_cmd)
    thaw_once(snapshot, args.timeout)
    timed_command(hf_cmd)

    floors, thaws, hfs = [], [], []
    for i in range(args.runs):  # interleaved so that machine noise hits all alike
        floors.append(timed_command(floor_cmd))
        thaws.append(thaw_once(snapshot, args.timeout))
        if i < args.hf_runs:
            hfs.append(timed_command(hf_cmd))

    phase_names = sorted({name for r in thaws for name in r.phases_ms})
    phases = {
        name: statistics.median(r.phases_ms[name] for r in thaws if name in r.phases_ms)
        for name in phase_names
    }
    result = {
        "runs": args.runs,
        "port_bound_ms": phases.get("port_bound", float("nan")),
        "health_first_200_ms": statistics.median(r.health_first_200_ms for r in thaws),
        "thaw_first_token_s": statistics.median(r.first_token_s for r in thaws),
        "floor_import_torch_s": statistics.median(floors),
        "hf_path_s": statistics.median(hfs),
        "phases_ms": phases,
        "first_token_text": thaws[-1].text,
    }
    result["ratio_to_floor"] = result["thaw_first_token_s"] / result["floor_import_torch_s"]
    result["speedup_vs_hf"] = result["hf_path_s"] / result["thaw_first_token_s"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'what':<34}{'median':>12}")
        print(f"{'port bound (ms)':<34}{result['port_bound_ms']:>12.2f}")
        print(f"{'first 200 on /health (ms)':<34}{result['health_first_200_ms']:>12.2f}")
        for name, ms in sorted(phases.items(), key=lambda kv: kv[1]):
            print(f"{'  phase ' + name + ' (ms)':<34}{ms:>12.1f}")
        print(f"{'thaw exec -> first token (s)':<34}{result['thaw_first_token_s']:>12.3f}")
        print(f"{'floor: import torch (s)':<34}{result['floor_import_torch_s']:>12.3f}")
        print(f"{'HF path (s)':<34}{result['hf_path_s']:>12.3f}")
        print(
            f"thaw / floor = {result['ratio_to_floor']:.2f}x (target <= 1.3), "
            f"HF / thaw = {result['speedup_vs_hf']:.2f}x (target >= 2.5)"
        )
    return 0

"""`thaw bench coldstart`: exec → first token, against the floor and the plain Hugging Face path.

Each thaw run execs the gateway with a fresh worker and, at the same instant, starts a client that
sends a one-token generation request (retrying only while the port is not yet bound) and polls
/health. The phases come from the gateway's /ready timings. In the same run:

- floor: `python -c "import torch"` — no cold start of a torch worker can beat it. Timed two
  ways: to the process's exit (interpreter teardown included, `floor_import_torch_s`), and to the
  moment a child that has imported torch says so on its stdout, i.e. is ready to work
  (`floor_import_torch_no_teardown_s`, the tighter floor);
- hf_path: a fresh Python that imports transformers, calls `from_pretrained` on the same snapshot
  directory (it is a valid Hugging Face directory) and generates one token.

With `--docker IMAGE` the same start is also timed in a container: `docker run` (host network,
loopback, the image's baked-in snapshot) → /health 200 → first token of a request sent at
`docker run`, with the phases from the container's /ready, side by side with the host.

The page cache is warm for all contenders (each is run once before timing).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
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
# The child says it has imported torch and exits at once, skipping the interpreter's teardown
# (the parent has stopped its clock on reading the marker anyway).
FLOOR_MARKER = "torch imported"
FLOOR_NO_TEARDOWN_SCRIPT = f"""
import os, sys
import torch
sys.stdout.write({FLOOR_MARKER!r} + "\\n")
sys.stdout.flush()
os._exit(0)
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

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [gateway], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(proc: subprocess.Popen) -> None:
        proc.terminate()

    return timed_start(port, start, stop, timeout_s)


def docker_client() -> str:
    # Debian's own client where installed (scripts/image_env.sh uses it too); any works for `run`.
    return (
        os.environ.get("THAW_DOCKER")
        or ("/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker"))
        or "docker"
    )


def docker_once(image: str, timeout_s: float) -> ThawRun:
    """The same start in a container: host network, bound to loopback, the baked-in snapshot."""
    port = free_port()
    name = f"thaw-coldstart-{uuid.uuid4().hex[:10]}"
    docker = docker_client()
    cmd = [docker, "run", "--rm", "--name", name, "--network", "host",
           "-e", "HOST=127.0.0.1", "-e", f"PORT={port}", image]  # fmt: skip

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(proc: subprocess.Popen) -> None:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, check=False)

    return timed_start(port, start, stop, timeout_s)


def timed_start(
    port: int,
    start: Callable[[], subprocess.Popen],
    stop: Callable[[subprocess.Popen], None],
    timeout_s: float,
) -> ThawRun:
    """Start a gateway; time /health's first 200 and the first token of a request sent at once."""
    health_ms: list[float] = []
    t0 = time.perf_counter()
    proc = start()
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
        stop(proc)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed_command(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def time_to_marker(cmd: list[str], marker: str = FLOOR_MARKER) -> float:
    """Seconds from exec until the child prints `marker`: its teardown is not counted."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == marker:
                return time.perf_counter() - t0
        raise RuntimeError(f"{cmd[:3]} exited with status {proc.wait()} before printing {marker!r}")
    finally:
        proc.wait()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--snapshot", default=str(REPO / ".thaw/snapshots/default"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--hf-runs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--docker",
        metavar="IMAGE",
        help="also time the start in a container of IMAGE (built with a baked-in snapshot), "
        "side by side with the host",
    )


def run(args: argparse.Namespace) -> int:
    snapshot = str(Path(args.snapshot).resolve())
    floor_cmd = [sys.executable, "-c", "import torch"]
    floor_no_teardown_cmd = [sys.executable, "-c", FLOOR_NO_TEARDOWN_SCRIPT]
    hf_cmd = [sys.executable, "-c", HF_SCRIPT, snapshot, PROMPT]
    # Warm the page cache for every contender before timing anything.
    timed_command(floor_cmd)
    thaw_once(snapshot, args.timeout)
    timed_command(hf_cmd)
    if args.docker:
        docker_once(args.docker, args.timeout)

    floors, floors_no_teardown, thaws, hfs, dockers = [], [], [], [], []
    for i in range(args.runs):  # interleaved so that machine noise hits all alike
        floors.append(timed_command(floor_cmd))
        floors_no_teardown.append(time_to_marker(floor_no_teardown_cmd))
        thaws.append(thaw_once(snapshot, args.timeout))
        if args.docker:
            dockers.append(docker_once(args.docker, args.timeout))
        if i < args.hf_runs:
            hfs.append(timed_command(hf_cmd))

    phases = median_phases(thaws)
    result = {
        "runs": args.runs,
        "port_bound_ms": phases.get("port_bound", float("nan")),
        "health_first_200_ms": statistics.median(r.health_first_200_ms for r in thaws),
        "thaw_first_token_s": statistics.median(r.first_token_s for r in thaws),
        "floor_import_torch_s": statistics.median(floors),
        "floor_import_torch_no_teardown_s": statistics.median(floors_no_teardown),
        "hf_path_s": statistics.median(hfs),
        "phases_ms": phases,
        "first_token_text": thaws[-1].text,
    }
    result["ratio_to_floor"] = result["thaw_first_token_s"] / result["floor_import_torch_s"]
    result["ratio_to_floor_no_teardown"] = (
        result["thaw_first_token_s"] / result["floor_import_torch_no_teardown_s"]
    )
    if dockers:
        first_token = statistics.median(r.first_token_s for r in dockers)
        result["docker"] = {
            "image": args.docker,
            "health_first_200_ms": statistics.median(r.health_first_200_ms for r in dockers),
            "first_token_s": first_token,
            "phases_ms": median_phases(dockers),
            "ratio_to_host": first_token / result["thaw_first_token_s"],
            "ratio_to_floor_no_teardown": first_token / result["floor_import_torch_no_teardown_s"],
            "first_token_text": dockers[-1].text,
        }
    result["speedup_vs_hf"] = result["hf_path_s"] / result["thaw_first_token_s"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def median_phases(runs: list[ThawRun]) -> dict[str, float]:
    names = sorted({name for r in runs for name in r.phases_ms})
    return {
        name: statistics.median(r.phases_ms[name] for r in runs if name in r.phases_ms)
        for name in names
    }


def print_table(result: dict) -> None:
    docker = result.get("docker")
    print(f"{'what':<34}{'host':>12}" + (f"{'docker':>12}" if docker else ""))

    def row(label: str, host: float, other: float | None, fmt: str) -> None:
        extra = f"{other:>12{fmt}}" if docker else ""
        print(f"{label:<34}{host:>12{fmt}}" + extra)

    nan = float("nan")
    phases = result["phases_ms"]
    docker_phases = docker["phases_ms"] if docker else {}
    row("port bound (ms)", result["port_bound_ms"], docker_phases.get("port_bound", nan), ".2f")
    row(
        "first 200 on /health (ms)",
        result["health_first_200_ms"],
        docker["health_first_200_ms"] if docker else None,
        ".2f",
    )
    for name, ms in sorted(phases.items(), key=lambda kv: kv[1]):
        row(f"  phase {name} (ms)", ms, docker_phases.get(name, nan), ".1f")
    row(
        "exec -> first token (s)",
        result["thaw_first_token_s"],
        docker["first_token_s"] if docker else None,
        ".3f",
    )
    print(f"{'floor: import torch (s)':<34}{result['floor_import_torch_s']:>12.3f}")
    print(f"{'floor, no teardown (s)':<34}{result['floor_import_torch_no_teardown_s']:>12.3f}")
    print(f"{'HF path (s)':<34}{result['hf_path_s']:>12.3f}")
    print(
        f"thaw / floor = {result['ratio_to_floor']:.2f}x (target <= 1.3), "
        f"thaw / floor without teardown = {result['ratio_to_floor_no_teardown']:.2f}x "
        f"(target <= 1.1), HF / thaw = {result['speedup_vs_hf']:.2f}x (target >= 2.5)"
    )
    if docker:
        print(
            f"docker / host = {docker['ratio_to_host']:.2f}x, docker / floor without teardown = "
            f"{docker['ratio_to_floor_no_teardown']:.2f}x"
        )

"""`thaw bench gateway`: the Rust gateway beside the runpod SDK's local API server, in one run.

Both servers wrap a worker that costs nothing, so what is measured is the serving layer:
thaw's `thaw-gateway` binary with the protocol stub worker (tests/support/stub_worker.py,
which streams tokens instantly), and the runpod SDK's FastAPI server (`handler.py
--rp_serve_api`) around a handler that returns at once.

1. Peak requests/s at 64 and 256 connections, closed loop, driven by `wrk` (compiled C, Debian):
   thaw answers `POST /generate` with `max_new_tokens: 1`, runpod `POST /runsync`.
2. Latency p50/p99 at a fixed offered rate of 1,000 requests/s, open loop, driven by `oha -q 1000
   --latency-correction`: latency counts from when each request was due, not from when a free
   connection sent it, so a stalled server cannot hide its queueing (coordinated omission).
   wrk cannot hold a rate and wrk2, its fork that can, is not packaged by Debian; oha is on
   crates.io. With an instant worker all of thaw's latency is added by the gateway (HTTP,
   validation, tokenization, the socket hop to the worker and back), so it is `p99_added_ms`.
   `GET /health` at the same rate gives the floor this machine and client set
   (`thaw_health_p99_ms`): what no server could go below here.
3. Time from exec of `thaw-gateway` to its first 200 on `GET /health`, median over several
   starts, polled from here every ~0.2 ms; beside it the runpod server's first 200 on /runsync.

Everything shares this machine's cores, load generator included, so figures are lower bounds.
`scripts/install_loadgen.sh` installs wrk and oha; `scripts/build_gateway.sh` builds the gateway.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# scripts/build_gateway.sh links the release build here.
GATEWAY_BINARY = REPO / "rust_gateway" / "target" / "thaw-gateway"
STUB_WORKER = REPO / "tests" / "support" / "stub_worker.py"
DEFAULT_SNAPSHOT = REPO / ".thaw" / "snapshots" / "default"

THAW_BODY = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 1}})
RUNPOD_BODY = json.dumps({"input": {"prompt": "Hello", "max_new_tokens": 1}})
OFFERED_RATE = 1000
CONNECTION_COUNTS = (64, 256)

RUNPOD_HANDLER = '''"""An instant handler under the runpod SDK (written by thaw bench gateway)."""
import runpod


def handler(job):
    return {"generated_text": "x"}


runpod.serverless.start({"handler": handler})
'''


class BenchError(RuntimeError):
    """A bench step that cannot produce a figure (missing tool, server that never came up)."""


@dataclass
class PeakLoad:
    connections: int
    requests_per_s: float
    failed_requests: int


@dataclass
class FixedRateLatency:
    offered_rate: int
    achieved_rate: float
    p50_ms: float
    p99_ms: float
    failed_requests: int


@dataclass
class ServerFigures:
    peak: list[PeakLoad]
    latency: FixedRateLatency
    # The same rate on the cheapest route the server has: the floor set by this machine.
    floor: FixedRateLatency | None
    # Exec to the first 200 that means "serving": thaw's /ping, runpod's /runsync.
    ready_ms: float

    @property
    def best_rps(self) -> float:
        return max(p.requests_per_s for p in self.peak)

    @property
    def failed_requests(self) -> int:
        return sum(p.failed_requests for p in self.peak) + self.latency.failed_requests


@dataclass
class GatewayBench:
    thaw: ServerFigures
    runpod: ServerFigures
    health_first_200_ms: float
    # Other work on the machine competes with both servers and the load generators.
    load_average_1m: tuple[float, float]
    duration_s: float

    def summary(self) -> dict[str, object]:
        thaw, runpod = self.thaw, self.runpod
        return {
            "thaw_rps": round(thaw.best_rps, 1),
            "runpod_local_rps": round(runpod.best_rps, 1),
            "rps_ratio": round(thaw.best_rps / runpod.best_rps, 2) if runpod.best_rps else None,
            "p50_added_ms": round(thaw.latency.p50_ms, 3),
            "p99_added_ms": round(thaw.latency.p99_ms, 3),
            "runpod_local_p50_ms": round(runpod.latency.p50_ms, 3),
            "runpod_local_p99_ms": round(runpod.latency.p99_ms, 3),
            "thaw_health_p99_ms": round(thaw.floor.p99_ms, 3) if thaw.floor else None,
            "health_first_200_ms": round(self.health_first_200_ms, 2),
            "thaw_ready_ms": round(thaw.ready_ms, 1),
            "runpod_local_first_200_ms": round(runpod.ready_ms, 1),
            "failed_requests": thaw.failed_requests + runpod.failed_requests,
            "thaw": asdict(thaw),
            "runpod_local": asdict(runpod),
            "cpu_count": os.cpu_count(),
            "load_average_1m": [round(x, 2) for x in self.load_average_1m],
            "duration_s": self.duration_s,
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per load measurement (default 5)"
    )
    parser.add_argument(
        "--starts", type=int, default=7, help="gateway starts timed for the /health figure"
    )
    parser.add_argument("--gateway-bin", type=Path, default=GATEWAY_BINARY)
    parser.add_argument("--snapshot", type=Path, default=DEFAULT_SNAPSHOT)


def run(args: argparse.Namespace) -> int:
    try:
        check_arguments(args)
        bench = measure(args)
    except BenchError as err:
        print(f"thaw bench gateway: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(bench.summary(), indent=2))
    else:
        print_table(bench)
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    if args.duration <= 0 or args.starts <= 0:
        raise BenchError("--duration and --starts must be positive")
    for tool in ("wrk", "oha"):
        if find_tool(tool) is None:
            raise BenchError(f"{tool} is not installed; run scripts/install_loadgen.sh")
    if not args.gateway_bin.is_file():
        raise BenchError(f"{args.gateway_bin} not found; run scripts/build_gateway.sh")
    if not STUB_WORKER.is_file():
        raise BenchError(f"{STUB_WORKER} not found")
    if not (args.snapshot / "tokenizer.json").is_file():
        raise BenchError(f"{args.snapshot} has no tokenizer.json; run `make setup`")


def measure(args: argparse.Namespace) -> GatewayBench:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="thaw-bench-gateway-") as tmp:
        runpod = measure_server(lambda: start_runpod(Path(tmp)), "/runsync", RUNPOD_BODY, args)
    thaw = measure_server(lambda: start_thaw(args), "/generate", THAW_BODY, args, "/health")
    health_ms = health_first_200_ms(args)
    for name, server in (("thaw", thaw), ("runpod local", runpod)):
        if server.failed_requests:
            # Failed requests are left out of the rates; many of them make the figures moot.
            print(f"warning: {server.failed_requests} {name} requests failed", file=sys.stderr)
    return GatewayBench(
        thaw=thaw,
        runpod=runpod,
        health_first_200_ms=health_ms,
        load_average_1m=(load_before, os.getloadavg()[0]),
        duration_s=args.duration,
    )


def measure_server(
    start: Callable[[], AbstractContextManager[tuple[str, float]]],
    path: str,
    body: str,
    args: argparse.Namespace,
    floor_path: str | None = None,
) -> ServerFigures:
    with start() as (base_url, ready_ms):
        url = base_url + path
        wrk_peak(url, body, 64, min(1.0, args.duration))  # warm-up: connections, caches
        peak = [wrk_peak(url, body, c, args.duration) for c in CONNECTION_COUNTS]
        latency = oha_fixed_rate(url, body, OFFERED_RATE, args.duration)
        floor = None
        if floor_path is not None:
            floor = oha_fixed_rate(base_url + floor_path, None, OFFERED_RATE, args.duration)
    return ServerFigures(peak=peak, latency=latency, floor=floor, ready_ms=ready_ms)


# --- the two servers -------------------------------------------------------------------------


@contextmanager
def start_thaw(args: argparse.Namespace) -> Iterator[tuple[str, float]]:
    """The gateway with the stub worker, once ready: (base URL, ms from exec to ready)."""
    port = free_port()
    started = time.perf_counter()
    env = quiet_env() | {"STUB_MAX_RUNNING": str(max(CONNECTION_COUNTS))}
    with running(gateway_command(args, port), env=env) as proc:
        # Ready means the stub worker said hello and /ping turned 200; /health answers earlier.
        wait_for(lambda: ping_ready(port), proc, "thaw-gateway /ping")
        yield f"http://127.0.0.1:{port}", (time.perf_counter() - started) * 1000


@contextmanager
def start_runpod(tmp: Path) -> Iterator[tuple[str, float]]:
    """The runpod local API server around an instant handler, once it answers /runsync."""
    handler = tmp / "instant_handler.py"
    handler.write_text(RUNPOD_HANDLER)
    port = free_port()
    cmd = [sys.executable, str(handler), "--rp_serve_api", "--rp_api_port", str(port)]
    # Its best configuration: no per-request logging.
    cmd += ["--rp_log_level", "ERROR"]
    env = quiet_env() | {"UVICORN_LOG_LEVEL": "warning"}
    started = time.perf_counter()
    with running(cmd, env=env) as proc:
        wait_for(lambda: runsync_ready(port), proc, "runpod local server /runsync")
        yield f"http://127.0.0.1:{port}", (time.perf_counter() - started) * 1000


def ping_ready(port: int) -> bool:
    status = http_status("GET", port, "/ping")
    if status == 503:
        raise BenchError("thaw-gateway reports a failed start-up (/ping answered 503)")
    return status == 200


def runsync_ready(port: int) -> bool:
    return http_status("POST", port, "/runsync", RUNPOD_BODY) == 200


def gateway_command(args: argparse.Namespace, port: int) -> list[str]:
    worker = f"{sys.executable} {STUB_WORKER}"
    return [
        str(args.gateway_bin),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--snapshot",
        str(args.snapshot),
        "--worker-cmd",
        worker,
        # Let every connection of the 256-connection run be in flight, as uvicorn lets them.
        "--max-concurrent-requests",
        str(max(CONNECTION_COUNTS)),
    ]


def quiet_env() -> dict[str, str]:
    # Logging every request would measure the terminal, not the server.
    # The stub worker's STUB_* settings must pass the gateway's worker environment allowlist.
    return dict(os.environ) | {
        "RUST_LOG": "warn",
        "PYTHONUNBUFFERED": "1",
        "THAW_WORKER_ENV_PASS": "STUB_*",
    }


@contextmanager
def running(cmd: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    except BenchError as err:
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
        raise BenchError(f"{err}\n--- output of {Path(cmd[0]).name} ---\n{tail}") from None
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    # The gateway's worker lives in the gateway's process group: stop the whole group, even
    # when the gateway itself has already exited.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what}: the process exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.01)
    raise BenchError(f"{what} did not answer 200 within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(method: str, port: int, path: str, body: str | None = None) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


# --- (3) exec to first 200 on /health --------------------------------------------------------


def health_first_200_ms(args: argparse.Namespace) -> float:
    samples = [one_health_start(args) for _ in range(args.starts)]
    return statistics.median(samples)


def one_health_start(args: argparse.Namespace) -> float:
    port = free_port()
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    started = time.perf_counter()
    with running(gateway_command(args, port), env=quiet_env()) as proc:
        deadline = started + 10
        while time.perf_counter() < deadline:
            # A raw socket keeps the polling cost (and so the error of the figure) near 0.1 ms.
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(request)
                    if sock.recv(64).startswith(b"HTTP/1.1 200"):
                        return (time.perf_counter() - started) * 1000
            except OSError:
                pass
            if proc.poll() is not None:
                raise BenchError(f"thaw-gateway exited with {proc.returncode} before /health")
            time.sleep(0.0002)
        raise BenchError("thaw-gateway did not answer /health within 10 s")


# --- load generators -------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=str(Path.home() / ".cargo" / "bin"))


def wrk_peak(url: str, body: str, connections: int, duration: float) -> PeakLoad:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {lua_string(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
        script.flush()
        cmd = [find_tool("wrk") or "wrk", "-t2", f"-c{connections}", f"-d{duration:g}s"]
        out = run_tool(cmd + ["-s", script.name, url])
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise BenchError(f"cannot read wrk's output:\n{out}")
    failed = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        failed += sum(int(n) for n in errors.groups())
    return PeakLoad(connections=connections, requests_per_s=float(rps[1]), failed_requests=failed)


def lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def oha_fixed_rate(url: str, body: str | None, rate: int, duration: float) -> FixedRateLatency:
    """POSTs `body` (or GETs when None) at `rate` requests/s, open loop."""
    cmd = [find_tool("oha") or "oha", "-z", f"{duration:g}s", "-c", "64", "-q", str(rate)]
    cmd += ["--latency-correction", "--wait-ongoing-requests-after-deadline", "--no-tui"]
    cmd += ["--output-format", "json"]
    if body is not None:
        cmd += ["-m", "POST", "-H", "Content-Type: application/json", "-d", body]
    cmd.append(url)
    report = json.loads(run_tool(cmd))
    statuses = report.get("statusCodeDistribution", {})
    failed = sum(n for code, n in statuses.items() if code != "200")
    failed += sum(report.get("errorDistribution", {}).values())
    percentiles = report["latencyPercentiles"]
    return FixedRateLatency(
        offered_rate=rate,
        achieved_rate=float(report["summary"]["requestsPerSec"]),
        p50_ms=float(percentiles["p50"]) * 1000,
        p99_ms=float(percentiles["p99"]) * 1000,
        failed_requests=failed,
    )


def run_tool(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:4])} ... failed: {result.stderr.strip()[-1000:]}")
    return result.stdout


# --- report ----------------------------------------------------------------------------------


def print_table(bench: GatewayBench) -> None:
    thaw, runpod = bench.thaw, bench.runpod
    print(f"{'':40}{'thaw-gateway':>14}{'runpod local':>14}")
    for t, r in zip(thaw.peak, runpod.peak, strict=True):
        label = f"requests/s, {t.connections} connections"
        print(f"{label:40}{t.requests_per_s:>14,.0f}{r.requests_per_s:>14,.0f}")
    rate = f"at {OFFERED_RATE:,} req/s (ms)"
    print(f"{'latency p50 ' + rate:40}{thaw.latency.p50_ms:>14.2f}{runpod.latency.p50_ms:>14.2f}")
    print(f"{'latency p99 ' + rate:40}{thaw.latency.p99_ms:>14.2f}{runpod.latency.p99_ms:>14.2f}")
    if thaw.floor:
        print(f"{'  GET /health p99, same rate (floor)':40}{thaw.floor.p99_ms:>14.2f}")
    first = "exec to first 200 (ms)"
    print(f"{first:40}{bench.health_first_200_ms:>14.2f}{runpod.ready_ms:>14.0f}")
    print(f"{'exec to ready (ms)':40}{thaw.ready_ms:>14.0f}{runpod.ready_ms:>14.0f}")
    ratio = thaw.best_rps / runpod.best_rps if runpod.best_rps else float("nan")
    failed = thaw.failed_requests + runpod.failed_requests
    print(f"thaw/runpod peak requests/s: {ratio:.1f}x; failed requests: {failed}")
    print("first 200: thaw on /health; runpod on /runsync (it has no health route)")
    before, after = bench.load_average_1m
    print(f"load average (1 min) {before:.1f} -> {after:.1f} on {os.cpu_count()} CPUs")

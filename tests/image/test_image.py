"""The image itself: the real Dockerfile built and run by a real Docker engine.

No image registry is reachable here, so `scripts/image_env.sh` makes stand-ins for the base
images (a debootstrapped Debian, plus this machine's Rust toolchain, plus Python) and the
Dockerfile is built against them through its *_BASE build args, with the default snapshot baked
in. Every container runs with host networking and binds 127.0.0.1, so test traffic stays on
loopback; the build itself reaches only the package registries.

A Docker engine that cannot be started is a failure, not a skip: only a developer who sets
THAW_SKIP_IMAGE_TESTS=1 skips this module (CI never does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker_image import (
    IMAGE,
    THAW_UID,
    Build,
    Container,
    Docker,
    EngineUnavailable,
    child_pids,
    env_script,
    process_uid,
    running,
)
from tests.support.serve_fixtures import ensure_default_snapshot, free_port

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "image-test-key"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 12
# docker stop's grace, above the gateway's own drain limit: a clean exit within it is a drain,
# not a SIGKILL. Generous, because these 2-core machines are shared.
STOP_GRACE_S = 90
DRAIN_GRACE_S = 60
METRIC_RUNNING = "thaw_running_requests "


def _skip_requested() -> bool:
    return os.environ.get("THAW_SKIP_IMAGE_TESTS") == "1"


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    if _skip_requested():
        pytest.skip("THAW_SKIP_IMAGE_TESTS=1: the image tests were skipped on request")
    try:
        env_script("start")
    except EngineUnavailable as exc:
        pytest.fail(f"no Docker engine for the image tests: {exc}", pytrace=False)
    client = env_script("docker").strip()
    started = time.monotonic()
    yield Docker(client)
    # What this run's builds did not use is a stale layer of an older tree: without pruning,
    # every run with changed code would add a few GB to the engine's disk.
    env_script("prune", f"{int(time.monotonic() - started) + 60}s")
    env_script("stop")


@pytest.fixture(scope="module")
def image(docker: Docker) -> Build:
    build = docker.build(ROOT, IMAGE, "--build-arg", "SNAPSHOT=default", log_name="build.log")
    print(f"\nimage build: {build.seconds:.1f} s")
    return build


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def http(
    method: str, url: str, body: dict | None = None, timeout: float = 120
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=auth())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def status_or_none(url: str) -> int | None:
    try:
        return http("GET", url, timeout=5)[0]
    except OSError:
        return None


def serving_env(port: int, **more: str) -> dict[str, str]:
    # THAW_DTYPE=float32: greedy text token for token with transformers in float32.
    return {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "THAW_API_KEY": API_KEY,
        "THAW_DTYPE": "float32",
        **more,
    }


def wait_until(predicate, timeout: float, what: str, container: Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if not container.state()["Running"]:
            raise AssertionError(
                f"the container exited while waiting for {what}:\n{container.logs()}"
            )
        time.sleep(0.02)
    raise AssertionError(f"no {what} after {timeout} s:\n{container.logs()}")


@pytest.fixture(scope="module")
def expected_chat_text() -> str:
    """transformers' greedy continuation of CHAT, float32, on the host's default snapshot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    snapshot = ensure_default_snapshot()
    tok = AutoTokenizer.from_pretrained(snapshot)
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    out = model.generate(torch.tensor([list(ids)]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return tok.decode(out[0, len(ids) :], skip_special_tokens=True)


def active_requests(base: str) -> float:
    """Requests the worker is running now, from the gateway's /metrics."""
    status, raw = http("GET", f"{base}/metrics")
    for line in raw.decode().splitlines():
        if line.startswith(METRIC_RUNNING):
            return float(line.split()[-1])
    raise AssertionError(f"no {METRIC_RUNNING} in /metrics ({status})")


def chat(base: str) -> dict:
    body = {"messages": CHAT, "max_tokens": NEW_TOKENS, "temperature": 0}
    status, raw = http("POST", f"{base}/v1/chat/completions", body)
    assert status == 200, raw[:500]
    return json.loads(raw)


# ------------------------------------------------------------------------------- the build


def test_image_size_per_stage_and_layer_and_a_lean_runtime(docker: Docker, image: Build) -> None:
    sizes = {}
    for stage in ("gateway", "worker-deps", "worker-build", "snapshot"):
        tag = f"thaw-test/stage-{stage}:test"
        docker.build(
            ROOT, tag, "--target", stage, "--build-arg", "SNAPSHOT=default",
            log_name=f"build-{stage}.log",
        )  # fmt: skip
        sizes[stage] = docker.image_size(tag)
    sizes["runtime"] = docker.image_size(IMAGE)
    print("\nimage size per stage (MB):")
    for stage, size in sizes.items():
        print(f"  {stage:<14}{size / 1e6:>10.0f}")
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE)
    print("runtime layers (newest first):")
    for line in history.stdout.splitlines():
        size, _, created_by = line.partition("\t")
        print(f"  {size:>10}  {created_by[:150]}")

    # What the runtime stage holds: gcc (Triton's launcher, on GPUs), no other compiler, no
    # build caches, no build-only Python packages, no sources, nothing of the build's CA secret.
    probe = r"""
for tool in gcc g++ c++ rustc cargo nvcc; do
    command -v "$tool" >/dev/null && echo "tool $tool"
done
for path in /root/.cache /home/thaw/.cache/pip /src /usr/local/cargo /usr/local/rust \
        /run/thaw-ca-env.sh /dev/shm/thaw-apt*; do
    [ -e "$path" ] && echo "path $path"
done
# BuildKit leaves the secret's mount point behind, empty.
[ -n "$(ls -A /run/secrets 2>/dev/null)" ] && echo "path /run/secrets/*"
/opt/thaw/venv/bin/python -c "import transformers" 2>/dev/null && echo "package transformers"
true
"""
    # As root, so that nothing is hidden from the probe by permissions.
    done = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", IMAGE, "-c", probe)
    found = done.stdout.split("\n")
    assert "tool gcc" in found, "Triton needs gcc at run time on GPUs"
    unwanted = [line for line in found if line.startswith(("tool", "path", "package"))]
    assert unwanted == ["tool gcc"], unwanted
    user = docker("image", "inspect", "--format", "{{.Config.User}}", IMAGE).stdout.strip()
    assert user == "thaw", "the image must run as its non-root user"
    # The host's CA bundle went in as a BuildKit secret only: the image has Debian's own.
    host_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_bundle.is_file():
        image_bundle = docker(
            "run", "--rm", "--entrypoint", "cat", IMAGE, "/etc/ssl/certs/ca-certificates.crt",
            check=False,
        ).stdout  # fmt: skip
        assert image_bundle != host_bundle.read_text()


def test_a_code_change_rebuilds_without_touching_the_dependency_layers(
    docker: Docker, image: Build, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    ignore = shutil.ignore_patterns(
        ".git", ".venv", ".cache", ".thaw", "target", "__pycache__", "*.egg-info", ".*_cache"
    )
    shutil.copytree(ROOT, context, ignore=ignore, symlinks=True)
    worker = context / "handler" / "worker.py"
    # A different change every run: the build cache must not know it yet.
    worker.write_text(worker.read_text() + f"\n# a code change {uuid.uuid4().hex}\n")
    rebuild = docker.build(
        context, IMAGE + "-changed", "--build-arg", "SNAPSHOT=default", log_name="rebuild.log"
    )
    print(f"\nrebuild after a code change: {rebuild.seconds:.1f} s")
    # The steps that install dependencies, and the runtime's copy of the dependency venv.
    cached = ("apt-get install", "THAW_INSTALL_STEP=deps", "docker_build_gateway.sh",
              "COPY --from=worker-deps /opt/thaw /opt/thaw")  # fmt: skip
    for step in cached:
        lines = rebuild.step_lines(step)
        assert lines and all(" CACHED" in line for line in lines), (step, lines)
    package = rebuild.step_lines("THAW_INSTALL_STEP=package")
    assert package and all(" DONE" in line for line in package), package
    # So the new image shares its base, apt, gateway and dependency-venv layers with the old one.
    # New: this package's layer and, before it, the snapshot's (baked again: its manifest has a
    # creation time) and the entrypoint's (its directory's time changes with each copy).
    old, changed = (docker_layers(docker, tag) for tag in (IMAGE, IMAGE + "-changed"))
    new = [layer for layer in changed if layer not in old]
    print(f"layers new after a code change: {len(new)} of {len(changed)}")
    assert 1 <= len(new) <= 3, new
    assert changed[: len(changed) - 4] == old[: len(old) - 4]
    docker("image", "rm", IMAGE + "-changed", check=False)


def docker_layers(docker: Docker, tag: str) -> list[str]:
    raw = docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag).stdout
    return json.loads(raw)


# ---------------------------------------------------------------------------- the container


def test_the_container_serves_as_non_root_is_healthy_and_drains_on_stop(
    docker: Docker, image: Build, expected_chat_text: str
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(
        docker,
        serving_env(port, THAW_SHUTDOWN_GRACE_S=str(DRAIN_GRACE_S)),
        "--health-interval=1s",
        f"--stop-timeout={STOP_GRACE_S}",
    ) as container:
        pings: list[int] = []

        def ping_ok() -> bool:
            status = status_or_none(f"{base}/ping")
            if status is not None and (not pings or pings[-1] != status):
                pings.append(status)
            return status == 200

        wait_until(lambda: status_or_none(f"{base}/health") == 200, 60, "/health 200", container)
        wait_until(ping_ok, 120, "/ping 200", container)
        assert pings[0] == 204 and pings[-1] == 200, pings

        reply = chat(base)
        assert reply["choices"][0]["message"]["content"] == expected_chat_text

        # The gateway (PID 1 of the container) and the worker it spawned: the non-root user.
        pid = int(container.state()["Pid"])
        assert process_uid(pid) == THAW_UID
        workers = child_pids(pid)
        assert workers and all(process_uid(child) == THAW_UID for child in workers)
        user = docker("exec", container.name, "id", "-un").stdout.strip()
        assert user == "thaw"

        wait_until(
            lambda: container.state().get("Health", {}).get("Status") == "healthy",
            30, "a healthy HEALTHCHECK", container,
        )  # fmt: skip

        # `docker stop` while a request runs: it is answered in full and the container exits 0.
        answer: dict[str, tuple[int, bytes]] = {}
        body = {"messages": CHAT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}

        def in_flight() -> None:
            answer["reply"] = http("POST", f"{base}/v1/chat/completions", body)

        client = threading.Thread(target=in_flight)
        client.start()
        wait_until(lambda: active_requests(base) > 0, 30, "the request in flight", container)
        t0 = time.monotonic()
        docker("stop", container.name, timeout=STOP_GRACE_S + 30)
        stop_s = time.monotonic() - t0
        client.join(timeout=STOP_GRACE_S)
        state = container.state()
        assert state["ExitCode"] == 0, container.logs()
        assert stop_s < STOP_GRACE_S, f"docker stop took {stop_s:.1f} s: killed, not drained"
        status, raw = answer["reply"]
        assert status == 200, raw[:500]
        assert json.loads(raw)["usage"]["completion_tokens"] == 32


def test_the_runpod_queue_command_answers_test_input(docker: Docker, image: Build) -> None:
    port = free_port()
    job = {"input": {"prompt": "The capital of France is",
                     "sampling_params": {"max_tokens": 8, "temperature": 0}}}  # fmt: skip
    env = serving_env(port, THAW_GATEWAY_URL=f"http://127.0.0.1:{port}")
    env_args = [a for key, value in env.items() for a in ("-e", f"{key}={value}")]
    done = docker(
        "run", "--rm", "--network", "host", *env_args, IMAGE,
        "python", "-m", "handler.runpod_queue", "--test_input", json.dumps(job),
        timeout=240, check=False,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Paris" in output, output[-3000:]


@pytest.fixture
def s3_snapshot(moto_s3_env: dict[str, str]) -> str:
    """The default snapshot pushed to the local S3 server (moto, on loopback)."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="images")
    url = "s3://images/default/v1"
    subprocess.run(
        [sys.executable, "-m", "thaw.cli", "snapshot", "push", str(ensure_default_snapshot()), url],
        env=moto_s3_env,
        check=True,
        capture_output=True,
    )
    return url


def test_a_snapshot_pulled_from_s3_at_start_is_served(
    docker: Docker, image: Build, s3_snapshot: str, moto_s3_env: dict[str, str],
    expected_chat_text: str,
) -> None:  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    aws = {k: v for k, v in moto_s3_env.items() if k.startswith("AWS_") and "CA_BUNDLE" not in k}
    with running(docker, serving_env(port, THAW_SNAPSHOT=s3_snapshot, **aws)) as container:
        wait_until(lambda: status_or_none(f"{base}/ping") == 200, 180, "/ping 200", container)
        assert chat(base)["choices"][0]["message"]["content"] == expected_chat_text
        # Served from the pulled copy, not from the baked-in /snapshot.
        pulled = "/home/thaw/.cache/thaw/snapshot/manifest.json"
        docker("exec", container.name, "test", "-f", pulled)
        args = docker("exec", container.name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert s3_snapshot not in args, "thaw serve should have exec'd the gateway after the pull"

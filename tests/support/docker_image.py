"""A Docker engine and the real image built from the Dockerfile, for tests/image/test_image.py.

`scripts/image_env.sh start` provides the engine (it installs and starts one when none answers)
and local stand-ins for the base images; the Dockerfile is built against them through its
*_BASE build args. Containers run with host networking and bind 127.0.0.1 only, so test traffic
stays on loopback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO

IMAGE = "thaw-test/thaw:test"
STAND_INS = {
    "GATEWAY_BASE": "thaw-test/rust:bookworm",
    "WORKER_BUILD_BASE": "thaw-test/cuda-cpu:bookworm",
    "RUNTIME_BASE": "thaw-test/cuda-cpu:bookworm",
}
STATE = REPO / ".cache" / "image"
ENV_SCRIPT = REPO / "scripts" / "image_env.sh"
# The uid the Dockerfile gives its user "thaw".
THAW_UID = 1000


class EngineUnavailable(RuntimeError):
    pass


def env_script(action: str, *args: str, timeout: float = 1200) -> str:
    done = subprocess.run(
        ["bash", str(ENV_SCRIPT), action, *args], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise EngineUnavailable(f"scripts/image_env.sh {action} failed:\n{done.stderr[-3000:]}")
    return done.stdout


@dataclass(frozen=True)
class Build:
    seconds: float
    log: str

    def step_lines(self, needle: str) -> list[str]:
        """The build log's status lines (`#N CACHED`, `#N DONE`) of the steps naming `needle`."""
        steps = re.finditer(r"^#(\d+) \[[^\]]+\] (.*)$", self.log, re.M)
        ids = {m.group(1) for m in steps if needle in m.group(2)}
        return [
            line
            for line in self.log.splitlines()
            if (m := re.match(r"^#(\d+) (CACHED|DONE)", line)) and m.group(1) in ids
        ]


@dataclass
class Docker:
    client: str

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.client, *args], capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
        return done

    def build(
        self, context: Path, tag: str, *extra: str, log_name: str, timeout: float = 3600
    ) -> Build:
        """`docker build` of `context`'s Dockerfile against the stand-in bases."""
        args = [a for a in env_script("build-args").splitlines() if a]
        for name, image in STAND_INS.items():
            args += ["--build-arg", f"{name}={image}"]
        STATE.mkdir(parents=True, exist_ok=True)
        log_path = STATE / log_name
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            done = subprocess.run(
                [self.client, "build", "--progress=plain", "-t", tag, *args, *extra, str(context)],
                env={**os.environ, "DOCKER_BUILDKIT": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
            )
        seconds = time.monotonic() - t0
        text = log_path.read_text(errors="replace")
        if done.returncode != 0:
            raise AssertionError(f"docker build failed (log {log_path}):\n{text[-5000:]}")
        return Build(seconds, text)

    def image_size(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]


@dataclass
class Container:
    """One `docker run -d --network host` of the image; removed by `remove()`."""

    docker: Docker
    env: dict[str, str]
    command: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"thaw-test-{uuid.uuid4().hex[:10]}")
    started_at: float = 0.0

    def start(self) -> Container:
        env_args = [a for key, value in self.env.items() for a in ("-e", f"{key}={value}")]
        self.started_at = time.monotonic()
        self.docker(
            "run", "-d", "--name", self.name, "--network", "host",
            *env_args, *self.extra, IMAGE, *self.command,
        )  # fmt: skip
        return self

    def state(self) -> dict:
        return self.docker.inspect(self.name)["State"]

    def logs(self) -> str:
        done = self.docker("logs", self.name, check=False)
        return (done.stdout + done.stderr)[-5000:]

    def remove(self) -> None:
        self.docker("rm", "-f", self.name, check=False)


@contextmanager
def running(docker: Docker, env: dict[str, str], *extra: str) -> Iterator[Container]:
    container = Container(docker, env, extra=list(extra)).start()
    try:
        yield container
    finally:
        container.remove()


def process_uid(pid: int) -> int:
    """The real uid of a host process (a container's process as the host sees it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(c) for c in text]
    return children

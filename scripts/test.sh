#!/usr/bin/env bash
# Every test and lint of the project: Rust (fmt, clippy, unit tests) and Python (ruff, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH"

if [[ -f rust_gateway/Cargo.toml ]]; then
  (cd rust_gateway && cargo fmt --check && cargo clippy --release --all-targets -- -D warnings \
    && cargo test --release)
fi
ruff check .
ruff format --check .
pytest -q tests

#!/usr/bin/env bash
# Every test and lint of the project: Rust (fmt, clippy, unit tests, module layers) and Python
# (ruff, the import layers of docs/architecture.md, pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$HOME/.cargo/bin:$PATH"

if [[ -f rust_gateway/Cargo.toml ]]; then
  (cd rust_gateway && cargo fmt --check && cargo clippy --release --all-targets -- -D warnings \
    && cargo test --release)
fi
ruff check .
ruff format --check .
lint-imports
pytest -q tests --ignore=tests/image/test_image.py
bash scripts/test_image.sh  # the image, built and run (Docker; see the script)

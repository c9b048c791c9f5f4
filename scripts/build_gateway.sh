#!/usr/bin/env bash
# Builds thaw-gateway as one statically linked release binary and links it at
# rust_gateway/target/thaw-gateway. Idempotent: cargo rebuilds only what changed.
# The static flag and the explicit target live in rust_gateway/.cargo/config.toml, so that
# `cargo test` and `cargo clippy` share this build's artifacts.
set -euo pipefail
cd "$(dirname "$0")/../rust_gateway"
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="$PWD/target"
TARGET=x86_64-unknown-linux-gnu

if ! command -v cargo >/dev/null; then
  echo "build_gateway: cargo not found; install Rust from https://rustup.rs" >&2
  exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET"
fi

cargo build --release --locked --quiet
ln -sf "$TARGET/release/thaw-gateway" "$CARGO_TARGET_DIR/thaw-gateway"
echo "$CARGO_TARGET_DIR/thaw-gateway"

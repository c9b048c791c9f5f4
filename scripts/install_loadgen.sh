#!/usr/bin/env bash
# Installs the compiled load generators that `thaw bench gateway` drives (idempotent):
#   wrk  (Debian)     closed-loop peak requests/s at a fixed number of connections
#   oha  (crates.io)  open-loop latency at a fixed offered rate (-q with --latency-correction),
#                     which wrk cannot do (wrk2, its fixed-rate fork, is not packaged by Debian)
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v wrk >/dev/null; then
  echo "install_loadgen: wrk from Debian"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi

if ! command -v oha >/dev/null; then
  echo "install_loadgen: oha from crates.io (a few minutes of compiling, once)"
  cargo install --locked --quiet oha
fi
wrk --version 2>&1 | head -1 || true
oha --version

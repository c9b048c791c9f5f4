#!/usr/bin/env bash
# Docker build step (gateway stage): build the static thaw-gateway with scripts/build_gateway.sh
# and install it as OUT_DIR/thaw-gateway, refusing a binary that needs a dynamic loader (the
# runtime image must not depend on the build image's libc).
#   usage: docker_build_gateway.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: docker_build_gateway.sh OUT_DIR}
bash scripts/build_gateway.sh

# Where build_gateway.sh may leave the binary (same list as thaw/serve.py looks in).
candidates=(
    rust_gateway/target/thaw-gateway
    rust_gateway/target/x86_64-unknown-linux-gnu/release/thaw-gateway
    rust_gateway/target/x86_64-unknown-linux-musl/release/thaw-gateway
    rust_gateway/target/release/thaw-gateway
)
binary=""
for candidate in "${candidates[@]}"; do
    if [[ -x $candidate ]]; then binary=$candidate; break; fi
done
if [[ -z $binary ]]; then
    echo "docker_build_gateway: no thaw-gateway binary after scripts/build_gateway.sh" >&2
    exit 1
fi
if readelf -l "$binary" | grep -q INTERP; then
    echo "docker_build_gateway: $binary is not statically linked" >&2
    exit 1
fi
mkdir -p "$out"
install -m 0755 "$binary" "$out/thaw-gateway"
echo "docker_build_gateway: installed $binary as $out/thaw-gateway"

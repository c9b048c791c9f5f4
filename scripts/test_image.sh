#!/usr/bin/env bash
# The image tests alone (`make test-image`; `make test` runs them too): the real Dockerfile built
# by a real Docker engine against local stand-in bases, and the container exercised
# (tests/image/test_image.py). scripts/image_env.sh installs and starts an engine when none
# answers; when it cannot, the tests fail. THAW_SKIP_IMAGE_TESTS=1 skips them (developers only).
# -s: the build times and the image size per stage and layer are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
pytest -q -s tests/image/test_image.py "$@"

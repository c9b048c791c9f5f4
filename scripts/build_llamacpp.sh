#!/usr/bin/env bash
# Builds the llama.cpp tools that `thaw bench quant` compares against (llama-batched-bench,
# llama-quantize, llama-bench) from the llama.cpp vendored in PyPI's llama-cpp-python sdist:
# PyPI is the one source of C++ code this machine may reach, and a pinned sdist pins llama.cpp.
# CPU only, Release, native arch, static, so the binaries stand alone. The result is cached at
# .cache/llamacpp/<version>/bin; a second run only prints that path. Prints the bin dir last.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
CACHE="$ROOT/.cache/llamacpp/$VERSION"
BIN="$CACHE/bin"
TARGETS=(llama-batched-bench llama-quantize llama-bench)
JOBS="${LLAMACPP_JOBS:-$(nproc)}"

built() {
  local t
  for t in "${TARGETS[@]}"; do
    [[ -x "$BIN/$t" ]] || return 1
  done
}

if built; then
  echo "$BIN"
  exit 0
fi

PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
CMAKE="$(command -v cmake || true)"
if [[ -z "$CMAKE" ]]; then
  # No system cmake: PyPI's cmake wheel in a tool venv inside the cache, not the project venv.
  "$PY" -m venv "$CACHE/tools"
  "$CACHE/tools/bin/pip" install --quiet cmake
  CMAKE="$CACHE/tools/bin/cmake"
fi

SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$SDIST" ]]; then
  mkdir -p "$CACHE"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: \
    --dest "$CACHE" "llama-cpp-python==$VERSION" >&2
fi
SRC="$CACHE/src"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xzf "$SDIST" -C "$SRC" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

echo "build_llamacpp: building llama.cpp from llama-cpp-python $VERSION (-j$JOBS)" >&2
START=$SECONDS
# Tools on (the targets live there); server, UI, tests, examples and TLS off: they need
# network at configure time or only slow the build down.
"$CMAKE" -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >&2
"$CMAKE" --build "$CACHE/build" --config Release -j "$JOBS" --target "${TARGETS[@]}" >&2
mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
  cp "$CACHE/build/bin/$t" "$BIN/$t"
done
echo "build_llamacpp: built in $((SECONDS - START)) s" >&2
echo "$BIN"

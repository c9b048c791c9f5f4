#!/usr/bin/env bash
# Every GPU test and benchmark of the GPU path in one run, for one device call:
#   tests on CUDA -> H2D / kernels / CUDA graphs -> throughput vs generate_batch -> quantized
#   linears (int8 / int4 / fp8 vs bf16) -> loader and worker cold start, then one summary table
#   printed last (and the quantized-linear table after it).
# Installs nothing (the device reaches no registry): it uses the python3 that holds torch, triton
# and transformers there. Results land in $OUT (the device tool brings that folder back).
# Each step has its own time limit so that one slow step cannot eat the others; a failed step is
# reported in the table and the script goes on.
#
# Knobs (environment): PYTHON (default python3), GPU_CHECK_MODELS (default smollm2-135m,llama-1b),
# GPU_CHECK_SEQS (256), GPU_CHECK_HF_SEQS (64), GPU_CHECK_LOADER_MODEL (llama-1b; "" to skip),
# GPU_CHECK_QUANT (1; 0 skips the quantized-linear timings),
# GPU_CHECK_BUDGET (seconds for all steps, default 500: with the machine's start it fits a 10-minute
# call and leaves device time for one short rerun), GPU_CHECK_ARGS (extra bench.gpu flags; "--tiny --device cpu" with TRITON_INTERPRET=1 dry-runs
# the whole script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d -t thaw-gpu-check.XXXXXX)}"
MODELS="${GPU_CHECK_MODELS:-smollm2-135m,llama-1b}"
SEQS="${GPU_CHECK_SEQS:-256}"
HF_SEQS="${GPU_CHECK_HF_SEQS:-64}"
read -r -a EXTRA <<<"${GPU_CHECK_ARGS:-}"
LOADER_MODEL="${GPU_CHECK_LOADER_MODEL-llama-1b}"
SNAPSHOT=.thaw/snapshots/default
BUDGET="${GPU_CHECK_BUDGET:-500}"
mkdir -p "$OUT"
started=$SECONDS

step() {  # step NAME SECONDS COMMAND...: run within its limit and the budget left, log it
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - started)))
  if ((left < 30)); then
    echo "== $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/bench.log"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== [$((SECONDS - started))s] $name (limit ${limit}s)" | tee -a "$OUT/bench.log"
  timeout --signal=TERM --kill-after=5 "$limit" "$@" >>"$OUT/bench.log" 2>&1
  local rc=$?
  [[ $rc -ne 0 ]] && echo "   $name exited $rc" | tee -a "$OUT/bench.log"
  return 0
}

{
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
  fi
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__,
    "cuda", torch.version.cuda, "device",
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
} 2>&1 | tee "$OUT/env.txt"

# 1. Correctness on CUDA: the Triton kernels compiled (not interpreted) against the reference,
#    the warm-up package (capture runs on the real CUDA graph path there), and the engine's own
#    CUDA start: KV sized from free memory, decode graphs captured and replayed; the windowed and
#    soft-capped attention and the grouped MoE kernel of the newer families.
step "pytest" 240 "$PY" -m pytest -q -p no:cacheprovider \
  tests/handler/attention/test_triton_paged.py tests/handler/attention/test_features.py \
  tests/handler/model/test_moe_triton.py tests/handler/model/test_quant_triton.py \
  tests/snapshot/test_quant_snapshot.py \
  tests/warmup/test_kv_sizing.py \
  tests/warmup/test_cuda_graphs.py tests/warmup/test_warm_profile.py \
  tests/warmup/test_warm_start.py tests/handler/engine/test_gpu_path.py
grep -E "passed|failed|error" "$OUT/bench.log" | tail -n 1 >"$OUT/pytest.log"
echo "   pytest: $(cat "$OUT/pytest.log")"

# 2. Bandwidth, kernel speed, CUDA graphs, throughput (bench/gpu.py writes gpu.json as it goes).
step "bench.gpu" 330 "$PY" -m bench.gpu --models "$MODELS" --seqs "$SEQS" --hf-seqs "$HF_SEQS" \
  --sections h2d,kernels,graphs,throughput --json-out "$OUT/gpu.json" "${EXTRA[@]}"

# 2b. Quantized linears (bench/gpu_quant.py writes quant.json as it goes): bf16 F.linear against
#     int_linear int8 / int4 and fp8_linear at SmolLM2-135M and ~1B Llama layer shapes, m 1..256.
if [[ "${GPU_CHECK_QUANT:-1}" != 0 ]]; then
  step "bench.gpu_quant" 120 "$PY" -m bench.gpu_quant --json-out "$OUT/quant.json" "${EXTRA[@]}"
fi

# 3. Loader GB/s on a large random-weight snapshot, then a worker cold start from the default one.
if [[ -n "$LOADER_MODEL" && -f bench/load.py ]]; then
  loader_snapshot=$(mktemp -d)/snapshot
  step "snapshot ($LOADER_MODEL, random weights)" 150 \
    "$PY" -m bench.gpu --models "$LOADER_MODEL" --make-snapshot "$loader_snapshot" "${EXTRA[@]}"
  if [[ -f "$loader_snapshot/manifest.json" ]]; then
    left=$((BUDGET - (SECONDS - started)))
    ((left > 40)) && timeout $((left < 90 ? left : 90)) "$PY" -m thaw.cli bench load \
      "$loader_snapshot" --device cuda --json --skip-transformers >"$OUT/load.json" \
      2>>"$OUT/bench.log" || echo "   bench load failed or skipped"
  fi
fi
if [[ ! -f "$SNAPSHOT/manifest.json" ]]; then
  # The real SmolLM2 snapshot is too large to carry; its shape with random weights loads alike.
  SNAPSHOT=$(mktemp -d)/smollm2-random
  step "snapshot (smollm2-135m, random weights)" 90 \
    "$PY" -m bench.gpu --models smollm2-135m --make-snapshot "$SNAPSHOT"
fi
step "worker cold start" 90 "$PY" -m bench.gpu --sections coldstart --snapshot "$SNAPSHOT" \
  --json-out "$OUT/coldstart.json" "${EXTRA[@]}"
# Merge the cold start into gpu.json so the table reads one file.
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
try:
    gpu = json.loads((out / "gpu.json").read_text())
except (OSError, ValueError):
    gpu = {}
try:
    gpu["coldstart"] = json.loads((out / "coldstart.json").read_text())["coldstart"]
except (OSError, ValueError, KeyError):
    pass
(out / "gpu.json").write_text(json.dumps(gpu, indent=2))
EOF

echo "total $((SECONDS - started))s; logs in $OUT"
"$PY" -m bench.gpu --summary "$OUT"
if [[ -f "$OUT/quant.json" ]]; then
  "$PY" -m bench.gpu_quant --summary "$OUT/quant.json"
fi

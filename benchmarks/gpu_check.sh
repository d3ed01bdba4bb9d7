#!/usr/bin/env bash
# One-GPU check, for when a GPU is lent: parity at highest matmul precision, then the benchmarks in
# bf16. Budget: under 8 minutes on one H100 (each step has its own timeout; compilation is most of it).
#
#   bash benchmarks/gpu_check.sh                 # results: one JSON line per benchmark in $OUT (or ./gpu_check_out)
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # tiny sizes, runs on CPU too (checks the script itself)
#
# Environment: OUT (result folder), PYTHON (default python), TRAIN_BATCH (ViT-T pretraining step batch,
# default 256), FUSE_BATCH (default 32), GPU_CHECK_SMOKE=1 (tiny sizes, no parity).
# Exit status: non-zero if parity fails; a benchmark that fails or times out is recorded and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu_check_out}"
PYTHON="${PYTHON:-python}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"

note() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

run_step() {  # run_step NAME TIMEOUT_S CMD...: stdout's JSON line goes to $OUT/NAME.json and the summary
  local name="$1" limit="$2"; shift 2
  note "$name: $*"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$OUT/$name.stdout" 2> "$OUT/$name.stderr" || rc=$?
  local line
  line="$(grep '^{' "$OUT/$name.stdout" | tail -n 1 || true)"
  if [[ $rc == 0 && -n "$line" ]]; then
    echo "$line" > "$OUT/$name.json"
    echo "$line" >> "$SUMMARY"
    note "$name: done in $((SECONDS - t0)) s"
  else
    echo "{\"benchmark\": \"$name\", \"failed\": true, \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$SUMMARY"
    note "$name: FAILED (rc $rc, $((SECONDS - t0)) s); see $OUT/$name.stderr"
  fi
  return $rc
}

"$PYTHON" - <<'EOF' >&2 || true
import jax
print("devices:", jax.devices())
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true

status=0
if [[ "$SMOKE" == 1 ]]; then
  TRAIN=(--config=configs/pretrain.py:smoke --batch=2 --crop=64 --steps=2 --repeats=1 --warmup=1 --dtype=bfloat16)
  FUSE=(--height=64 --width=96 --batch=2 --repeats=2 --warmup=1 --dtype=bfloat16)
  TIMM=(--batch=2 --crop=64 --steps=1 --rounds=1 --warmup=1 --dtype=bfloat16)
else
  # 1. parity against the official network's fixture, every matmul at full float32 precision
  note "parity at highest matmul precision"
  if ! JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "$PYTHON" -m pytest -q -x tests/test_parity.py \
      > "$OUT/parity.log" 2>&1; then
    status=1
    note "parity FAILED; see $OUT/parity.log"
  fi
  tail -n 3 "$OUT/parity.log" >&2
  TRAIN=(--config=configs/pretrain.py:official,cud --batch="${TRAIN_BATCH:-256}" --crop=224 --steps=10 --repeats=3 --dtype=bfloat16)
  FUSE=(--height=480 --width=640 --batch="${FUSE_BATCH:-32}" --repeats=20 --dtype=bfloat16)
  TIMM=(--batch=64 --crop=224 --steps=10 --rounds=3 --dtype=bfloat16)
fi

# 2. the benchmarks in bf16 (float32 parameters and optimiser state)
run_step train_step_bf16 120 "$PYTHON" benchmarks/train_step.py "${TRAIN[@]}"
run_step fuse_latency_bf16 90 "$PYTHON" benchmarks/fuse_latency.py "${FUSE[@]}"
run_step fuse_latency_f32 60 "$PYTHON" benchmarks/fuse_latency.py "${FUSE[@]/--dtype=bfloat16/--dtype=float32}" --skip-image
run_step vs_timm_bf16 60 "$PYTHON" benchmarks/vs_timm.py "${TIMM[@]}"

note "summary ($SUMMARY):"
cat "$SUMMARY" >&2
exit $status

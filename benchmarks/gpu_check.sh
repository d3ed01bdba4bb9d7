#!/usr/bin/env bash
# One-GPU check, for when a GPU is lent: parity at highest matmul precision, then the benchmarks in
# bf16, in at most 9 minutes (GPU_CHECK_BUDGET_S; compilation is most of it).
#
#   bash benchmarks/gpu_check.sh                     # results: one JSON line per benchmark in ./gpu_check_out
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh   # tiny sizes, runs on CPU too (checks the script itself)
#
# On the lent machine (no registry, no ../shared): build `.device/` here first with
# `python benchmarks/device_kit.py`, then run(command="bash benchmarks/gpu_check.sh", carry=[".device"],
# timeout_s=600). This script installs `.device/whl` into its work folder and unpacks the parity
# fixture from `.device/fixture`; with $OUT set (the device tool's result folder) it writes there
# only summary.jsonl and parity.log as it goes, and gpu_check_logs.tar.gz at the end (the tool
# returns at most 8 files). It keeps to its own budget (GPU_CHECK_BUDGET_S, default 540 s: each
# step's timeout is cut to what is left), so it ends, with its files, before the call's limit.
#
# Environment: GPU_CHECK_WORK (work folder, default gpu_check_out), OUT (the results folder, see
# above), PYTHON (default python3), TRAIN_BATCH (ViT-T pretraining step batch, default 256),
# FUSE_BATCH (default 32), GPU_CHECK_SMOKE=1 (tiny sizes, no parity), GPU_CHECK_PARITY=0|1 (skip or
# force the parity step; smoke + parity checks a `.device/` kit on CPU).
# Exit status: non-zero if parity fails or does not run, or if the packages do not import; a
# benchmark that fails or times out is recorded and skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

WORK="${GPU_CHECK_WORK:-gpu_check_out}"
PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
PARITY="${GPU_CHECK_PARITY:-$((1 - SMOKE))}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))
rm -rf "$WORK" && mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
RESULTS="$WORK"
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && RESULTS="$(cd "$OUT" && pwd)"; fi
SUMMARY="$RESULTS/summary.jsonl"
: > "$SUMMARY"

note() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

finish() {  # every step's stdout/stderr, as one file for the device tool
  if [[ "$RESULTS" != "$WORK" ]]; then
    tar czf "$RESULTS/gpu_check_logs.tar.gz" --exclude=./site --exclude=./fixture -C "$WORK" .
  fi
}
trap finish EXIT

time_left() { echo $((DEADLINE - SECONDS)); }

run_step() {  # run_step NAME TIMEOUT_S CMD...: stdout's JSON line goes to $WORK/NAME.json and the summary
  local name="$1" limit="$2"; shift 2
  if (( limit > $(time_left) - 10 )); then limit=$(( $(time_left) - 10 )); fi
  if (( limit < 20 )); then
    echo "{\"benchmark\": \"$name\", \"failed\": true, \"reason\": \"no time left in GPU_CHECK_BUDGET_S\"}" >> "$SUMMARY"
    note "$name: SKIPPED, no time left"
    return 1
  fi
  note "$name (timeout ${limit} s): $*"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > "$WORK/$name.stdout" 2> "$WORK/$name.stderr" || rc=$?
  local line
  line="$(grep '^{' "$WORK/$name.stdout" | tail -n 1 || true)"
  if [[ $rc == 0 && -n "$line" ]]; then
    echo "$line" > "$WORK/$name.json"
    echo "$line" >> "$SUMMARY"
    note "$name: done in $((SECONDS - t0)) s: $line"
  else
    echo "{\"benchmark\": \"$name\", \"failed\": true, \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$SUMMARY"
    note "$name: FAILED (rc $rc, $((SECONDS - t0)) s); see $name.stderr in the logs"
    tail -n 5 "$WORK/$name.stderr" >&2
  fi
  return $rc
}

# The lent machine's image lacks some of our packages (benchmarks/device_kit.py lists them).
if compgen -G ".device/whl/*.whl" > /dev/null; then
  note "installing .device/whl"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .device/whl/*.whl >&2 || { note "wheel install FAILED"; exit 1; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -z "${DEFUSION_PARITY_FIXTURE:-}" && -f .device/fixture/io.npz ]]; then
  note "unpacking the parity fixture from .device/fixture"
  mkdir -p "$WORK/fixture" && cp .device/fixture/io.npz "$WORK/fixture/"
  "$PYTHON" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'), 1 << 22)" \
      .device/fixture/ucmimnet_state_dict.safetensors.xz "$WORK/fixture/ucmimnet_state_dict.safetensors" \
      || { note "fixture unpack FAILED"; exit 1; }
  export DEFUSION_PARITY_FIXTURE="$WORK/fixture"
fi

"$PYTHON" - <<'EOF' >&2 || { note "a package does not import (build .device/ with benchmarks/device_kit.py)"; exit 1; }
import jax, flax, optax, orbax.checkpoint, grain, ml_collections
import defusion_jax.train  # the trainer's imports: what train_step.py needs
print("devices:", jax.devices(), "| jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true

status=0
if [[ "$PARITY" == 1 ]]; then  # 1. parity against the official network's fixture, full float32 matmuls
  note "parity at highest matmul precision"
  if ! JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "$PYTHON" -m pytest -q -x -rs tests/test_parity.py \
      > "$RESULTS/parity.log" 2>&1; then
    status=1
    note "parity FAILED; see parity.log"
  elif grep -q "skipped" "$RESULTS/parity.log"; then  # a missing fixture or torch skips: not a pass here
    status=1
    note "parity did NOT RUN in full (skipped); see parity.log"
  fi
  tail -n 3 "$RESULTS/parity.log" >&2
fi
if [[ "$SMOKE" == 1 ]]; then
  TRAIN=(--config=configs/pretrain.py:smoke --batch=2 --crop=64 --steps=2 --repeats=1 --warmup=1 --dtype=bfloat16)
  FUSE=(--height=64 --width=96 --batch=2 --repeats=2 --warmup=1 --dtype=bfloat16)
  TIMM=(--batch=2 --crop=64 --steps=1 --rounds=1 --warmup=1 --dtype=bfloat16)
else
  TRAIN=(--config=configs/pretrain.py:official,cud --batch="${TRAIN_BATCH:-256}" --crop=224 --steps=10 --repeats=3 --dtype=bfloat16)
  FUSE=(--height=480 --width=640 --batch="${FUSE_BATCH:-32}" --repeats=20 --dtype=bfloat16)
  TIMM=(--batch=64 --crop=224 --steps=10 --rounds=3 --dtype=bfloat16)
fi

# 2. the benchmarks in bf16 (float32 parameters and optimiser state), the issue's targets first
run_step train_step_bf16 180 "$PYTHON" benchmarks/train_step.py "${TRAIN[@]}"
run_step fuse_latency_bf16 90 "$PYTHON" benchmarks/fuse_latency.py "${FUSE[@]}"
run_step vs_timm_bf16 90 "$PYTHON" benchmarks/vs_timm.py "${TIMM[@]}"
run_step fuse_latency_f32 60 "$PYTHON" benchmarks/fuse_latency.py "${FUSE[@]/--dtype=bfloat16/--dtype=float32}" --skip-image
# float32 network, bfloat16 products (`fuse --precision bfloat16`): last, as it is not a target
run_step fuse_latency_bf16_products 60 "$PYTHON" benchmarks/fuse_latency.py \
    "${FUSE[@]/--dtype=bfloat16/--dtype=float32}" --precision=bfloat16 --skip-image

note "summary ($SUMMARY):"
cat "$SUMMARY" >&2
exit $status

#!/usr/bin/env bash
# Train on every GPU of one machine.
#
#   launch/multi_gpu_local.sh -- --config=configs/pretrain.py --workdir=runs/pt1
#   launch/multi_gpu_local.sh --procs 8 -- --config=configs/pretrain.py --workdir=runs/pt1
#
# Default (--procs 1): one process that drives all local GPUs; JAX sees them as one data-parallel
# mesh and nothing distributed is needed. This is the recommended recipe on a single node.
#
# --procs N (N > 1): N processes on localhost, process i sees GPU i only (CUDA_VISIBLE_DEVICES),
# and they meet through jax.distributed with the coordinator given in the environment
# (DEFUSION_COORDINATOR=localhost:PORT, DEFUSION_NUM_PROCESSES, DEFUSION_PROCESS_ID), exactly the
# code path of a multi-node job; useful to rehearse a cluster run on one box. Output of process i
# is prefixed with [i]; if one process fails the others are stopped.
#
# Options:
#   --procs N          number of processes (default 1)
#   --port P           coordinator port (default 12355, or $PORT)
#   --platform cpu     run on CPU (tests, rehearsals): JAX_PLATFORMS=cpu, no CUDA_VISIBLE_DEVICES
#   --cpu-devices K    with --platform cpu: K fake devices per process
#   --module M         python module to run (default defusion_jax.main)
set -euo pipefail

die() { echo "multi_gpu_local.sh: $*" >&2; exit 2; }

PROCS=1
PORT="${PORT:-12355}"
PLATFORM=gpu
CPU_DEVICES=""
MODULE=defusion_jax.main
PYTHON="${PYTHON:-python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --procs) PROCS="${2:?--procs needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --platform) PLATFORM="${2:?--platform needs a value}"; shift 2 ;;
    --cpu-devices) CPU_DEVICES="${2:?--cpu-devices needs a value}"; shift 2 ;;
    --module) MODULE="${2:?--module needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (trainer flags go after --; see --help)" ;;
  esac
done
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || die "--procs must be a positive integer, got '$PROCS'"
[[ "$PLATFORM" == gpu || "$PLATFORM" == cpu ]] || die "--platform must be gpu or cpu, got '$PLATFORM'"

if [[ "$PLATFORM" == cpu ]]; then
  export JAX_PLATFORMS=cpu
  if [[ -n "$CPU_DEVICES" ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES"
  fi
fi

if [[ "$PROCS" == 1 ]]; then
  exec "$PYTHON" -m "$MODULE" "$@"
fi

pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
# SIGTERM/Ctrl-C to the launcher: pass SIGTERM on (a terminal's Ctrl-C already reached every
# process; a second SIGINT would make the trainers abort without their checkpoint), then keep
# waiting: the trainers checkpoint and exit, and their status is the launcher's.
signalled=""
on_signal() { signalled="$1"; cleanup; }
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

for ((i = 0; i < PROCS; i++)); do
  (
    export DEFUSION_COORDINATOR="localhost:$PORT" DEFUSION_NUM_PROCESSES="$PROCS" DEFUSION_PROCESS_ID="$i"
    [[ "$PLATFORM" == gpu ]] && export CUDA_VISIBLE_DEVICES="$i"
    # exec keeps the pid the one we wait for and stop; sed only prefixes the lines
    exec "$PYTHON" -m "$MODULE" "$@" > >(sed -u "s/^/[$i] /") 2>&1
  ) &
  pids+=($!)
done

status=0
# Wait for the processes one by one; if one fails, stop the rest instead of leaving them blocked
# on a collective that can never complete. `wait -n -p` (bash >= 5.1) tells a child's exit from a
# wait cut short by a trapped signal (no pid); older bash counts that as a failure.
wait_opts=(-n) has_p=""
if (( BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1) )); then
  wait_opts=(-n -p done_pid) has_p=1
fi
for ((n = 0; n < PROCS; )); do
  rc=0 done_pid=""
  wait "${wait_opts[@]}" || rc=$?
  [[ $rc == 127 ]] && break  # no child left
  if [[ -n "$has_p" && -z "${done_pid:-}" ]]; then
    continue  # interrupted by SIGTERM/SIGINT (handled in on_signal): the children are stopping
  fi
  n=$((n + 1))
  if [[ $rc != 0 && $status == 0 ]]; then
    status=$rc
    if [[ -z "$signalled" ]]; then
      echo "multi_gpu_local.sh: a process exited with status $rc; stopping the others" >&2
      cleanup
    fi
  fi
done
[[ -n "$signalled" ]] && echo "multi_gpu_local.sh: SIG$signalled: the processes exited with status $status" >&2
exit "$status"

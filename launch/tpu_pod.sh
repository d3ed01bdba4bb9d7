#!/usr/bin/env bash
# Train defusion-jax on a Cloud TPU VM pod slice (or several slices), one step per subcommand.
#
#   launch/tpu_pod.sh [options] create | install | train | logs | status | stop | delete | all | ssh CMD
#
#   create   gcloud creates the TPU VM slice (or, with --num-slices > 1, a multi-slice queued resource)
#   install  copies this checkout (git archive of HEAD) to every worker, makes ~/defusion-venv there
#            and installs requirements.txt plus jax[tpu], gcsfs and google-cloud-storage (the
#            trainer's gs:// workdir and TensorBoard logs)
#   train    starts the same training command on every worker, in the background, with the shared
#            (gs://) workdir; process 0..N-1 find each other through jax.distributed (Cloud TPU
#            auto-detection; defusion_jax.sharding starts it when the job has several hosts). The
#            compilation cache is WORKDIR/compile_cache (DEFUSION_COMPILE_CACHE overrides), so a
#            restarted run does not recompile its step
#   logs     follows worker 0's log (--worker=N for another)
#   status   describes the slice and shows each worker's training process
#   stop     ends the training processes (by the pid file `train` wrote); re-running `train`
#            resumes from the workdir's latest checkpoint
#   delete   deletes the slice (asks gcloud for no confirmation)
#   all      create, install, train, logs (Ctrl-C leaves the run going; `delete` when done)
#   ssh CMD  runs CMD on every worker
#
# Every cloud value is a flag or an environment variable (flag wins):
#   --name TPU_NAME            slice name                       (default defusion-pod)
#   --zone TPU_ZONE            e.g. us-central2-b               (required)
#   --project TPU_PROJECT      gcloud project                   (default: gcloud's configured one)
#   --accelerator TPU_TYPE     e.g. v4-32, v5litepod-16         (default v4-32)
#   --version TPU_VERSION      TPU VM software image            (default tpu-ubuntu2204-base)
#   --num-slices NUM_SLICES    > 1: multi-slice over DCN via queued resources (default 1)
#   --spot (TPU_SPOT=1)        spot capacity; --reserved (TPU_RESERVED=1) reserved capacity
#   --workdir WORKDIR          gs://bucket/path, shared by every worker (required for train)
#   --config CONFIG            training config (default configs/pretrain.py)
#   --worker N                 worker for `logs` (default 0)
#   --dry-run (DRY_RUN=1)      print the gcloud commands instead of running them
#   -- ARGS                    extra training flags, e.g. -- --config.batch_size=1024
#
# Multi-slice: `--num-slices 2 --accelerator v5litepod-256` makes one queued resource with two
# slices; the TPU runtime sets MEGASCALE_* on every host, defusion_jax.sharding then starts
# jax.distributed over all hosts of all slices. Data parallelism spans the slices when the config's
# mesh puts a slice axis outermost, e.g. -- --config.mesh='[("slice", 2), ("data", -1)]' (every
# non-model mesh axis shards the batch), so only the gradient all-reduce crosses DCN.
#
# Data and teachers are read from each worker's disk: copy them to every worker once, outside the
# checkout that `install` replaces, and point the config there (docs/training.md, "Devices"):
#   launch/tpu_pod.sh ssh 'mkdir -p ~/data && gcloud storage cp -r gs://BUCKET/MSRS gs://BUCKET/teachers ~/data/'
#   launch/tpu_pod.sh --workdir gs://BUCKET/runs/pt1 train -- --config.data.multi.path=../data/MSRS/train ...
#
# Example (dry run shows exactly what would happen):
#   TPU_ZONE=us-central2-b launch/tpu_pod.sh --dry-run --workdir gs://my-bucket/runs/pt1 all
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

NAME="${TPU_NAME:-defusion-pod}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
ACCEL="${TPU_TYPE:-v4-32}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
NUM_SLICES="${NUM_SLICES:-1}"
SPOT="${TPU_SPOT:-0}"
RESERVED="${TPU_RESERVED:-0}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/pretrain.py}"
LOG_WORKER=0
DRY_RUN="${DRY_RUN:-0}"
REMOTE_DIR='~/defusion-jax'
REMOTE_VENV='~/defusion-venv'
REMOTE_LOG='~/defusion-train.log'
REMOTE_PID='~/defusion-train.pid'
CMD=""
SSH_CMD=""
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --accelerator) ACCEL="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --num-slices) NUM_SLICES="${2:?--num-slices needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --worker) LOG_WORKER="${2:?--worker needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|install|train|logs|status|stop|delete|all)
      [[ -z "$CMD" ]] || die "one subcommand at a time (got $CMD and $1)"; CMD="$1"; shift ;;
    ssh)
      [[ -z "$CMD" ]] || die "one subcommand at a time (got $CMD and $1)"
      CMD=ssh; SSH_CMD="${2:?ssh needs a command}"; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$CMD" ]] || die "no subcommand (create, install, train, logs, status, stop, delete, all, ssh); see --help"
[[ -n "$ZONE" ]] || die "no zone: pass --zone or set TPU_ZONE"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
[[ "$LOG_WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$LOG_WORKER'"
[[ "$SPOT" == 1 && "$RESERVED" == 1 ]] && die "--spot and --reserved exclude each other"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GLOBAL=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GLOBAL+=(--project="$PROJECT")

# Print (dry run) or run one command, shell-quoted so that a printed line can be pasted.
quote() {  # one word for a shell: as is when plain, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local first=1 a
    for a in "$@"; do [[ $first == 1 ]] || printf ' '; first=0; quote "$a"; done; echo
  else
    "$@"
  fi
}

multislice() { [[ "$NUM_SLICES" -gt 1 ]]; }

# ssh/scp on all workers of all slices (queued resources address every node with --node=all).
on_workers() {  # on_workers WORKER COMMAND
  if multislice; then
    run gcloud compute tpus queued-resources ssh "$NAME" "${GLOBAL[@]}" --worker="$1" --node=all --command="$2"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" "${GLOBAL[@]}" --worker="$1" --command="$2"
  fi
}

copy_to_workers() {  # copy_to_workers LOCAL_FILE
  if multislice; then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:" "${GLOBAL[@]}" --worker=all --node=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:" "${GLOBAL[@]}" --worker=all
  fi
}

do_create() {
  local capacity=()
  [[ "$SPOT" == 1 ]] && capacity=(--spot)
  [[ "$RESERVED" == 1 ]] && capacity=(--reserved)
  if multislice; then
    run gcloud compute tpus queued-resources create "$NAME" "${GLOBAL[@]}" --accelerator-type="$ACCEL" \
      --runtime-version="$VERSION" --node-count="$NUM_SLICES" --node-prefix="$NAME" "${capacity[@]}"
    echo "# queued resource $NAME requested; 'status' shows when it is ACTIVE" >&2
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GLOBAL[@]}" --accelerator-type="$ACCEL" \
      --version="$VERSION" "${capacity[@]}"
  fi
}

do_install() {
  local tarball
  tarball="${TMPDIR:-/tmp}/defusion-jax-$NAME.tar.gz"
  # A tarball of the committed tree: every worker runs exactly the same code.
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" HEAD
  copy_to_workers "$tarball"
  on_workers all "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf ~/$(basename "$tarball") -C $REMOTE_DIR \
&& python3 -m venv $REMOTE_VENV && $REMOTE_VENV/bin/pip install -q -U pip \
&& $REMOTE_VENV/bin/pip install -q -r $REMOTE_DIR/requirements.txt 'jax[tpu]' gcsfs google-cloud-storage \
&& $REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
}

do_train() {
  [[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir gs://BUCKET/PATH or set WORKDIR"
  [[ "$WORKDIR" == gs://* ]] || die "workdir must be on GCS (gs://...) so that every worker shares it, got '$WORKDIR'"
  local extra=""
  if [[ ${#EXTRA[@]} -gt 0 ]]; then extra=" $(printf '%q ' "${EXTRA[@]}")"; fi
  # The worker list and index come from the VM metadata into the variables that both
  # defusion_jax.sharding (is this a multi-host job?) and JAX's TPU cluster detection read; a
  # multi-slice job's MEGASCALE_* values come from the tpu-env metadata the same way.
  local preamble='md() { curl -sf -H "Metadata-Flavor: Google" "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }; export TPU_WORKER_ID="$(md agent-worker-number)"; export TPU_WORKER_HOSTNAMES="$(md worker-network-endpoints | tr "," "\n" | awk -F: "{print \$NF}" | paste -sd, -)"; for k in MEGASCALE_NUM_SLICES MEGASCALE_SLICE_ID MEGASCALE_COORDINATOR_ADDRESS; do v="$(md tpu-env | grep "^$k:" | cut -d: -f2- | tr -d "\047 ")"; if [ -n "$v" ]; then export "$k=$v"; fi; done; '
  # The same command on every host; nohup + setsid so the run outlives the ssh session, the pid
  # file lets `stop` end exactly this process.
  # The compilation cache lives in the shared workdir: a restarted job's workers read the step
  # process 0 compiled and cached (defusion_jax/compile_cache.py).
  local cache="${DEFUSION_COMPILE_CACHE:-$WORKDIR/compile_cache}"
  on_workers all "${preamble}export DEFUSION_COMPILE_CACHE=$(printf '%q' "$cache"); cd $REMOTE_DIR || exit 1; setsid nohup $REMOTE_VENV/bin/python -m defusion_jax.main \
--config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")${extra% } > $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID; \
echo \"worker \$(hostname): started pid \$(cat $REMOTE_PID)\""
}

do_logs() { on_workers "$LOG_WORKER" "tail -n 100 -F $REMOTE_LOG"; }

do_status() {
  if multislice; then
    run gcloud compute tpus queued-resources describe "$NAME" "${GLOBAL[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$NAME" "${GLOBAL[@]}"
  fi
  on_workers all "echo \"\$(hostname): \$(if [ -f $REMOTE_PID ] && kill -0 \$(cat $REMOTE_PID) 2>/dev/null; then echo training, pid \$(cat $REMOTE_PID); else echo not training; fi)\"; tail -n 2 $REMOTE_LOG 2>/dev/null || true"
}

do_stop() { on_workers all "if [ -f $REMOTE_PID ]; then kill \$(cat $REMOTE_PID) 2>/dev/null || true; rm -f $REMOTE_PID; fi"; }

do_delete() {
  if multislice; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GLOBAL[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GLOBAL[@]}" --quiet
  fi
}

case "$CMD" in
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  status) do_status ;;
  stop) do_stop ;;
  delete) do_delete ;;
  ssh) on_workers all "$SSH_CMD" ;;
  all)
    [[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir gs://BUCKET/PATH or set WORKDIR"
    do_create; do_install; do_train; do_logs ;;
esac

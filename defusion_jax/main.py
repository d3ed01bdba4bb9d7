"""Command line entry of training: `python -m defusion_jax.main --config=CONFIG[:ARGS] --workdir=DIR`.

    python -m defusion_jax.main --config=configs/pretrain.py:smoke --workdir=runs/smoke
    python -m defusion_jax.main --config=configs/pretrain.py --workdir=runs/pretrain --config.total_steps=1000

Every config field can be overridden as `--config.<field>=value`. Running the same command again
resumes from the workdir's latest checkpoint. Multi-process jobs (Slurm, Cloud TPU pods, or
DEFUSION_COORDINATOR / DEFUSION_NUM_PROCESSES / DEFUSION_PROCESS_ID) start `jax.distributed` here,
before anything touches a device; every process runs the same command with the same workdir.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from defusion_jax import allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file, e.g. configs/pretrain.py:smoke",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics, TensorBoard logs and panels go")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    from defusion_jax import sharding

    sharding.maybe_initialize_distributed()  # before any device is touched
    logging.info("host allocator: %s (DEFUSION_TCMALLOC=0 for the system one)", allocator.active())
    from defusion_jax import compile_cache

    logging.info("compilation cache: %s (DEFUSION_COMPILE_CACHE=0 turns it off)",
                 compile_cache.enable(log=logging.warning) or "off")
    from defusion_jax import train
    from defusion_jax.params_io import CheckpointError

    try:
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (train.ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except train.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("finished: %s", result)


def run():
    allocator.reexec_with_tcmalloc()  # XLA:CPU's per-step scratch buffer stays mapped (see there)
    app.run(main)


if __name__ == "__main__":
    run()

"""Command line entry of training: `python -m defusion_jax.main --config=CONFIG[:ARGS] --workdir=DIR`.

    python -m defusion_jax.main --config=configs/pretrain.py:smoke --workdir=runs/smoke
    python -m defusion_jax.main --config=configs/pretrain.py --workdir=runs/pretrain --config.total_steps=1000

Every config field can be overridden as `--config.<field>=value`. Running the same command again
resumes from the workdir's latest checkpoint. Multi-process jobs (Slurm, Cloud TPU pods, or
DEFUSION_COORDINATOR / DEFUSION_NUM_PROCESSES / DEFUSION_PROCESS_ID) start `jax.distributed` here,
before anything touches a device; every process runs the same command with the same workdir.
Ctrl-C (SIGINT) or SIGTERM during training checkpoints at the next step and stops; a second Ctrl-C,
or one before the first step, stops at once (exit code 130, nothing saved).
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from defusion_jax import allocator

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file, e.g. configs/pretrain.py:smoke",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics, TensorBoard logs and panels go")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
INTERRUPTED = "interrupted (Ctrl-C): nothing saved since the last checkpoint; the same command resumes from it"


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _flag_error_message(e: BaseException) -> str:
    """One line for a command-line mistake. ml_collections wraps errors raised by a config file's
    get_config in a message holding the whole traceback; its last line is the error itself."""
    text = str(e).strip()
    if isinstance(e, (KeyError, AttributeError)):
        inner = e  # ml_collections raises AttributeError(KeyError("'batchsize'\nDid you mean ...")): read the KeyError's text
        while inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        raw = inner.args[0] if inner.args and isinstance(inner.args[0], str) else text
        found = re.search(r"""Key "([^"]+)" does not exist""", raw) or re.search(r"""['"]([^'"\\]+)['"]""", raw)
        close = re.search(r'Did you mean "([^"]+)"', raw)
        text = (f"no such config field: {found.group(1) if found else raw}"
                + (f" (did you mean {close.group(1)}?)" if close else ""))
    if "Traceback (most recent call last)" in text:
        flag_part = text.split(":", 2)[:2] if text.startswith("flag ") else []
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        last = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
        text = (":".join(flag_part) + ": " if flag_part else "") + last
    return " ".join(text.split())


def parse_flags(argv):
    """absl's parsing, but a mistake on the command line (unknown flag or config field, a value of
    the wrong type, a config file that does not exist or rejects its arguments) is one error line
    and exit code 2 instead of a traceback or absl's usage dump with exit code 1."""
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        hint = f" (in {' '.join(overrides)})" if isinstance(e, (KeyError, AttributeError)) and overrides else ""
        _usage_error(_flag_error_message(e) + hint)
    if _CONFIG.value is not None:
        try:
            _CONFIG.value.keys()  # a config file that could not be read fails on first access
        except OSError as e:
            lines = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
            _usage_error(f"--config: {lines[-1] if lines else e}")
    return rest


def main(argv):
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        _usage_error("--config and --workdir are required")
    try:
        _main()
    except KeyboardInterrupt:
        # before the first step (imports, data, compilation) or a second Ctrl-C: nothing to save
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _main():
    from defusion_jax import sharding

    sharding.maybe_initialize_distributed()  # before any device is touched
    logging.info("host allocator: %s (DEFUSION_TCMALLOC=0 for the system one)", allocator.active())
    from defusion_jax import compile_cache

    logging.info("compilation cache: %s (DEFUSION_COMPILE_CACHE=0 turns it off)",
                 compile_cache.enable(log=logging.warning) or "off")
    from defusion_jax import train
    from defusion_jax.params_io import CheckpointError

    try:
        result = train.train_and_evaluate(_CONFIG.value, os.path.expanduser(_WORKDIR.value))  # '--workdir=~/x' too
    except (train.ConfigError, CheckpointError) as e:
        _usage_error(str(e))
    except train.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    logging.info("finished: %s", result)


def run():
    allocator.reexec_with_tcmalloc()  # XLA:CPU's per-step scratch buffer stays mapped (see there)
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # Ctrl-C while the modules load
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run()

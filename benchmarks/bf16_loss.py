"""Does bf16 compute track float32? The smoke config trained twice, float32 and bfloat16 compute.

    python benchmarks/bf16_loss.py [--config configs/pretrain.py:smoke] [--steps 60] [--log-every 5]

Both runs use the real trainer (defusion_jax.train.train_and_evaluate) with the same seed, so they
see the same batches, views and masks; only `config.compute_dtype` differs (parameters and Adam
state stay float32 in both). Prints one JSON line with the logged losses of both runs, the
relative difference at every logged step, and whether it stays within `--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common
from train_step import load_config


def run(config_spec: str, dtype: str, steps: int, log_every: int, workdir: Path) -> dict[int, float]:
    from defusion_jax import train

    config = load_config(config_spec)
    config.compute_dtype = dtype
    config.total_steps = steps
    config.log_every = log_every
    config.panel_every = 0
    config.tensorboard = False
    config.ckpt_every = 10**9
    train.train_and_evaluate(config, str(workdir))
    losses = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "step" in rec:
            losses[int(rec["step"])] = float(rec["loss"])
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pretrain.py:smoke")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=0.05, help="max relative loss difference accepted")
    args = ap.parse_args(argv)
    _common.set_xla_flags()
    _common.enable_compilation_cache()
    record = {"benchmark": "bf16_loss", "config": args.config, "steps": args.steps, "loadavg_start": _common.loadavg()}
    out = {}
    with tempfile.TemporaryDirectory(prefix="bf16_loss_") as tmp:
        for dtype in ("float32", "bfloat16"):
            t0 = time.perf_counter()
            out[dtype] = run(args.config, dtype, args.steps, args.log_every, Path(tmp) / dtype)
            record[f"{dtype}_wall_s"] = round(time.perf_counter() - t0, 1)
    steps = sorted(set(out["float32"]) & set(out["bfloat16"]))
    rel = [abs(out["bfloat16"][s] - out["float32"][s]) / abs(out["float32"][s]) for s in steps]
    record.update(_common.host_info())
    record["steps_logged"] = steps
    record["loss_float32"] = [round(out["float32"][s], 5) for s in steps]
    record["loss_bfloat16"] = [round(out["bfloat16"][s], 5) for s in steps]
    record["rel_diff"] = [round(r, 4) for r in rel]
    record["max_rel_diff"] = round(max(rel), 4) if rel else None
    record["tolerance"] = args.tolerance
    record["within_tolerance"] = bool(rel) and max(rel) <= args.tolerance
    record["loadavg_end"] = _common.loadavg()
    _common.emit(record)
    return 0 if record["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())

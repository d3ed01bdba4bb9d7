"""Training-step throughput of a config: pairs/s, XLA-counted FLOPs per step, MFU and peak memory.

    python benchmarks/train_step.py --config=configs/pretrain.py --batch=4 --crop=224 --steps=5
    python benchmarks/train_step.py --config=configs/pretrain.py:official,cud --batch=256 --dtype=bfloat16 --steps=20
    python benchmarks/train_step.py --config=configs/pretrain.py:official,cud --batch=2048 --devices=0   # all GPUs
    srun python benchmarks/train_step.py --config=configs/pretrain.py:official,cud --batch=8192 --devices=0   # a job

The step is the trainer's update (defusion_jax.train: the task's loss_fn, value_and_grad, optax
update, gradient and parameter norms), jitted with the train state donated, on device 0, or with
`--devices N` data-parallel over the first N local devices (0 = all; the batch sharded, the state
placed by the config's `sharding_rules` as the trainer places it: replicated by default, split with
`:fsdp`; `--mesh-axis-types explicit` for an Explicit mesh; on a CPU, N host devices share its
cores; with several devices the line lists the compiled step's collectives). Batches
are made once and kept on the device, and `--steps` steps are dispatched back to back with a single
synchronisation at the end, so the figure is the device's, without host or input-pipeline stalls
(the input pipeline is measured by the trainer's own logs: it prefetches with worker threads).

Multi-process: where the environment says the job has several processes (Slurm, a TPU pod, or
DEFUSION_COORDINATOR / DEFUSION_NUM_PROCESSES / DEFUSION_PROCESS_ID, as `launch/` sets them), the
benchmark joins them through `jax.distributed` as the trainer does; `--devices 0` is then every
device of the job, each process feeds its share of the global batch, and process 0 prints the line
(`processes`, `devices` = the job's). On one machine, e.g. two CPU processes:
`PYTHONPATH=benchmarks launch/multi_gpu_local.sh --procs 2 --platform cpu --module train_step -- --devices 0`.

  --kind single  a single-modal CUD + MFM batch (clean images; the views are drawn on device)
  --kind multi   a multi-modal MCUD batch (IR/visible pairs) against two frozen ViT teachers; without
                 converted teachers in the config, random ViT-B/16 teachers of the real size are used
MFU = flops_per_step * steps/s / matmul peak, where the peak is measured on the same device, in the
compute dtype, in the same run (so it is the achievable, not the datasheet, peak). With N devices,
flops_per_step is summed over the devices (XLA counts one device's program: times N; the replicated
optimiser update and norms are done, and counted, on every device) and the peak is
device 0's times N on accelerators, device 0's alone on a CPU (there the host devices share the
cores device 0 measured with).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import _common


def load_config(spec: str):
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_absolute():
        p = _common.ROOT / p
    if not p.exists():
        raise SystemExit(f"error: config file {path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"bench_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pretrain.py", help="config file[:args]")
    ap.add_argument("--batch", type=int, default=4, help="global batch (pairs)")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of --steps steps; the median is kept")
    ap.add_argument("--dtype", default=None, help="config.compute_dtype override (float32 / bfloat16)")
    ap.add_argument("--remat", action="store_true", help="config.remat = True")
    ap.add_argument("--kind", choices=("single", "multi"), default="single")
    ap.add_argument("--devices", type=int, default=1, help="data-parallel over the first N local devices (0 = all)")
    ap.add_argument("--mesh-axis-types", choices=("auto", "explicit"), default="auto",
                    help="config.mesh_axis_types of the mesh the step is compiled for")
    ap.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement (no MFU)")
    ap.add_argument("--xla-flags", default="")
    args = ap.parse_args(argv)
    flags = _common.set_xla_flags(args.xla_flags)

    import jax
    import numpy as np

    try:
        from defusion_jax import sharding as sh
        from defusion_jax import train as trainer
        from defusion_jax.tasks import get_task
    except ImportError as e:
        print(f"error: the trainer (defusion_jax/train.py, defusion_jax/tasks/) is not importable here: {e}",
              file=sys.stderr)
        return 2

    multi_process = sh.distributed_request() is not None
    if multi_process and args.devices != 0:
        print("error: a multi-process job measures every device of the job: pass --devices 0", file=sys.stderr)
        return 2
    if args.devices > 1:  # only the CPU backend reads it; before any backend starts
        jax.config.update("jax_num_cpu_devices", args.devices)
    sh.maybe_initialize_distributed()  # as the trainer's main does, before any device is touched
    _common.enable_compilation_cache()
    config = load_config(args.config)
    config.batch_size, config.image_size = args.batch, args.crop
    if args.dtype:
        config.compute_dtype = args.dtype
    if args.remat:
        config.remat = True
    if args.kind == "single":
        config.mm_ratio = 0.0
    else:
        config.mm_ratio = 1.0
        if not (config.teacher.get("smoke") or {}):
            from pathlib import Path as _P

            if not all(config.teacher.get(r) and _P(config.teacher.get(r)).exists() for r in ("visible", "infrared")):
                # random teachers of the real size: the cost of the step does not depend on the weights
                config.teacher.smoke = dict(width=int(config.model.get("teacher_dim", 768)), depth=12,
                                            heads=12, mlp_dim=4 * int(config.model.get("teacher_dim", 768)))
    record = {"benchmark": "train_step", "config": args.config, "kind": args.kind, "batch": args.batch,
              "crop": args.crop, "compute_dtype": str(config.get("compute_dtype", "float32")),
              "remat": bool(config.get("remat", False)), "loadavg_start": _common.loadavg()}
    record.update(_common.host_info())
    record["xla_flags"] = flags

    devices = jax.devices() if multi_process else jax.local_devices()[: args.devices or None]
    if len(devices) < max(args.devices, 1):
        print(f"error: --devices {args.devices} but only {len(devices)} local devices", file=sys.stderr)
        return 2
    mesh = sh.make_mesh((("data", -1),), args.mesh_axis_types, devices=devices)
    try:
        sh.batch_size_per_device(mesh, args.batch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record["devices"], record["processes"] = len(devices), jax.process_count()
    record["mesh_axis_types"] = args.mesh_axis_types
    rep = sh.replicated(mesh)
    task = get_task(config.task)(config, mesh)
    tx, lr_fn = trainer.build_optimizer(config)
    frozen = jax.device_put(task.load_frozen(), rep)

    init_state, train_step = trainer.make_step_fns(task, tx, lr_fn)  # the trainer's own update
    keys = jax.random.split(jax.random.key(0))
    state_sharding = trainer.state_shardings(config, jax.eval_shape(init_state, *keys), mesh)
    record["sharded_arrays"] = sum(not s.is_fully_replicated for s in jax.tree.leaves(state_sharding))
    state = jax.jit(init_state, out_shardings=state_sharding)(*keys)
    record["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.crop, args.crop, 3)
    if args.kind == "single":
        batch = {"image": rng.random(shape, dtype=np.float32)}
    else:
        batch = {"ir": rng.random(shape, dtype=np.float32), "vi": rng.random(shape, dtype=np.float32)}
    rows = sh.process_rows(args.batch)
    batch = sh.global_batch({k: v[rows] for k, v in batch.items()}, mesh)

    say = _common.log if jax.process_index() == 0 else (lambda *a: None)  # progress, for a run cut short
    say(f"train_step: {record['params']:,} parameters, batch {args.batch} x {args.crop}^2, "
        f"{record['compute_dtype']}, {len(devices)} device(s): compiling")
    step_fn = trainer.jit_train_step(train_step, mesh, state_sharding)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = step_fn.lower(state, frozen, batch).compile()
    record["compile_s"] = round(time.perf_counter() - t0, 1)
    sh.wait_for_all_processes("train_step_compiled")
    flops = _common.compiled_flops(compiled)
    flops = flops * len(devices) if flops else flops
    record["flops_per_step"] = flops
    say(f"compiled in {record['compile_s']} s" + (f", {flops / 1e9:.1f} GFLOP per step" if flops else ""))
    if len(devices) > 1:
        record["collectives"] = sh.collectives(compiled)
    for _ in range(args.warmup):
        state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    record["loss_after_warmup"] = float(metrics["loss"])

    runs, counts = [], {}
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), _common.process_counters()
        for _ in range(args.steps):
            state, metrics = compiled(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        runs.append((time.perf_counter() - t0) / args.steps)
        _common.add_counts(counts, c0, args.steps)
        say(f"repeat {len(runs)}/{args.repeats}: {runs[-1] * 1e3:.2f} ms per step ({args.batch / runs[-1]:.1f} pairs/s)")
    record.update(_common.per_call(counts, "step"))
    step_s = _common.median(runs)
    record["step_ms"] = round(step_s * 1e3, 2)
    record["step_ms_spread"] = [round(min(runs) * 1e3, 2), round(max(runs) * 1e3, 2)]
    record["pairs_per_s"] = round(args.batch / step_s, 3)
    if not args.no_peak:
        dtype = "bfloat16" if "bfloat16" in record["compute_dtype"] else "float32"
        record.update(_common.matmul_peak_flops(dtype))
        if jax.default_backend() != "cpu":
            record["matmul_peak_flops"] *= len(devices)
        elif multi_process:  # CPU processes: each measured its own share of the machine
            record["matmul_peak_flops"] *= jax.process_count()
        if flops:
            record["mfu"] = round(flops / step_s / record["matmul_peak_flops"], 4)
    return _common.finish(record) if jax.process_index() == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

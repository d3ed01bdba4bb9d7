"""A/B of the trainer step and the eval forward: two persistent processes taking turns.

    python benchmarks/ab_step.py --a PATH_A --b PATH_B [--a-devices 1 --b-devices 2] [--rounds 8 --calls 4]
    python benchmarks/ab_step.py --a . --b . --b-xla-flags=--xla_cpu_enable_fast_math=true   # an XLA flag

PATH_A / PATH_B are checkouts of this repository (e.g. `git worktree add /tmp/old <commit>`; the
same path twice to compare device counts). Each side is a process of its own that imports its
checkout, compiles the official-recipe CUD trainer step (`train.jit_train_step`) and the
deterministic full forward (batch `--batch`, `--crop`), data-parallel over `--X-devices` host
devices (`jax_num_cpu_devices`; the batch sharded, parameters replicated), with `--X-xla-flags`
added to its XLA_FLAGS, and then times `--calls` calls per turn, the two sides alternating and
swapping who goes first every round. The first `--skip-rounds` rounds are dropped:
on the 2-core CPU kind our process runs its first ~6-8 calls slower, and the machine's speed drifts
by 10-30 % within minutes, which one process timed after the other would read as a difference.
Prints one JSON line: per side and kind the median, min and max ms per call and the ratio b / a.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(repo: str, devices: int, batch: int, crop: int) -> None:
    sys.path[:0] = [repo, str(Path(repo) / "benchmarks")]
    import _common  # noqa: F401  (tcmalloc re-exec, as every benchmark)
    import jax
    import numpy as np

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    from configs.pretrain import get_config
    from defusion_jax import sharding as sh
    from defusion_jax import train as trainer
    from defusion_jax.models.defusion import build_model, init_params
    from defusion_jax.tasks import get_task

    mesh = sh.make_mesh((("data", -1),))
    config = get_config("official,cud")
    config.batch_size, config.image_size, config.total_steps = batch, crop, 10**6
    task = get_task(config.task)(config, mesh)
    tx, lr_fn = trainer.build_optimizer(config)
    init_state, train_step = trainer.make_step_fns(task, tx, lr_fn)
    rep, data = sh.replicated(mesh), sh.batch_sharding(mesh, 4)
    x = np.random.default_rng(0).random((batch, crop, crop, 3), np.float32)
    model = build_model({})
    with jax.set_mesh(mesh):
        state = {"s": jax.jit(init_state, out_shardings=rep)(*jax.random.split(jax.random.key(0)))}
        step = trainer.jit_train_step(train_step, mesh)
        images = {"image": jax.device_put(x, data)}
        params = jax.device_put(init_params(model, jax.random.key(0), (crop, crop)), rep)
        forward = jax.jit(lambda p, a, b, r: model.apply({"params": p}, a, b, rngs={"mfm": r}))
        a, b = jax.device_put(x, data), jax.device_put(x[::-1].copy(), data)

        def train():
            state["s"], metrics = step(state["s"], {}, images)
            jax.block_until_ready((state["s"], metrics))

        def evaluate(i=[0]):
            i[0] += 1
            jax.block_until_ready(forward(params, a, b, jax.random.key(i[0])))

        print(json.dumps({"ready": True, "devices": len(jax.devices())}), flush=True)
        for line in sys.stdin:
            kind, calls = line.split()
            fn = train if kind == "train" else evaluate
            ms = []
            for _ in range(int(calls)):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
            print(json.dumps(ms), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", help="checkout A (required)")
    ap.add_argument("--b", help="checkout B (required)")
    ap.add_argument("--a-devices", type=int, default=1)
    ap.add_argument("--b-devices", type=int, default=1)
    ap.add_argument("--a-xla-flags", default="", help="XLA_FLAGS added for side a only")
    ap.add_argument("--b-xla-flags", default="", help="XLA_FLAGS added for side b only")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--calls", type=int, default=4, help="calls per turn")
    ap.add_argument("--skip-rounds", type=int, default=2, help="warm-up rounds left out of the medians")
    ap.add_argument("--kinds", default="train,eval")
    ap.add_argument("--worker", nargs=2, metavar=("REPO", "DEVICES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.batch, args.crop)
        return 0
    if not (args.a and args.b):
        ap.error("--a and --b are required")
    if args.rounds <= args.skip_rounds:
        ap.error("--rounds must exceed --skip-rounds")
    sides = {"a": (os.path.abspath(args.a), args.a_devices), "b": (os.path.abspath(args.b), args.b_devices)}
    side_flags = {"a": args.a_xla_flags, "b": args.b_xla_flags}
    for repo, _ in sides.values():
        if not (Path(repo) / "defusion_jax").is_dir():
            ap.error(f"{repo} is not a checkout of this repository (no defusion_jax/)")
    procs = {}
    for name, (repo, devices) in sides.items():  # one after the other: compilation is not timed
        procs[name] = subprocess.Popen(
            [sys.executable, __file__, "--worker", repo, str(devices), "--batch", str(args.batch),
             "--crop", str(args.crop)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "XLA_FLAGS": " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), side_flags[name]) if f)})
        ready = procs[name].stdout.readline()
        if not ready:
            print(f"error: side {name} ({repo}) did not start", file=sys.stderr)
            return 1
        print(f"side {name}: {repo}, {json.loads(ready)['devices']} device(s)", file=sys.stderr)
    times: dict = {}
    kinds = args.kinds.split(",")
    for r in range(args.rounds):
        for kind in kinds:
            for name in ("a", "b") if r % 2 == 0 else ("b", "a"):
                procs[name].stdin.write(f"{kind} {args.calls}\n")
                procs[name].stdin.flush()
                ms = json.loads(procs[name].stdout.readline())
                print(f"round {r} {name} {kind}: " + " ".join(f"{t:.0f}" for t in ms) + " ms", file=sys.stderr)
                if r >= args.skip_rounds:
                    times.setdefault(f"{name}_{kind}", []).extend(ms)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    record = {"benchmark": "ab_step", "batch": args.batch, "crop": args.crop,
              "a": sides["a"][0], "a_devices": args.a_devices, "b": sides["b"][0], "b_devices": args.b_devices,
              "a_xla_flags": args.a_xla_flags, "b_xla_flags": args.b_xla_flags,
              "calls_per_side_and_kind": (args.rounds - args.skip_rounds) * args.calls}
    for key, ts in times.items():
        record[f"{key}_ms"] = round(statistics.median(ts), 1)
        record[f"{key}_spread"] = [round(min(ts), 1), round(max(ts), 1)]
    for kind in kinds:
        record[f"{kind}_b_over_a"] = round(record[f"b_{kind}_ms"] / record[f"a_{kind}_ms"], 3)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

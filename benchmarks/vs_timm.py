"""Our ViT against timm on the same machine and inputs: ViT-B/16 teacher forward and ViT-T/16 train step.

    python benchmarks/vs_timm.py [--batch 8] [--crop 224] [--threads 2] [--dtype float32]

  teacher  timm `vit_base_patch16_224` (random init, no download) `forward_features` in eval mode under
           torch.no_grad(), against our `FeatureViT` ViT-B (the frozen teacher H_fix), jitted
  train    timm `vit_tiny_patch16_224` forward_features, L1 to a fixed target, backward, AdamW step,
           against our ViT 'Ti' with the same loss and optax AdamW, one jitted step
Both use learned position tables, inputs already normalised, drop-path 0. Median of interleaved
rounds (timm, ours, timm, ours, ...) after warm-up; `*_ratio` = timm time / our time (> 1: ours faster).
"""

from __future__ import annotations

import argparse
import sys
import time

import _common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--dtype", default="float32", help="our compute dtype")
    ap.add_argument("--steps", type=int, default=5, help="timed calls per round and side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=("teacher", "train", "both"), default="both")
    ap.add_argument("--torch-device", default=None, help="torch device (default: cuda if jax runs on gpu)")
    ap.add_argument("--xla-flags", default="")
    args = ap.parse_args(argv)
    flags = _common.set_xla_flags(args.xla_flags)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import timm
    import torch

    from defusion_jax.models.vit import FeatureViT, decode_variant

    _common.enable_compilation_cache()
    torch.set_num_threads(args.threads)
    tdev = args.torch_device or ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    record = {"benchmark": "vs_timm", "batch": args.batch, "crop": args.crop, "dtype": args.dtype,
              "loadavg_start": _common.loadavg(), "timm": timm.__version__, "torch": torch.__version__,
              "torch_device": tdev, "torch_threads": torch.get_num_threads()}
    record.update(_common.host_info())
    record["xla_flags"] = flags

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.crop, args.crop, 3), dtype=np.float32)
    grid = args.crop // 16
    tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(tdev)
    jx = jax.device_put(x)

    def sync_torch(_=None):
        if tdev.startswith("cuda"):
            torch.cuda.synchronize()

    def ours(variant):
        cfg = decode_variant(variant)
        return FeatureViT(**cfg, posemb="learned", posemb_grid=(grid, grid), normalize=False, dtype=jnp.dtype(args.dtype))

    plan = []
    if args.only in ("teacher", "both"):
        tm = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=args.crop).to(tdev).eval()
        fm = ours("B")
        fp = fm.init(jax.random.key(0), jx[:1])["params"]
        f = jax.jit(lambda p, x: fm.apply({"params": p}, x))

        def timm_teacher():
            with torch.no_grad(), torch.autocast(tdev.split(":")[0], dtype=tdtype, enabled=tdtype != torch.float32):
                return tm.forward_features(tx)

        plan += [("timm_teacher", timm_teacher, sync_torch), ("ours_teacher", lambda: f(fp, jx), jax.block_until_ready)]

    if args.only in ("train", "both"):
        tt = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=args.crop, drop_path_rate=0.0).to(tdev).train()
        topt = torch.optim.AdamW(tt.parameters(), lr=1e-4)
        n_tok = 1 + grid * grid
        target = rng.standard_normal((args.batch, n_tok, 192), dtype=np.float32)
        ttarget = torch.from_numpy(target).to(tdev)

        def timm_train():
            with torch.autocast(tdev.split(":")[0], dtype=tdtype, enabled=tdtype != torch.float32):
                loss = (tt.forward_features(tx).float() - ttarget).abs().mean()
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()
            return loss

        om = ours("Ti")
        op = om.init(jax.random.key(0), jx[:1])["params"]
        otx = optax.adamw(1e-4)
        jt = jax.device_put(target)

        def step(state, x, t):
            def loss_fn(p):
                return jnp.abs(om.apply({"params": p}, x).astype(jnp.float32) - t).mean()
            loss, g = jax.value_and_grad(loss_fn)(state[0])
            u, o = otx.update(g, state[1], state[0])
            return (optax.apply_updates(state[0], u), o), loss

        jstep = jax.jit(step, donate_argnums=(0,))
        holder = {"s": (op, otx.init(op))}

        def ours_train():
            holder["s"], loss = jstep(holder["s"], jx, jt)
            return loss

        plan += [("timm_train", timm_train, sync_torch), ("ours_train", ours_train, jax.block_until_ready)]

    for name, fn, sync in plan:
        t0 = time.perf_counter()
        _common.time_calls(fn, args.warmup, sync)
        record[f"{name}_warmup_s"] = round(time.perf_counter() - t0, 2)
        _common.log(f"vs_timm: {name} warm-up (compile) {record[f'{name}_warmup_s']} s")
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for name, fn, sync in plan:
            times.setdefault(name, []).extend(_common.time_calls(fn, args.steps, sync))
        _common.log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{name} {_common.median(ts[-args.steps:]) * 1e3:.2f} ms" for name, ts in times.items()))
    for name, ts in times.items():
        record[f"{name}_ms"] = round(_common.median(ts) * 1e3, 2)
    for kind in ("teacher", "train"):
        if f"timm_{kind}_ms" in record:
            record[f"{kind}_ratio"] = round(record[f"timm_{kind}_ms"] / record[f"ours_{kind}_ms"], 3)
            record[f"ours_{kind}_images_per_s"] = round(args.batch / (record[f"ours_{kind}_ms"] / 1e3), 2)
    return _common.finish(record)


if __name__ == "__main__":
    sys.exit(main())

"""Fusion latency: ms per 640 x 480 pair after warm-up, and pairs/s for a batch.

    python benchmarks/fuse_latency.py [--model PATH] [--dtype bfloat16] [--precision bfloat16] [--batch 8]
                                      [--height 480 --width 640]

Times, each after warm-up (compilation excluded), median of `--repeats`:
  fuse_ms             `FusionModel.fuse` on one H x W pair already on the device (the network: encoder,
                      decomposition, fusion, H_MFME, fused head), synchronised after each call
  fuse_image_ms       `FusionModel.fuse_image` on host numpy arrays: the official protocol (reflect pad
                      16 px + up to a multiple of 16, run, crop, clamp), transfers included
  batch_pairs_per_s   `fuse` on a batch of `--batch` pairs, `--repeats` calls dispatched back to back
Without `--model` the network has random weights of the official size (speed does not depend on them).
With `--precision` other than highest the line also gives `fused_rel_diff_vs_highest`: the relative
L2 distance of the one-pair `fuse` output from the same call at precision highest.
"""

from __future__ import annotations

import argparse
import sys
import time

import _common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint or params folder (default: random official-size)")
    ap.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    ap.add_argument("--precision", default="highest", help="matmul precision of the calls (highest, high, "
                    "default, bfloat16: FusionModel.fuse)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-image", action="store_true", help="do not time fuse_image (host protocol)")
    ap.add_argument("--xla-flags", default="")
    args = ap.parse_args(argv)
    flags = _common.set_xla_flags(args.xla_flags)

    import jax
    import numpy as np

    from defusion_jax.api import FusionModel, load_model
    from defusion_jax.models.defusion import build_model, init_params

    _common.enable_compilation_cache()
    record = {"benchmark": "fuse_latency", "height": args.height, "width": args.width, "dtype": args.dtype,
              "precision": args.precision, "loadavg_start": _common.loadavg()}
    if args.model:
        base = load_model(args.model)
        model = FusionModel(base.params, {**base.config, "dtype": args.dtype}, base.meta)
        record["model"] = args.model
    else:
        cfg = {"dtype": args.dtype}
        params = init_params(build_model({}), jax.random.key(0), (224, 224))
        model = FusionModel(params, cfg, {"source": "random official-size"})
        record["model"] = "random weights, official UCMIMNet size"
    record.update(_common.host_info())
    record["xla_flags"] = flags

    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    a_host = rng.random((h, w, 3), dtype=np.float32)
    b_host = rng.random((h, w, 3), dtype=np.float32)
    # the network itself needs multiples of 16 (fuse_image pads; fuse does not)
    h16, w16 = -(-h // 16) * 16, -(-w // 16) * 16
    a = jax.device_put(np.pad(a_host, ((0, h16 - h), (0, w16 - w), (0, 0)), mode="reflect")[None])
    b = jax.device_put(np.pad(b_host, ((0, h16 - h), (0, w16 - w), (0, 0)), mode="reflect")[None])

    def one():
        return model.fuse(a, b, precision=args.precision)

    _common.log(f"fuse_latency: {h} x {w}, {args.dtype}, precision {args.precision}: compiling")
    t0 = time.perf_counter()
    _common.time_calls(one, args.warmup, jax.block_until_ready)
    record["fuse_warmup_s"] = round(time.perf_counter() - t0, 2)
    ts = _common.time_calls(one, args.repeats, jax.block_until_ready)
    record["fuse_ms"] = round(_common.median(ts) * 1e3, 2)
    record["fuse_ms_min"] = round(min(ts) * 1e3, 2)
    record["fuse_input"] = [1, h16, w16, 3]
    _common.log(f"warm-up {record['fuse_warmup_s']} s; one pair: {record['fuse_ms']} ms (median of {args.repeats})")

    if not args.skip_image:
        def whole():
            return model.fuse_image(a_host, b_host, task="mef", precision=args.precision)

        _common.time_calls(whole, args.warmup, lambda r: None)
        ts = _common.time_calls(whole, args.repeats, lambda r: None)
        record["fuse_image_ms"] = round(_common.median(ts) * 1e3, 2)
        _common.log(f"fuse_image (host arrays, padding): {record['fuse_image_ms']} ms")

    ab = jax.device_put(np.broadcast_to(np.asarray(a), (args.batch, h16, w16, 3)).copy())
    bb = jax.device_put(np.broadcast_to(np.asarray(b), (args.batch, h16, w16, 3)).copy())
    jax.block_until_ready(model.fuse(ab, bb, precision=args.precision))
    jax.block_until_ready(model.fuse(ab, bb, precision=args.precision))
    t0 = time.perf_counter()
    outs = [model.fuse(ab, bb, precision=args.precision) for _ in range(args.repeats)]
    jax.block_until_ready(outs)
    dt = time.perf_counter() - t0
    record["batch"] = args.batch
    record["batch_pairs_per_s"] = round(args.batch * args.repeats / dt, 3)
    if args.precision != "highest":
        got, ref = (np.asarray(model.fuse(a, b, precision=p), np.float64) for p in (args.precision, "highest"))
        record["fused_rel_diff_vs_highest"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return _common.finish(record)


if __name__ == "__main__":
    sys.exit(main())

"""Bytes exchanged per step under data parallelism and FSDP, and projected throughput on TPU
slices and 8-GPU nodes, as ESTIMATES from per-sample FLOPs and one measured or assumed MFU.

    python benchmarks/scaling_projection.py                       # the table in docs/scaling.md
    python benchmarks/scaling_projection.py --measured train_step.json --device h100

Model (stated, not measured on those machines):
  compute time per step  t_c = flops_per_sample * per_device_batch / (peak * mfu)
  data parallel          every device all-reduces the float32 gradients: 2 (N-1)/N * P * 4 bytes
  FSDP (ZeRO-3 style)    parameters all-gathered for the forward and again for the backward, the
                         gradients reduce-scattered: 3 (N-1)/N * P * 4 bytes (float32 parameters)
  communication time     t_x = bytes / per-device collective bandwidth
  step time              max(t_c, t_x) with perfect overlap and t_c + t_x without; both reported
The frozen ViT-B teachers are replicated and never exchanged; batches are sharded, not exchanged.
With --measured, the MFU measured by benchmarks/train_step.py on that device replaces the assumed one.
"""

from __future__ import annotations

import argparse
import json
import sys

# Per-sample training FLOPs counted by XLA (benchmarks/train_step.py flops_per_step / batch, on CPU,
# float32; the count does not depend on the device) and trainable parameters.
WORKLOADS = {
    "defusion_cud_mfm": dict(label="DeFusion++ CUD+MFM step (ViT-T student)", params=13_420_800,
                             flops=31.3e9),
    "defusion_mcud": dict(label="DeFusion++ MCUD step (ViT-T student, 2 frozen ViT-B teachers)",
                          params=13_718_016, flops=94.7e9),
    "mae_vit_b": dict(label="MAE ViT-B/16 teacher pretraining (encoder + decoder)", params=111_655_680,
                      flops=59.2e9),
}
# Public peak figures (bf16 dense) and per-device collective bandwidth used for the estimate.
DEVICES = {
    "tpu_v4": dict(label="TPU v4 chip", peak=275e12, coll_bw=270e9, batch=128,  # 1.1 PB/s all-reduce per 4096-chip pod
                   note="ICI all-reduce 1.1 PB/s per 4096 chips"),
    "tpu_v5e": dict(label="TPU v5e chip", peak=197e12, coll_bw=200e9, batch=64,  # 51.2 TB/s per 256-chip pod
                    note="ICI all-reduce 51.2 TB/s per 256 chips"),
    "h100": dict(label="H100 SXM (8 per node, NVLink)", peak=989e12, coll_bw=450e9, batch=256,  # NVLink 900 GB/s bidir.
                 note="NVLink 4: 900 GB/s bidirectional per GPU"),
    "h100_ib": dict(label="H100 across nodes (8x400 Gb/s IB)", peak=989e12, coll_bw=50e9, batch=256,
                    note="one 400 Gb/s NIC per GPU"),
}
SLICES = {"tpu_v4": (8, 32, 128), "tpu_v5e": (8, 64, 256), "h100": (8,), "h100_ib": (16, 64)}


def bytes_per_step(params: int, n: int, fsdp: bool) -> float:
    frac = (n - 1) / n if n > 1 else 0.0
    return (3.0 if fsdp else 2.0) * frac * params * 4


def project(workload: dict, device: dict, n: int, mfu: float, fsdp: bool) -> dict:
    batch = device["batch"]  # per device: what fits in its memory with room to spare (16-80 GB)
    t_c = workload["flops"] * batch / (device["peak"] * mfu)
    b = bytes_per_step(workload["params"], n, fsdp)
    t_x = b / device["coll_bw"]
    return {"devices": n, "per_device_batch": batch, "bytes_per_device_per_step": b,
            "t_compute_ms": t_c * 1e3, "t_comm_ms": t_x * 1e3,
            "samples_per_s_overlap": n * batch / max(t_c, t_x),
            "samples_per_s_serial": n * batch / (t_c + t_x)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mfu", type=float, default=0.30, help="assumed model FLOPs utilisation")
    ap.add_argument("--measured", default=None, help="a train_step.py JSON line (file) whose mfu replaces --mfu")
    ap.add_argument("--device", default=None, help="only this device key")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    mfu, source = args.mfu, f"assumed MFU {args.mfu:.0%}"
    if args.measured:
        rec = json.loads(open(args.measured).read().strip().splitlines()[-1])
        if rec.get("mfu"):
            mfu, source = float(rec["mfu"]), f"MFU {float(rec['mfu']):.1%} measured on {rec.get('device')}"
    rows = []
    for wk, w in WORKLOADS.items():
        for dk, d in DEVICES.items():
            if args.device and dk != args.device:
                continue
            for n in SLICES[dk]:
                for fsdp in (False, True):
                    r = project(w, d, n, mfu, fsdp)
                    r.update(workload=wk, device=dk, mode="fsdp" if fsdp else "dp", mfu=mfu, mfu_source=source)
                    rows.append(r)
    if args.markdown:
        print(f"Estimates ({source}); samples/s with compute/communication overlap (serial in brackets).\n")
        print("| workload | device | N | mode | batch/device | MB sent per device per step | compute ms | comm ms | samples/s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['workload']} | {r['device']} | {r['devices']} | {r['mode']} | {r['per_device_batch']} | "
                  f"{r['bytes_per_device_per_step'] / 1e6:.0f} | {r['t_compute_ms']:.1f} | {r['t_comm_ms']:.2f} | "
                  f"{r['samples_per_s_overlap']:,.0f} ({r['samples_per_s_serial']:,.0f}) |")
    else:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of our CPU train step (or eval forward) goes: a per-operation profile.

    python benchmarks/profile_step.py [--what train|eval] [--batch 4 --crop 224] [--top 30] [--out DIR]

Runs the step of `cpu_vs_official.py` (the trainer's exact update, or the eval forward) a few times,
records two calls with `jax.profiler` (XLA:CPU per-op events via --xla_cpu_enable_xprof_traceme),
maps every executed HLO operation to the JAX source operation that made it (its `op_name`
metadata), and prints the top groups, e.g. `B ynn fcN/dot_general` = backward, YNNPACK fusion,
the MLP matmuls of every block. The last stdout line is the usual one JSON line (top groups, wall
time per call); the Perfetto trace and
`groups.json` (every group) stay in --out; open the trace in https://ui.perfetto.dev.

Operation times add up to more than the wall time: XLA:CPU runs independent operations concurrently.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import _common


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the `op_name` metadata of the JAX operation that produced it."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ [\w\-]+\(", line)
        if m:
            meta = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = meta.group(1) if meta else ""
    return out


def group_key(instr: str, op_name: str) -> str:
    parts = [p for p in op_name.split("/") if p]
    tail = "/".join(re.sub(r"\d+", "N", p) for p in parts[-2:]) if parts else f"<{instr.split('.')[0]}>"
    return ("B " if "transpose(" in op_name else "F ") + ("ynn " if instr.startswith("ynn") else "") + tail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", choices=("train", "eval"), default="train")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None, help="folder for the trace (default: a temporary folder)")
    args = ap.parse_args(argv)
    flags = _common.set_xla_flags("--xla_cpu_enable_xprof_traceme=true")

    import jax

    import cpu_vs_official as bench

    data = jax.device_put(bench.make_inputs(args.batch, args.crop))
    if args.what == "train":
        step, state, label = bench.ours_train_step("auto", args.batch, args.crop, "float32", False)
        holder = {"state": state}

        def call():
            holder["state"], metrics = step(holder["state"], data)
            return metrics

        jitted, jargs = (step.jitted, step.args(state, data)) if hasattr(step, "jitted") else (step, (state, data))
    else:
        forward, model, init_params = bench.ours_eval_fn("float32")
        params = init_params(model, jax.random.key(0), (args.crop, args.crop))
        key = jax.random.key(0)
        label = "eval forward (all outputs, MFM included)"

        def call():
            return forward(params, data["view1"], data["view2"], key)

        jitted, jargs = forward, (params, data["view1"], data["view2"], key)

    hlo = jitted.lower(*jargs).compile().as_text()  # before the calls: train donates its state
    _common.log(f"compiling and warming up: {label}")
    _common.time_calls(call, 2, jax.block_until_ready)
    wall = _common.median(_common.time_calls(call, 3, jax.block_until_ready))
    out = Path(args.out or tempfile.mkdtemp(prefix="defusion_profile_"))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        _common.time_calls(call, 2, jax.block_until_ready)
    traces = glob.glob(str(out / "**" / "*.trace.json.gz"), recursive=True)
    if not traces:
        print(f"error: no Perfetto trace written under {out}", file=sys.stderr)
        return 1
    events = json.load(gzip.open(sorted(traces)[-1]))
    events = events["traceEvents"] if isinstance(events, dict) else events

    names = hlo_op_names(hlo)
    per_group, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("name") in names:
            key = group_key(e["name"], names[e["name"]])
            per_group[key] += e["dur"] / 2e3  # two recorded calls, microseconds -> ms per call
            count[key] += 0.5
    total = sum(per_group.values())
    (out / "groups.json").write_text(json.dumps(  # every group, for sums the top list does not show
        [{"group": k, "ms": round(v, 3), "ops": int(count[k])} for k, v in per_group.most_common()], indent=0))
    _common.log(f"{label}: {wall * 1e3:.0f} ms per call (wall); operations sum to {total:.0f} ms")
    top = []
    for key, ms in per_group.most_common(args.top):
        _common.log(f"{ms:8.1f} ms {100 * ms / max(total, 1e-9):5.1f} %  x{int(count[key]):4d}  {key}")
        top.append({"group": key, "ms": round(ms, 2), "ops": int(count[key])})
    record = {"benchmark": "profile_step", "what": args.what, "label": label, "batch": args.batch,
              "crop": args.crop, "wall_ms": round(wall * 1e3, 1), "ops_total_ms": round(total, 1),
              "top": top, "trace_dir": str(out), "xla_flags": flags, "loadavg": _common.loadavg()}
    record.update(_common.host_info())
    _common.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

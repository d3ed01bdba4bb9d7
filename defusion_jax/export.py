"""Export the fusion function: `python -m defusion_jax.export --model PATH --out DIR`.

Writes DIR/fuse.jax (a `jax.export` serialization of `f(params, a, b) -> fused` with symbolic
batch, height and width, height and width multiples of 16, lowered for cpu, cuda and tpu),
DIR/weights.npz (the parameters, an argument of the function rather than constants in it) and
DIR/manifest.json (input layout, value range, padding rule, versions, checksums). Load it with
`defusion_jax.exported.load(DIR)`, which needs only jax and numpy.

The serialized function is trusted input for whoever loads it (see `defusion_jax.exported`).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from defusion_jax.exported import FORMAT, MANIFEST, is_export_dir
from defusion_jax.inference import MATMUL_PRECISIONS

FUNCTION_FILE = "fuse.jax"
WEIGHTS_FILE = "weights.npz"
PLATFORMS = ("cpu", "cuda", "tpu")
PADDING_RULE = ("np.pad(x, ((16, 16 + eh), (16, 16 + ew), (0, 0)), mode='reflect') for an H x W x 3 image, "
                "eh = (-(H + 32)) % 16, ew = (-(W + 32)) % 16 (numpy 'reflect' is PyTorch F.pad mode='reflect'); "
                "mode='symmetric' instead when 16 + eh >= H or 16 + ew >= W (reflection needs a pad smaller than "
                "the side); fuse; crop rows [16, 16 + H) and columns [16, 16 + W)")
COLOR_RULE = {
    "ivf": "both inputs grey replicated to 3 channels, as the official loaders (PIL convert('L')): for 8-bit RGB "
           "L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16 on the 0..255 integers, /255; for deeper images "
           "0.299 R + 0.587 G + 0.114 B in float32; for colour output put the fused luma into the visible "
           "image's full-range BT.601 YCbCr (Y from fused, CbCr from visible)",
    "mef": "RGB as is (grey inputs replicated to 3 channels)",
    "mff": "RGB as is (grey inputs replicated to 3 channels)",
}


EXPORT_FILES = frozenset({MANIFEST, FUNCTION_FILE, WEIGHTS_FILE})


def check_target(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise FileExistsError unless `out_dir` may be (re)written: it does not exist, is an empty
    folder, or (with `overwrite`) is an export folder holding nothing but an export's own files.
    Replacing deletes the old folder, so anything else (a source tree, a file) is never touched."""
    out_dir = Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; an export is a folder, choose a new or empty folder for --out")
    entries = {p.name for p in out_dir.iterdir()}
    if not entries:
        return
    if not is_export_dir(out_dir) or not entries <= EXPORT_FILES:
        raise FileExistsError(f"{out_dir} exists and is not an export folder (it holds other files); "
                              "refusing to replace it, choose a new or empty folder for --out")
    if not overwrite:
        raise FileExistsError(f"{out_dir} holds an export already; pass --overwrite to replace it")


def _versions() -> dict:
    import flax
    import jax
    import jaxlib

    out = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
           "numpy": np.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        out["defusion_jax"] = version("defusion-jax")
    except Exception:
        out["defusion_jax"] = "source tree"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            out["defusion_jax_git"] = rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def export_model(model, out_dir: str | os.PathLike, *, direction: str = "q_view2",
                 platforms=PLATFORMS, precision: str = "highest", overwrite: bool = False) -> Path:
    """Serialize `model`'s fusion function into `out_dir` (written to a temporary folder first,
    then renamed, so DIR is either the old export or the complete new one)."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from defusion_jax.models.vit import MAX_TRACED_GRID
    from defusion_jax.params_io import flatten

    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)
    module, patch = model.module, model.module.patch
    max_side = MAX_TRACED_GRID * patch

    def fuse(params, a, b):
        return module.apply({"params": params}, a, b, direction, method=type(module).fuse)

    shape = export.symbolic_shape(f"b, {patch}*h, {patch}*w, 3",
                                  constraints=(f"h <= {MAX_TRACED_GRID}", f"w <= {MAX_TRACED_GRID}"))
    img = jax.ShapeDtypeStruct(shape, jnp.float32)
    params_spec = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), jnp.float32), model.params)
    # A cuDNN-only attention kernel (picked for 16-bit models when tracing on a GPU) cannot be
    # lowered for the other platforms: trace the portable formulation.
    saved = os.environ.get("DEFUSION_CUDNN_ATTENTION")
    os.environ["DEFUSION_CUDNN_ATTENTION"] = "0"
    try:
        with jax.default_matmul_precision(precision):
            exp = export.export(jax.jit(fuse), platforms=list(platforms))(params_spec, img, img)
    finally:
        if saved is None:
            os.environ.pop("DEFUSION_CUDNN_ATTENTION", None)
        else:
            os.environ["DEFUSION_CUDNN_ATTENTION"] = saved
    blob = exp.serialize()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700; the export gets the usual permissions
    try:
        (stage / FUNCTION_FILE).write_bytes(blob)
        flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(jax.device_get(model.params)).items()}
        with open(stage / WEIGHTS_FILE, "wb") as f:
            np.savez(f, **flat)
        n_params = int(sum(v.size for v in flat.values()))
        manifest = {
            "format": FORMAT,
            "files": {"function": FUNCTION_FILE, "weights": WEIGHTS_FILE},
            "sha256": {name: hashlib.sha256((stage / name).read_bytes()).hexdigest()
                       for name in (FUNCTION_FILE, WEIGHTS_FILE)},
            "call": "fused = f(params, a, b); exported.load(DIR)(a, b) supplies params",
            "inputs": {"a": "first source (IVF: infrared; MEF: under-exposed; MFF: image A)",
                       "b": "second source (IVF: visible; MEF: over-exposed; MFF: image B)",
                       "layout": "NHWC", "dtype": "float32", "shape": f"(batch, {patch}*h, {patch}*w, 3)",
                       "multiple_of": patch, "max_side": max_side, "value_range": [0.0, 1.0],
                       "channels": "RGB; grey images replicated to 3 channels"},
            "output": {"layout": "NHWC", "dtype": "float32", "shape": "same as the inputs",
                       "value_range": "raw linear prediction, mostly in [0, 1]; clip to [0, 1] before saving"},
            "padding_rule": PADDING_RULE,
            "color": COLOR_RULE,
            "direction": direction,
            "platforms": list(exp.platforms),
            "matmul_precision": precision,
            "trusted_input": "jax.export.deserialize runs the StableHLO in fuse.jax: load only exports you trust",
            "versions": {**_versions(), "calling_convention_version": exp.calling_convention_version},
            "model": {"config": model.config, "source": str(model.meta.get("source", "")), "num_params": n_params},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(stage, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m defusion_jax.export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="training workdir, checkpoint, parameter folder or official .pth/.safetensors")
    ap.add_argument("--out", required=True, help="folder to write (fuse.jax, weights.npz, manifest.json)")
    ap.add_argument("--direction", default="q_view2", choices=("q_view2", "q_view1"),
                    help="common-feature direction baked into the function (default q_view2)")
    ap.add_argument("--platforms", default=",".join(PLATFORMS), help="comma-separated: cpu,cuda,rocm,tpu (default cpu,cuda,tpu)")
    ap.add_argument("--precision", default="highest", choices=MATMUL_PRECISIONS,
                    help="matmul precision baked into the function (default highest: float32 like the reference; "
                         "see `fuse --help`)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing export folder (only one holding nothing but an export's files)")
    args = ap.parse_args(argv)

    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    bad = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
    if bad or not platforms:
        return _fail(f"unknown platform(s) {bad or '(none)'}; choose from cpu, cuda, rocm, tpu")
    try:  # before the (slow) model load
        check_target(args.out, args.overwrite)
    except FileExistsError as e:
        return _fail(str(e))
    try:
        from defusion_jax.api import load_model

        model = load_model(args.model)
    except Exception as e:  # unreadable model: one line, no traceback
        return _fail(f"cannot load model {args.model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    try:
        out = export_model(model, args.out, direction=args.direction, platforms=platforms,
                           precision=args.precision, overwrite=args.overwrite)
    except FileExistsError as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot write {args.out}: {e}")
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"exported {model!r} to {out} ({size / 2**20:.1f} MiB; platforms {', '.join(platforms)}); "
          f"load with defusion_jax.exported.load({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

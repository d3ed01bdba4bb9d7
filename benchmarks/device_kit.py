"""Build the folder a lent GPU machine needs for `gpu_check.sh`, here, where pip reaches PyPI.

The lent machine (docs/benchmarks.md, "When a GPU is lent") reaches no registry and gets only the
working tree (64 MiB at most, everything counted): its image has JAX, Flax, optax, orbax, PyTorch
and timm, but not every package our trainer imports, and `../shared` does not travel. This script
writes `.device/` (git-ignored) with

  whl/      Python 3.12 wheels of the packages the image lacks and `gpu_check.sh` imports
  fixture/  the parity fixture, cut to its first sample (the network treats samples independently)
            and with the weights xz-compressed so that it fits: gpu_check.sh unpacks it

Then, from the session that holds the device tool:

  run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=600)

    python benchmarks/device_kit.py                 # .device/ from ../shared, wheels for cp312
    python benchmarks/device_kit.py --no-wheels     # fixture only (e.g. to check the cut parity here)
"""

from __future__ import annotations

import argparse
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Imported on gpu_check.sh's path (the trainer, configs, benchmarks, parity test) but absent from the
# lent machine's image (its package list as read on 2026-11-17). tensorflow-datasets and
# pycocotools are absent too but not imported there. Each pinned, so that the set installs with
# --no-deps; gpu_check.sh stops with a clear line if an import still fails.
DEVICE_WHEELS = (
    "grain==0.2.18",          # the trainer's input pipeline
    "array-record==0.8.6",    # grain imports it at start-up
    "portpicker==1.6.0",      # grain
    "ml-collections==1.1.0",  # configs/*.py
    "tensorboardx==2.6.5",    # the trainer's metric writer
    "flax==0.12.12",          # the image has a Flax of unknown version; the suite passed with this one on jax 0.11.2
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
TREE_LIMIT = 64 * 2**20  # what one device call may carry, working tree included


def download_wheels(dest: Path, python_version: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + list(DEVICE_WHEELS), check=True)


def cut_fixture(src: Path, dest: Path, samples: int) -> None:
    """io.npz with the first `samples` of every per-sample array; weights as .safetensors.xz."""
    dest.mkdir(parents=True, exist_ok=True)
    with np.load(src / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    batch = io["view1"].shape[0]
    cut = {k: (v[:samples] if v.ndim and v.shape[0] == batch else v) for k, v in io.items()}
    np.savez_compressed(dest / "io.npz", **cut)
    with open(src / "ucmimnet_state_dict.safetensors", "rb") as fin, \
            lzma.open(dest / "ucmimnet_state_dict.safetensors.xz", "wb", preset=6) as fout:
        shutil.copyfileobj(fin, fout, 2**22)


def tree_bytes() -> int:
    """Bytes of what a device call sends besides carried paths: tracked + untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    files = [ROOT / p for p in out.decode().split("\0") if p]
    return sum(p.stat().st_size for p in files if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".device")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("DEFUSION_SHARED", ROOT.parent / "shared")))
    ap.add_argument("--python-version", default="3.12", help="the lent machine's Python (KINDS.md)")
    ap.add_argument("--samples", type=int, default=1, help="fixture samples kept (2 = all, does not fit)")
    ap.add_argument("--no-wheels", action="store_true")
    args = ap.parse_args(argv)

    fixture = args.shared / "fixtures" / "defusionpp_reference"
    if not (fixture / "io.npz").exists():
        ap.error(f"{fixture} has no io.npz: point --shared at the project's shared/ folder")
    if args.out.exists():
        shutil.rmtree(args.out)
    cut_fixture(fixture, args.out / "fixture", args.samples)
    if not args.no_wheels:
        download_wheels(args.out / "whl", args.python_version)

    kit = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    tree = tree_bytes()
    for p in sorted(args.out.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    print(f"kit {kit / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = {(kit + tree) / 2**20:.1f} MiB "
          f"of the {TREE_LIMIT / 2**20:.0f} MiB a device call carries")
    if kit + tree > TREE_LIMIT:
        print("error: too large for one device call; remove untracked files or keep fewer samples", file=sys.stderr)
        return 1
    print('next: run(command="bash benchmarks/gpu_check.sh", carry=[".device"], timeout_s=600)')
    return 0


if __name__ == "__main__":
    sys.exit(main())

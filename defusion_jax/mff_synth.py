"""Synthetic multi-focus pairs with an all-in-focus ground truth, built from sharp images.

A smooth random depth map is split at its median into a near and a far region. Source A is focused
on the near region, source B on the far one; the out-of-focus region is blurred with a defocus
(pillbox) PSF whose radius grows with the distance from the focal plane (4 depth layers), and the
layers are composited with soft masks so the focus transition is gradual, like a real lens. The
sharp input is the ground truth. Everything is fixed by --seed.

    python -m defusion_jax.mff_synth --src DIR --out OUT [--seed 0] [--max-radius 6] [--limit N]

writes OUT/A/<stem>.png, OUT/B/<stem>.png, OUT/GT/<stem>.png and OUT/manifest.csv. Not the paper's
protocol (RealMFF/MFI-WHU ground truth was not available offline); use it to score MFF against GT.
"""
from __future__ import annotations

import argparse
import csv
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from defusion_jax.metrics.color import to_float255
from defusion_jax.metrics.io import _read_image, list_stems, find_image


def disk_kernel(radius: float) -> np.ndarray:
    """Normalised pillbox PSF (a thin-lens defocus blur) with anti-aliased rim."""
    if radius < 0.5:
        return np.ones((1, 1), np.float32)
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float32)
    # Supersampled coverage of each pixel by the disk gives a smooth rim.
    ss = 4
    off = (np.arange(ss, dtype=np.float32) + 0.5) / ss - 0.5
    cov = np.zeros_like(xx)
    for dy in off:
        for dx in off:
            cov += ((xx + dx) ** 2 + (yy + dy) ** 2 <= radius * radius)
    k = cov / cov.sum()
    return k.astype(np.float32)


def depth_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth depth-like field in [0,1]: a random tilted plane plus low-frequency noise blobs."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    plane = (np.cos(theta) * xx / w + np.sin(theta) * yy / h)
    sigma = rng.uniform(0.08, 0.18) * min(h, w)
    noise = rng.standard_normal((h, w)).astype(np.float32)
    blobs = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    blobs /= blobs.std() + 1e-8
    d = plane / (plane.std() + 1e-8) * rng.uniform(0.3, 1.0) + blobs
    d -= d.min()
    return d / (d.max() + 1e-8)


def make_pair(img: np.ndarray, rng: np.random.Generator, max_radius: float = 6.0, layers: int = 4):
    """(A, B, mask_near) for one sharp uint8 image; A is sharp where mask_near is 1, B elsewhere."""
    x = img.astype(np.float32) / 255.0
    depth = depth_map(img.shape[:2], rng)
    t = float(np.median(depth))
    # Soft "near" membership: a sigmoid across the focal boundary (a few pixels wide).
    width = 0.02 + 0.03 * rng.random()
    near = 1.0 / (1.0 + np.exp((depth - t) / width))
    radius = rng.uniform(0.6, 1.0) * max_radius
    # Blur grows with distance from the focal plane: layered pillbox blurs blended by depth.
    dist = np.abs(depth - t) / max(t, 1 - t, 1e-6)
    radii = np.linspace(radius / layers, radius, layers)
    blurred = [cv2.filter2D(x, -1, disk_kernel(r), borderType=cv2.BORDER_REFLECT) for r in radii]
    pos = np.clip(dist * layers - 0.5, 0, layers - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, layers - 1)
    frac = (pos - lo).astype(np.float32)
    stack = np.stack(blurred)
    idx = np.arange(x.shape[0])[:, None], np.arange(x.shape[1])[None, :]
    defocus = stack[(lo,) + idx] * (1 - frac if x.ndim == 2 else (1 - frac)[..., None]) + \
        stack[(hi,) + idx] * (frac if x.ndim == 2 else frac[..., None])
    m = near if x.ndim == 2 else near[..., None]
    a = m * x + (1 - m) * defocus
    b = (1 - m) * x + m * defocus
    to8 = lambda v: np.clip(np.rint(v * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(a), to8(b), near, radius


def generate(src: Path, out: Path, seed: int = 0, max_radius: float = 6.0, limit: int | None = None) -> list[dict]:
    """Build a multi-focus set with ground truth from every image in `src`; returns the manifest rows."""
    stems = list_stems(src)[: limit or None]
    if not stems:
        raise ValueError(f"no images in {src}")
    for sub in ("A", "B", "GT"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for stem in stems:
        path = find_image(src, stem)
        img = _read_image(path)
        if img.dtype != np.uint8:  # 16-bit or float sources: the set is 8-bit, as the benchmarks are
            img = np.clip(np.rint(to_float255(img)), 0, 255).astype(np.uint8)
        # Per-image stream derived from the seed and the name: adding images does not change others.
        rng = np.random.default_rng([seed, zlib.crc32(stem.encode())])
        a, b, near, radius = make_pair(img, rng, max_radius)
        for sub, arr in (("A", a), ("B", b), ("GT", img)):
            Image.fromarray(arr).save(out / sub / f"{stem}.png")
        rows.append({"name": stem, "source": str(path), "seed": seed, "blur_radius": f"{radius:.3f}",
                     "near_fraction": f"{float(near.mean()):.3f}"})
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m defusion_jax.mff_synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="folder of sharp images (all-in-focus ground truth)")
    p.add_argument("--out", required=True, type=Path, help="output folder (A/, B/, GT/, manifest.csv)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-radius", type=float, default=6.0, help="largest defocus radius in pixels")
    p.add_argument("--limit", type=int, default=None, help="use at most N images")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        print(f"error: --src {args.src} is not a folder", file=sys.stderr)
        return 2
    if args.max_radius <= 0:
        print("error: --max-radius must be positive", file=sys.stderr)
        return 2
    try:
        rows = generate(args.src, args.out, args.seed, args.max_radius, args.limit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} multi-focus pairs with ground truth to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

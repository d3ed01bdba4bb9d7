"""Fusing real image pairs of any size (the official test protocol), with tiles for very large
images and optional size buckets.

    from defusion_jax.api import load_model
    from defusion_jax.inference import ModelRunner, fuse_arrays
    res = fuse_arrays(ModelRunner(load_model(path)), a, b, task="mef", parts=True)
    res.fused, res.parts["common"], res.parts["unique1"], res.parts["unique2"]

Protocol (official `test.py`, ../shared/notes/reference_impl.md §2.3): reflect-pad 16 px on
every side, then bottom/right further up to a multiple of 16 (the official script skips this
step: its test model was never published), run with position tables for the real grid, crop
back: `np.pad(x, ((16, 16 + eh), (16, 16 + ew), (0, 0)), 'reflect')`, `symmetric` instead when a
pad is not smaller than the side it mirrors (images up to 31 px; `pad_image`). IVF feeds both
images as grey in 3 channels (`grey_like_pil`); MEF and MFF feed RGB.

The network attends globally, so anything that changes the padded canvas changes the output:
- `bucket` pads further (bottom/right, reflect) to a multiple of `bucket` so that a folder of
  mixed sizes compiles once per bucket instead of once per 16-px size; off by default.
- Canvases above `max_pixels` are cut into overlapping tiles of one common size, each run on
  its own, and blended with raised-cosine ramps over the overlaps (a partition of unity, so a
  pixel-wise function is reproduced exactly and tile-to-tile differences fade smoothly).
See docs/fusion.md for measurements of both trade-offs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

BORDER = 16  # the official test script reflect-pads 16 px on every side
TASKS = ("ivf", "mef", "mff")
PARTS = ("common", "unique1", "unique2")
DEFAULT_OVERLAP = 64
# `precision=` values of FusionModel, `fuse`, `evaluate` and `export --precision`: highest (float32
# products, the default, like the PyTorch reference), high/default (XLA's faster passes on GPUs and
# TPUs; no effect on CPU), bfloat16 (bfloat16 operands and float32 sums on every backend,
# `models.vit.bf16_products`)
MATMUL_PRECISIONS = ("highest", "high", "default", "bfloat16")
# Peak memory of one forward pass ~ A*N^2 + B*N + C bytes for N tokens (batch 1), fitted to XLA's
# `memory_analysis()` of the official-size network: on CPU the model writes attention out
# heads-major with post-normalisation (107 B*N^2 + 35 kB*N measured at N = 806 and 2305); other
# backends run `jax.nn.dot_product_attention`, which held 501 B*N^2 at N = 2305 (measured through
# XLA:CPU). Keys: (cpu?, decompose?); `decompose` adds the common/unique heads.
_MEM_COEF = {(True, False): (120.0, 40e3, 96e6), (True, True): (130.0, 60e3, 128e6),
             (False, False): (520.0, 40e3, 96e6), (False, True): (560.0, 60e3, 128e6)}


def _coef(parts: bool) -> tuple[float, float, float]:
    import jax

    return _MEM_COEF[(jax.default_backend() == "cpu", bool(parts))]


# ---- padding ---------------------------------------------------------------------------------
def pad_amounts(h: int, w: int, multiple: int = 16, border: int = BORDER,
                bucket: int = 0) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)): `border` on each side, plus bottom/right up to a multiple
    of `multiple`, or of `bucket` when given (a multiple of `multiple`)."""
    step = bucket or multiple
    if step % multiple:
        raise ValueError(f"bucket must be a multiple of {multiple}, got {bucket}")
    extra_h = (-(h + 2 * border)) % step
    extra_w = (-(w + 2 * border)) % step
    return (border, border + extra_h), (border, border + extra_w)


def pad_image(x: np.ndarray, pads) -> np.ndarray:
    """Reflect padding of an (..., H, W, C) array; `symmetric` on both axes when a pad is not
    smaller than the side it mirrors (reflection, like PyTorch's, needs pad < side)."""
    spec = [(0, 0)] * (x.ndim - 3) + [pads[0], pads[1], (0, 0)]
    h, w = x.shape[-3], x.shape[-2]
    mode = "reflect" if max(pads[0]) < h and max(pads[1]) < w else "symmetric"
    return np.pad(x, spec, mode=mode)


# ---- colour ----------------------------------------------------------------------------------
def to_model_input(x: np.ndarray, task: str) -> np.ndarray:
    """HxW or HxWxC image -> HxWx3 float32 as the official loaders feed it.

    Values: floats in [0, 1], or uint8 / uint16 (divided by 255 / 65535); anything else raises
    (`exported.as_unit_float`, the rule of the API and the exported function).
    IVF: grey in 3 channels (`convert('L').convert('RGB')`); MEF/MFF: RGB as is (grey replicated).
    """
    from defusion_jax.exported import as_unit_float

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x = np.asarray(as_unit_float(np.asarray(x)), np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or not 1 <= x.shape[-1] <= 4:
        hint = ""
        if x.ndim == 3 and x.shape[0] in (1, 3):
            hint = f"; {x.shape} looks like CxHxW: pass x.transpose(1, 2, 0)"
        elif x.ndim == 4:
            hint = "; a batch: pass one image (x[0]), or an NHWC batch to decompose()"
        raise ValueError(f"expected one HxW or HxWxC image with C in 1-4, got shape {x.shape}{hint}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"empty image (shape {x.shape})")
    if x.shape[-1] in (2, 4):
        x = x[..., :-1]
    if task == "ivf" and x.shape[-1] == 3:
        x = grey_like_pil(x)[..., None]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def grey_like_pil(x: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW luma as the official loaders compute it (PIL `convert('L')`).

    Images on the 8-bit grid (every x*255 within 1e-3 of an integer) get PIL's fixed-point
    formula on the integers bit for bit; others 0.299 R + 0.587 G + 0.114 B in float32.
    """
    q = np.rint(x * 255.0)
    if np.abs(q - x * 255.0).max(initial=0.0) < 1e-3:
        q = q.astype(np.int64)  # PIL: L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
        grey = (q[..., 0] * 19595 + q[..., 1] * 38470 + q[..., 2] * 7471 + 0x8000) >> 16
        return grey.astype(np.float32) / np.float32(255)
    return luminance(x)


def luminance(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 image (PIL's 'L'); HxW or HxWx1 pass through."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        return x
    if x.shape[-1] == 1:
        return x[..., 0]
    return x[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32)


def chroma_energy(x: np.ndarray) -> float:
    """Mean |RGB - grey|: 0 for grey images."""
    x = np.asarray(x, np.float32)
    if x.ndim == 2 or x.shape[-1] == 1:
        return 0.0
    return float(np.mean(np.abs(x[..., :3] - luminance(x)[..., None])))


# Full-range BT.601 (JPEG) RGB -> (Y, Cb - 1/2, Cr - 1/2). OpenCV's float YCrCb pair is not an
# exact inverse (round trip off by 1.5e-4, ten 16-bit steps), so the inverse is computed here.
_RGB2YCC = np.array([[0.299, 0.587, 0.114],
                     [-0.168735892, -0.331264108, 0.5],
                     [0.5, -0.418687589, -0.081312411]])
_YCC2RGB = np.linalg.inv(_RGB2YCC)


def recolor(fused: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Colour IVF output: Y from the fused image, Cb and Cr from the visible image (full-range
    BT.601 YCbCr, as JPEG). Inputs in [0,1]; returns HxWx3 in [0,1]."""
    visible = np.asarray(visible, np.float32)
    if visible.ndim == 2 or visible.shape[-1] == 1:
        visible = np.repeat(visible.reshape(*visible.shape[:2], 1), 3, axis=-1)
    ycc = np.clip(visible[..., :3], 0, 1).astype(np.float64) @ _RGB2YCC.T
    ycc[..., 0] = np.clip(luminance(fused), 0, 1)
    return np.clip(ycc @ _YCC2RGB.T, 0.0, 1.0).astype(np.float32)


# ---- heat maps (Fig. 7 / 16 style) -----------------------------------------------------------
def part_magnitude(x: np.ndarray) -> np.ndarray:
    """Per-pixel magnitude of a decomposition image: mean |value| over channels."""
    x = np.asarray(x, np.float32)
    return np.mean(np.abs(x), axis=-1) if x.ndim == 3 else np.abs(x)


def heat_overlay(magnitude: np.ndarray, source: np.ndarray, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """JET colour map of `magnitude / vmax` (red = high) blended over the grey `source`."""
    import cv2

    level = np.clip(np.asarray(magnitude, np.float32) / max(float(vmax), 1e-8), 0, 1)
    heat = cv2.applyColorMap(np.rint(level * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    grey = np.clip(luminance(source), 0, 1)[..., None]
    return np.clip((1 - alpha) * grey + alpha * heat.astype(np.float32) / 255.0, 0, 1)


def heat_maps(parts: Mapping[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Overlays for `common` (on the mean of both sources), `unique1` (on a), `unique2` (on b),
    on one scale (99.5th percentile over all three) so colours compare across maps."""
    mags = {k: part_magnitude(parts[k]) for k in PARTS}
    vmax = float(np.percentile(np.concatenate([m.ravel() for m in mags.values()]), 99.5))
    ga, gb = luminance(a), luminance(b)
    sources = {"common": 0.5 * (ga + gb), "unique1": ga, "unique2": gb}
    return {k: heat_overlay(mags[k], sources[k], vmax) for k in PARTS}


# ---- runners: padded (1, H, W, 3) pairs -> dict of (1, H, W, 3) outputs -------------------------
class ModelRunner:
    """Runs a `FusionModel` (jitted: one compile per input shape, reused for every image of it)."""

    patch = 16
    has_parts = True

    def __init__(self, model, direction: str = "q_view2", precision: str | None = "highest"):
        self.model = model
        self.direction = direction
        self.precision = precision
        self.patch = model.module.patch
        self.shapes: set = set()

    def __call__(self, a: np.ndarray, b: np.ndarray, parts: bool = False) -> dict[str, np.ndarray]:
        self.shapes.add((a.shape, parts))
        if parts:  # precision None inherits the global setting
            out = self.model.decompose(a, b, self.direction, precision=self.precision)
            return {k: np.asarray(out[k]) for k in ("fused",) + PARTS}
        return {"fused": np.asarray(self.model.fuse(a, b, self.direction, precision=self.precision))}

    def describe(self) -> str:
        return f"checkpoint {self.model.meta.get('source', '?')} ({self.direction})"


class ExportedRunner:
    """Runs a function written by `python -m defusion_jax.export` (fused image only)."""

    patch = 16
    has_parts = False

    def __init__(self, fn):
        self.fn = fn
        self.shapes: set = set()

    def __call__(self, a: np.ndarray, b: np.ndarray, parts: bool = False) -> dict[str, np.ndarray]:
        if parts:
            raise ValueError("an exported function gives the fused image only; the decomposition needs a checkpoint")
        self.shapes.add((a.shape, parts))
        return {"fused": np.asarray(self.fn(a, b))}

    def describe(self) -> str:
        return f"exported function {self.fn.directory}"


# ---- memory and tiles ------------------------------------------------------------------------
def estimate_bytes(h: int, w: int, parts: bool = False, patch: int = 16) -> int:
    """Rough peak memory (bytes) of one forward pass on an h x w canvas."""
    n = (h // patch) * (w // patch) + 1
    a, b, c = _coef(parts)
    return int(a * n * n + b * n + c)


def max_pixels_for(limit_bytes: float, parts: bool = False, patch: int = 16) -> int:
    """Largest canvas (pixels) whose `estimate_bytes` fits in `limit_bytes`."""
    a, b, c = _coef(parts)
    room = float(limit_bytes) - c
    if room <= 0:
        return 0
    n = (-b + math.sqrt(b * b + 4 * a * room)) / (2 * a)
    return max(0, int(n) - 1) * patch * patch


def default_memory_limit() -> int:
    """Bytes one forward pass may use: 80 % of an accelerator's allocator limit, or half of
    the machine's RAM on CPU."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            return int(0.8 * stats["bytes_limit"])
    try:
        return int(0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _ceil(x: float, m: int) -> int:
    return int(math.ceil(x / m)) * m


def choose_tile(hc: int, wc: int, max_pixels: int, overlap: int = DEFAULT_OVERLAP,
                multiple: int = 16) -> tuple[int, int]:
    """Tile size (multiples of `multiple`) covering an hc x wc canvas with the fewest tiles of at
    most `max_pixels`, neighbours overlapping by at least `overlap`; squarer tiles break ties."""
    if hc * wc <= max_pixels:
        return hc, wc
    step = overlap + multiple  # tile starts are rounded down to the patch grid
    best = None
    for ny in range(1, hc // multiple + 1):
        th = min(hc, _ceil((hc + (ny - 1) * step) / ny, multiple))
        if ny > 1 and th <= step:
            break
        for nx in range(1, wc // multiple + 1):
            tw = min(wc, _ceil((wc + (nx - 1) * step) / nx, multiple))
            if nx > 1 and tw <= step:
                break
            if th * tw <= max_pixels:
                key = (ny * nx, abs(math.log(th / tw)))
                if best is None or key < best[0]:
                    best = (key, (th, tw))
                break
    if best is None:
        raise ValueError(f"a memory limit of {max_pixels} pixels per pass is too small for tiles "
                         f"overlapping by {overlap} px; raise --memory-limit/--max-pixels or lower --overlap")
    return best[1]


def tile_starts(length: int, tile: int, overlap: int, multiple: int = 16) -> list[int]:
    """Fewest evenly spread tile starts on the patch grid, covering [0, length) with neighbours
    overlapping by at least `overlap`."""
    if tile >= length:
        return [0]
    n = 2
    while True:
        starts = [(i * (length - tile) // (n - 1)) // multiple * multiple for i in range(n)]
        starts[-1] = length - tile
        if all(s1 - s0 <= tile - overlap for s0, s1 in zip(starts, starts[1:])):
            return starts
        n += 1


def ramp_weights(start: int, tile: int, length: int, ramp: int) -> np.ndarray:
    """1-D blending weights of a tile [start, start+tile) on an axis of `length`: raised-cosine
    ramps of `ramp` px on sides that meet another tile, flat 1 on the canvas edges. Strictly
    positive, so every pixel has weight."""
    w = np.ones(tile, np.float64)
    r = min(ramp, tile // 2)
    if r > 0:
        up = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)
        if start > 0:
            w[:r] = up
        if start + tile < length:
            w[tile - r:] = np.minimum(w[tile - r:], up[::-1])
    return w


@dataclass
class TilePlan:
    tile: tuple[int, int]
    ys: list[int]
    xs: list[int]
    overlap: int

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)


def plan_tiles(hc: int, wc: int, max_pixels: int, overlap: int = DEFAULT_OVERLAP, multiple: int = 16) -> TilePlan:
    th, tw = choose_tile(hc, wc, max_pixels, overlap, multiple)
    return TilePlan((th, tw), tile_starts(hc, th, overlap, multiple), tile_starts(wc, tw, overlap, multiple), overlap)


def run_tiled(fn: Callable[[np.ndarray, np.ndarray], Mapping[str, np.ndarray]], a: np.ndarray, b: np.ndarray,
              plan: TilePlan, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Run `fn` on each tile of the (H, W, C) canvases and blend the (h, w, C') outputs."""
    hc, wc = a.shape[:2]
    th, tw = plan.tile
    acc: dict[str, np.ndarray] = {}
    total = np.zeros((hc, wc, 1), np.float64)
    for y in plan.ys:
        wy = ramp_weights(y, th, hc, plan.overlap)
        for x in plan.xs:
            wgt = (wy[:, None] * ramp_weights(x, tw, wc, plan.overlap)[None, :])[..., None]
            out = fn(a[y:y + th, x:x + tw], b[y:y + th, x:x + tw])
            for k, v in out.items():
                if k not in acc:
                    acc[k] = np.zeros((hc, wc, v.shape[-1]), np.float64)
                acc[k][y:y + th, x:x + tw] += wgt * v
            total[y:y + th, x:x + tw] += wgt
            if progress:
                progress(1)
    return {k: (v / total).astype(np.float32) for k, v in acc.items()}


# ---- fusion ----------------------------------------------------------------------------------
@dataclass
class FusionResult:
    fused: np.ndarray  # (H, W, 3) float32, raw prediction (clamp when saving)
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # common / unique1 / unique2, raw
    canvas: tuple[int, int] = (0, 0)  # padded size of one pass (the tile size when tiled)
    tiles: int = 1


def fuse_arrays(runner, a: np.ndarray, b: np.ndarray, task: str = "ivf", *, parts: bool = False,
                bucket: int = 0, max_pixels: int | None = None, overlap: int = DEFAULT_OVERLAP,
                progress: Callable[[TilePlan], Any] | None = None) -> FusionResult:
    """One pair of same-size images in [0,1] (HxW, HxWx1, HxWx3 or HxWx4) -> `FusionResult`.

    Canvases (image + reflect border, up to a multiple of 16) above `max_pixels` are tiled;
    otherwise one pass, on a canvas padded up to `bucket` when given. When tiling, `progress` is
    called with the plan before the first tile and returns a bar (e.g. a `tqdm`): its `update(1)`
    runs after each tile and its `close()` at the end.
    """
    a, b = to_model_input(a, task), to_model_input(b, task)
    if a.shape != b.shape:
        raise ValueError(f"the two images differ in size: {a.shape[0]}x{a.shape[1]} vs {b.shape[0]}x{b.shape[1]} (HxW)")
    h, w = a.shape[:2]
    p = runner.patch

    def run(x, y):
        return {k: v[0] for k, v in runner(x[None], y[None], parts).items()}

    pads = pad_amounts(h, w, p)
    hc, wc = h + sum(pads[0]), w + sum(pads[1])
    if max_pixels is not None and hc * wc > max_pixels:
        plan = plan_tiles(hc, wc, max_pixels, overlap, p)
        bar = progress(plan) if progress else None
        try:
            out = run_tiled(run, pad_image(a, pads), pad_image(b, pads), plan, bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
        canvas, tiles = plan.tile, plan.count
    else:
        if bucket:
            pads = pad_amounts(h, w, p, bucket=bucket)
        out = run(pad_image(a, pads), pad_image(b, pads))
        canvas, tiles = out["fused"].shape[:2], 1
    top, left = pads[0][0], pads[1][0]
    out = {k: np.asarray(v[top:top + h, left:left + w], np.float32) for k, v in out.items()}
    return FusionResult(out.pop("fused"), out, tuple(canvas), tiles)


def fuse_pair(model, a: np.ndarray, b: np.ndarray, task: str = "ivf", direction: str = "q_view2",
              precision: str | None = "highest", **kwargs) -> np.ndarray:
    """One pair of same-size images in [0,1] -> fused HxWx3 float32 clamped to [0,1]
    (`FusionModel.fuse_image`; `precision` as in `FusionModel.decompose`, ignored for a runner,
    which has its own). `kwargs` go to `fuse_arrays` (bucket, max_pixels, overlap, progress)."""
    runner = model if isinstance(model, (ModelRunner, ExportedRunner)) else ModelRunner(model, direction, precision)
    return np.clip(fuse_arrays(runner, a, b, task, **kwargs).fused, 0.0, 1.0)

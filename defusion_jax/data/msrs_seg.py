"""MSRS semantic-segmentation data (IR / visible pairs with 9-class label maps), and a synthetic
stand-in with the same record format for smoke runs and tests.

MSRS layout (github.com/Linfeng-Tang/MSRS; the paper's split is its train/test folders):

    ROOT/train/ir/NAME.png                   infrared, 480x640, grey (replicated to 3 channels)
    ROOT/train/vi/NAME.png                   visible, 480x640, RGB
    ROOT/train/Segmentation_labels/NAME.png  uint8 class ids 0..8, 255 = ignore
    ROOT/test/...                            the same three folders (1083 train / 361 test pairs)

A source's `load(record)` returns {'ir', 'vi': float32 HxWx3 in [0,1], 'label': uint8 HxW}; the
training transform (random rescale, crop, flip, as mmsegmentation's pipeline) runs in the grain
workers through `defusion_jax.data.pipeline.make_stream(transform=...)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
from absl import logging
from PIL import Image

from defusion_jax.data.sources import SKIPPED, DataError, list_images, read_image

CLASS_NAMES = ("unlabelled", "car", "person", "bike", "curve", "car stop", "guardrail", "colour cone", "bump")
# The MSRS palette (MSRS visualize.py / SeAFusion get_palette), RGB, index = class id.
PALETTE = np.array([[0, 0, 0], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 192], [128, 128, 0],
                    [64, 64, 128], [192, 128, 128], [192, 64, 0]], np.uint8)
IGNORE_INDEX = 255
LABEL_DIR = "Segmentation_labels"
FOLDERS = ("ir", "vi", LABEL_DIR)


def layout_help(root: str | os.PathLike, split: str) -> str:
    return (f"MSRS segmentation data not found at {os.path.join(str(root), split)}. Expected the layout of "
            f"github.com/Linfeng-Tang/MSRS: {root}/{{train,test}}/ir/NAME.png, .../vi/NAME.png and "
            f".../{LABEL_DIR}/NAME.png (uint8 class ids 0-8, 255 = ignore; 1083 train and 361 test pairs "
            "of 480x640). Clone or download that repository and pass its folder as --config.data.root, "
            "or run the synthetic smoke config (configs/segment_msrs.py:smoke).")


def read_label(path: str | os.PathLike) -> np.ndarray | None:
    """uint8 HxW class ids, or None (warned, counted) for an unreadable or colour-coded file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16"):
                SKIPPED.skip(str(path), f"label image has mode {img.mode}; expected single-channel class ids "
                                        "(colour-coded labels must be converted to ids first)")
                return None
            arr = np.asarray(img)
    except Exception as e:
        SKIPPED.skip(str(path), f"unreadable label ({type(e).__name__}: {e})")
        return None
    if arr.max(initial=0) > 255:
        SKIPPED.skip(str(path), "label ids above 255")
        return None
    return arr.astype(np.uint8)


SPLITS = ("train", "test")  # the MSRS repository's folders


class MSRSSegSource:
    """Records (name, ir path, vi path, label path) of one MSRS split, sorted by name."""

    def __init__(self, root: str | os.PathLike, split: str = "train", min_size: int = 32):
        self.root, self.split = Path(root), split
        base = self.root / split
        missing = [f for f in FOLDERS if not (base / f).is_dir()]
        if missing:
            raise DataError(layout_help(root, split) + f" (missing: {', '.join(missing)})")
        files = {f: {os.path.relpath(p, base / f): p for p in list_images(base / f)} for f in FOLDERS}
        names = set(files["ir"]) & set(files["vi"]) & set(files[LABEL_DIR])
        orphans = (set(files["ir"]) | set(files["vi"]) | set(files[LABEL_DIR])) - names
        for name in sorted(orphans)[:10]:
            logging.warning("%s: %s is not in all of %s; left out", base, name, "/".join(FOLDERS))
        if len(orphans) > 10:
            logging.warning("%s: %d more files without partners left out", base, len(orphans) - 10)
        if not names:
            raise DataError(layout_help(root, split) + " (no file name is present in all three folders)")
        self.records = [(n, files["ir"][n], files["vi"][n], files[LABEL_DIR][n]) for n in sorted(names)]
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.records[i]

    def name(self, i: int) -> str:
        return os.path.splitext(self.records[i][0])[0]

    def load(self, record) -> dict | None:
        _, ir_path, vi_path, label_path = record
        ir = read_image(ir_path, self.min_size)
        vi = read_image(vi_path, self.min_size) if ir is not None else None
        label = read_label(label_path) if vi is not None else None
        if label is None:
            return None
        if not (ir.shape[:2] == vi.shape[:2] == label.shape):
            SKIPPED.skip(record[0], f"sizes differ (ir {ir.shape[:2]}, vi {vi.shape[:2]}, label {label.shape})")
            return None
        return {"ir": ir, "vi": vi, "label": label}


# ---- synthetic pairs -----------------------------------------------------------------------------
# Classes of the synthetic scenes and where they show: a cool object seen only in the visible image
# (a strongly coloured block), a hot object seen only in infrared, one seen in both, and an
# ignore (255) block of noise. Blocks sit on a 16-pixel grid so that a tiny ViT can learn them fast.
SYN_VI_ONLY, SYN_IR_ONLY, SYN_BOTH = 1, 2, 3


class SyntheticSegSource:
    """`n` deterministic synthetic IR/visible/label triples of `size` (H, W), generated on load."""

    def __init__(self, n: int = 16, size: Sequence[int] = (64, 96), seed: int = 0, cell: int = 16,
                 objects: int = 3, ignore_block: bool = True):
        h, w = int(size[0]), int(size[1])
        if n < 1 or h % cell or w % cell:
            raise DataError(f"synthetic data: need n >= 1 and a size that is a multiple of {cell}, got {n}, {size}")
        self.n, self.size, self.seed, self.cell = int(n), (h, w), int(seed), int(cell)
        self.objects, self.ignore_block = int(objects), bool(ignore_block)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return int(i)

    def name(self, i: int) -> str:
        return f"synthetic_{self.seed}_{i:04d}"

    def load(self, record: int) -> dict:
        return make_synthetic_pair(np.random.default_rng([self.seed, int(record)]), self.size, self.cell,
                                   self.objects, self.ignore_block)


def make_synthetic_pair(rng: np.random.Generator, size, cell: int = 16, objects: int = 3,
                        ignore_block: bool = True) -> dict:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tilt = rng.uniform(-1, 1, 2)
    ir = 0.2 + 0.08 * (tilt[0] * yy / h + tilt[1] * xx / w) + rng.normal(0, 0.02, (h, w))
    vi = np.stack([0.45 + 0.1 * (tilt[1] * yy / h) + 0.05 * c for c in range(3)], -1)
    vi = vi + rng.normal(0, 0.03, (h, w, 3))
    label = np.zeros((h, w), np.uint8)
    gh, gw = h // cell, w // cell
    free = np.ones((gh, gw), bool)
    kinds = [SYN_VI_ONLY, SYN_IR_ONLY, SYN_BOTH][:objects] + ([IGNORE_INDEX] if ignore_block else [])
    for kind in kinds:
        bh, bw = (1, 1) if kind == IGNORE_INDEX else (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
        spots = [(r, c) for r in range(gh - bh + 1) for c in range(gw - bw + 1) if free[r:r + bh, c:c + bw].all()]
        if not spots:
            continue
        r, c = spots[int(rng.integers(len(spots)))]
        free[r:r + bh, c:c + bw] = False
        sl = (slice(r * cell, (r + bh) * cell), slice(c * cell, (c + bw) * cell))
        label[sl] = kind
        if kind == SYN_VI_ONLY:  # saturated colour in the visible image; infrared unchanged
            vi[sl] = rng.permutation([0.9, 0.15, 0.1]) + rng.normal(0, 0.03, (bh * cell, bw * cell, 3))
        elif kind == SYN_IR_ONLY:  # hot in infrared; invisible in the visible image
            ir[sl] = 0.9 + rng.normal(0, 0.03, (bh * cell, bw * cell))
        elif kind == SYN_BOTH:  # dark in the visible image and warm in infrared
            vi[sl] = 0.08 + rng.normal(0, 0.02, (bh * cell, bw * cell, 3))
            ir[sl] = 0.6 + rng.normal(0, 0.03, (bh * cell, bw * cell))
        else:  # an unlabelled region with random content in both
            vi[sl] = rng.uniform(0, 1, (cell, cell, 3))
            ir[sl] = rng.uniform(0, 1, (cell, cell))
    ir = np.repeat(np.clip(ir, 0, 1)[..., None], 3, axis=-1).astype(np.float32)
    return {"ir": ir, "vi": np.clip(vi, 0, 1).astype(np.float32), "label": label}


# ---- sources from config ---------------------------------------------------------------------
def build_seg_source(data_cfg, split: str):
    """The MSRS split `split`, or synthetic pairs when `data_cfg.synthetic` is set (smoke runs).

    Synthetic 'train' and 'test' use different seeds (held-out scenes), unless the config points
    evaluation at 'train'."""
    syn = dict(data_cfg.get("synthetic") or {})
    if split not in SPLITS:  # the real dataset's; the generated stand-in accepts no others
        raise DataError(f"unknown MSRS split {split!r}; expected one of {', '.join(SPLITS)}")
    if syn:
        n = int(syn.get(f"n_{split}", syn.get("n_train", 16)))
        seed = int(syn.get("seed", 0)) + (0 if split == "train" else 1000)
        return SyntheticSegSource(n, tuple(syn.get("size", (64, 96))), seed, int(syn.get("cell", 16)),
                                  int(syn.get("objects", 3)), bool(syn.get("ignore_block", True)))
    root = data_cfg.get("root", "")
    if not root:
        raise DataError(layout_help("<unset>", split) + " (--config.data.root is empty)")
    return MSRSSegSource(os.path.expanduser(str(root)), split, int(data_cfg.get("min_size", 32)))


# ---- transforms ----------------------------------------------------------------------------------
def train_transform(record, rng: np.random.Generator, *, source, crop: Sequence[int], scale=(0.5, 2.0),
                    flip: bool = True):
    """mmseg training pipeline: random rescale by a factor in `scale` (bilinear image, nearest label),
    random crop of `crop` (H, W), horizontal flip, then pad to `crop` (image 0, label 255)."""
    ex = source.load(record)
    if ex is None:
        return None
    h, w = ex["label"].shape
    f = float(rng.uniform(*scale)) if scale[0] != scale[1] else float(scale[0])
    if f != 1.0:
        nh, nw = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
        for k in ("ir", "vi"):
            ex[k] = cv2.resize(ex[k], (nw, nh), interpolation=cv2.INTER_LINEAR)
        ex["label"] = cv2.resize(ex["label"], (nw, nh), interpolation=cv2.INTER_NEAREST)
        h, w = nh, nw
    ch, cw = int(crop[0]), int(crop[1])
    top = int(rng.integers(0, max(h - ch, 0) + 1))
    left = int(rng.integers(0, max(w - cw, 0) + 1))
    do_flip = flip and rng.random() < 0.5
    out = {}
    for k, v in ex.items():
        v = v[top:top + ch, left:left + cw]
        if do_flip:
            v = v[:, ::-1]
        pad = ((0, ch - v.shape[0]), (0, cw - v.shape[1])) + ((0, 0),) * (v.ndim - 2)
        v = np.pad(v, pad, constant_values=IGNORE_INDEX if k == "label" else 0)
        out[k] = np.ascontiguousarray(v)
    return out


def iter_eval_batches(source, batch_size: int, limit: int = 0) -> Iterator[tuple[list[str], dict]]:
    """(names, batch) over the source in order at full resolution; a batch holds consecutive images
    of one size (a size change starts a new batch). Unusable files are skipped."""
    n = len(source) if not limit else min(limit, len(source))
    names, items = [], []
    for i in range(n):
        ex = source.load(source[i])
        if ex is None:
            continue
        if items and (ex["label"].shape != items[0]["label"].shape or len(items) == batch_size):
            yield names, {k: np.stack([it[k] for it in items]) for k in items[0]}
            names, items = [], []
        names.append(source.name(i))
        items.append(ex)
    if items:
        yield names, {k: np.stack([it[k] for it in items]) for k in items[0]}


def colorize(label: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """uint8 RGB picture of a label map; ignored (out-of-palette) pixels white."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[:len(palette)] = palette
    return lut[np.asarray(label, np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.6, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Classes painted over `image` (float [0,1] HxWx3) with `alpha`; class 0 (unlabelled) and
    ignored pixels keep the image. uint8 RGB."""
    img = (np.clip(image, 0, 1) * 255.0).astype(np.float32)
    col = colorize(label, palette).astype(np.float32)
    paint = ((label > 0) & (label < len(palette)))[..., None]
    return np.where(paint, (1 - alpha) * img + alpha * col, img).round().astype(np.uint8)

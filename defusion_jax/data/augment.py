"""Host-side augmentation, as the official DeFusion data code applies it (reference_impl.md 1.2).

Order: torchvision `ColorJitter(brightness=(0.1,1), contrast=(0.1,1), saturation=(0.1,1), hue=0)` on
the full float image (all factors <= 1: it only darkens, flattens or desaturates), then
`RandomResizedCrop(size)` (scale (0.08, 1), ratio (3/4, 4/3), bilinear with antialiasing), then a
horizontal flip with probability 1/2 (the paper's "random flipping"; the DeFusion code has none).
Paired images get the same crop and flip. All randomness comes from the grain element rng.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

GRAY = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision rgb_to_grayscale


def _gray(img: np.ndarray) -> np.ndarray:
    return img @ GRAY


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness=(0.1, 1.0), contrast=(0.1, 1.0),
                 saturation=(0.1, 1.0)) -> np.ndarray:
    """torchvision ColorJitter on a float HxWx3 image in [0,1] (factors drawn, ops in random order)."""
    fb = rng.uniform(*brightness) if brightness else None
    fc = rng.uniform(*contrast) if contrast else None
    fs = rng.uniform(*saturation) if saturation else None
    for op in rng.permutation(3):
        if op == 0 and fb is not None:
            img = np.clip(img * fb, 0.0, 1.0)
        elif op == 1 and fc is not None:
            img = np.clip(fc * img + (1.0 - fc) * _gray(img).mean(), 0.0, 1.0)
        elif op == 2 and fs is not None:
            img = np.clip(fs * img + (1.0 - fs) * _gray(img)[..., None], 0.0, 1.0)
    return img.astype(np.float32)


def random_resized_crop_box(rng: np.random.Generator, h: int, w: int, scale=(0.08, 1.0),
                            ratio=(3.0 / 4.0, 4.0 / 3.0)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, height, width)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def crop_resize(img: np.ndarray, box: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop `box` (top, left, h, w) and resize to `size` (h, w), bilinear with antialiasing (PIL)."""
    top, left, ch, cw = box
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize(
        (size[1], size[0]), Image.BILINEAR, box=(left, top, left + cw, top + ch))) for c in range(img.shape[-1])]
    return np.clip(np.stack(out, axis=-1), 0.0, 1.0).astype(np.float32)


def augment(images: dict, rng: np.random.Generator, size: Sequence[int], scale=(0.08, 1.0),
            ratio=(3.0 / 4.0, 4.0 / 3.0), jitter: bool = True, flip: bool = True) -> dict:
    """Jitter (each image on its own), then one crop and one flip shared by every image in `images`."""
    if jitter:
        images = {k: color_jitter(v, rng) for k, v in images.items()}
    h, w = next(iter(images.values())).shape[:2]
    box = random_resized_crop_box(rng, h, w, scale, ratio)
    do_flip = flip and rng.random() < 0.5
    out = {}
    for k, v in images.items():
        v = crop_resize(v, box, size)
        out[k] = np.ascontiguousarray(v[:, ::-1]) if do_flip else v
    return out

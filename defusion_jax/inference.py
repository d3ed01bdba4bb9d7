"""Fusing real image pairs of any size with a loaded `FusionModel` (official test protocol)."""

from __future__ import annotations

import numpy as np

BORDER = 16  # the official test script reflect-pads 16 px on every side
TASKS = ("ivf", "mef", "mff")


def pad_amounts(h: int, w: int, multiple: int = 16, border: int = BORDER) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)): `border` on each side, plus bottom/right up to `multiple`."""
    extra_h = (-(h + 2 * border)) % multiple
    extra_w = (-(w + 2 * border)) % multiple
    return (border, border + extra_h), (border, border + extra_w)


def pad_image(x: np.ndarray, pads) -> np.ndarray:
    """Reflect padding of an (..., H, W, C) array; falls back to symmetric for tiny images."""
    spec = [(0, 0)] * (x.ndim - 3) + [pads[0], pads[1], (0, 0)]
    h, w = x.shape[-3], x.shape[-2]
    mode = "reflect" if max(pads[0]) < h and max(pads[1]) < w else "symmetric"
    return np.pad(x, spec, mode=mode)


def to_model_input(x: np.ndarray, task: str) -> np.ndarray:
    """HxW or HxWxC float image -> HxWx3 as the official loaders feed it.

    IVF: grey in 3 channels (`convert('L').convert('RGB')`); MEF/MFF: RGB as is.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    x = np.asarray(x, np.float32)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if task == "ivf":
        grey = x @ np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's 'L'
        x = np.repeat(grey[..., None], 3, axis=-1)
    return x


def fuse_pair(model, a: np.ndarray, b: np.ndarray, task: str = "ivf", direction: str = "q_view2") -> np.ndarray:
    """One pair of same-size images in [0,1] -> fused HxWx3 float32 in [0,1]."""
    a, b = to_model_input(a, task), to_model_input(b, task)
    if a.shape != b.shape:
        raise ValueError(f"the two images differ in size: {a.shape[:2]} vs {b.shape[:2]}")
    h, w = a.shape[:2]
    pads = pad_amounts(h, w, model.module.patch)
    fused = model.fuse(pad_image(a, pads)[None], pad_image(b, pads)[None], direction)
    fused = np.asarray(fused[0, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w])
    return np.clip(fused, 0.0, 1.0)

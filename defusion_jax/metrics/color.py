"""Colour conventions: MATLAB `rgb2gray` with rounding (default) or VIFB's per-channel averaging."""
from __future__ import annotations

import numpy as np

from ._filters import matlab_round

# MATLAB rgb2gray coefficients (inverse of the NTSC YIQ matrix, first row).
RGB2GRAY = (0.298936021293776, 0.587043074451121, 0.114020904254103)


def to_float255(img: np.ndarray) -> np.ndarray:
    """uint8 -> float64 as is; uint16 -> float64 rescaled to [0,255] (x/257); float in [0,1] -> x*255."""
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if img.dtype == np.uint16:
        return img.astype(np.float64) / 257.0
    return np.asarray(img, dtype=np.float64) * 255.0


def rgb2gray(img: np.ndarray) -> np.ndarray:
    """MATLAB `rgb2gray`, rounded to the integer class for uint8/uint16 input; returns float64 on [0,255]."""
    if img.ndim == 2:
        return to_float255(img)
    x = img.astype(np.float64)
    y = RGB2GRAY[0] * x[..., 0] + RGB2GRAY[1] * x[..., 1] + RGB2GRAY[2] * x[..., 2]
    if img.dtype == np.uint8:
        return matlab_round(y)
    if img.dtype == np.uint16:
        return matlab_round(y) / 257.0
    return y * 255.0


def channel_triplets(a: np.ndarray, b: np.ndarray, f: np.ndarray, color: str):
    """Yield (a, b, f) 2-D float64 [0,255] planes to score; the metric is the mean over them.

    gray: one grey triplet (MATLAB rgb2gray with rounding). per-channel (VIFB): if F is RGB, one
    triplet per channel, a grey source reused for every channel; if F is grey, all grey.
    """
    if color == "gray" or f.ndim == 2:
        return [(rgb2gray(a), rgb2gray(b), rgb2gray(f))]
    if color != "per-channel":
        raise ValueError(f"unknown colour convention {color!r}")
    out = []
    for k in range(3):
        ak = to_float255(a[..., k]) if a.ndim == 3 else to_float255(a)
        bk = to_float255(b[..., k]) if b.ndim == 3 else to_float255(b)
        out.append((ak, bk, to_float255(f[..., k])))
    return out

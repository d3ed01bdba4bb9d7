"""Colour conventions: MATLAB `rgb2gray` with rounding (default) or VIFB's per-channel averaging."""
from __future__ import annotations

import numpy as np

from ._filters import matlab_round

# MATLAB rgb2gray coefficients (inverse of the NTSC YIQ matrix, first row).
RGB2GRAY = (0.298936021293776, 0.587043074451121, 0.114020904254103)


def as_stored(img: np.ndarray) -> np.ndarray:
    """Bring an array to the reader's contract (uint8, uint16 or float in [0,1]) or raise ValueError.

    Other integer dtypes are taken as 8-bit values (an int64 array of 0..255, say) and must lie in
    [0,255]; bool becomes {0,255}, as the reader does for 1-bit images. Floats must lie in [0,1]: a
    float image in 0..255 would otherwise be scaled by 255 a second time and every metric would be
    silently wrong.
    """
    img = np.asarray(img)
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        return img
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * np.uint8(255)
    if img.dtype.kind in "iu":
        if img.size and (img.min() < 0 or img.max() > 255):
            raise ValueError(f"{img.dtype} image with values in [{img.min()}, {img.max()}]: integer images other "
                             "than uint16 are read as 8-bit and must lie in [0, 255] (pass uint16 for 16-bit data)")
        return img.astype(np.uint8)
    if img.dtype.kind == "f":
        if img.size:
            lo, hi = float(np.min(img)), float(np.max(img))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError("float image with NaN or inf values: floats must be finite and in [0, 1]")
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise ValueError(f"float image with values in [{lo:g}, {hi:g}]: float images must be in [0, 1] "
                                 "(divide 0..255 data by 255, or pass it as uint8)")
        return img
    raise ValueError(f"unsupported image dtype {img.dtype}: use uint8, uint16, bool, integers in [0,255] "
                     "or floats in [0,1]")


def to_float255(img: np.ndarray) -> np.ndarray:
    """uint8 (and other integers in [0,255]) -> float64 as is; uint16 -> x/257; bool -> {0,255}; float in [0,1] -> x*255.

    Anything else (integers outside [0,255], floats outside [0,1], other dtypes) raises ValueError.
    """
    img = as_stored(img)
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    if img.dtype == np.uint16:
        return img.astype(np.float64) / 257.0
    return np.asarray(img, dtype=np.float64) * 255.0


def rgb2gray(img: np.ndarray) -> np.ndarray:
    """MATLAB `rgb2gray`, rounded to the integer class for uint8/uint16 input; returns float64 on [0,255]."""
    img = as_stored(img)
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

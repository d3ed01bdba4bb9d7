"""Classical fusion baselines a user can always run: average, max-absolute, Laplacian pyramid,
Mertens exposure fusion (OpenCV) and a focus-measure multi-focus rule.

Every baseline takes the two source images as read from disk (uint8/uint16, HxW or HxWx3) and
returns a uint8 image (other integers in [0,255] and floats in [0,1] are accepted too, anything
else is a ValueError: `metrics.color.as_stored`). When one source is grey and the other colour (IVF), the grey image is fused
with the luminance (Y of YCrCb) of the colour one and the colour's chroma is kept, the usual IVF
practice; two colour sources are fused per channel.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np
from scipy import ndimage

from defusion_jax.metrics.color import as_stored


def _to01(x: np.ndarray) -> np.ndarray:
    # The metrics' input contract (ValueError for a 0..255 float image, which would otherwise be
    # clipped to white by _to_u8 with no word).
    x = as_stored(x)
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.asarray(x, dtype=np.float32)


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _fuse_planes(a: np.ndarray, b: np.ndarray, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a 2-D fusion rule with the colour handling described in the module docstring."""
    a, b = _to01(a), _to01(b)
    if a.ndim == 2 and b.ndim == 2:
        return _to_u8(rule(a, b))
    if a.ndim == 3 and b.ndim == 3:
        return _to_u8(np.stack([rule(a[..., c], b[..., c]) for c in range(3)], axis=-1))
    grey_first = a.ndim == 2
    grey, colour = (a, b) if grey_first else (b, a)
    ycc = cv2.cvtColor(colour, cv2.COLOR_RGB2YCrCb)
    y = rule(grey, ycc[..., 0]) if grey_first else rule(ycc[..., 0], grey)
    ycc[..., 0] = np.clip(y, 0.0, 1.0)
    return _to_u8(cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB))


def average(a, b) -> np.ndarray:
    """Pixel-wise mean of the two sources."""
    return _fuse_planes(a, b, lambda x, y: (x + y) / 2.0)


def maxabs(a, b) -> np.ndarray:
    """Pixel-wise max-absolute selection (for non-negative intensities: the brighter source)."""
    return _fuse_planes(a, b, lambda x, y: np.where(np.abs(x) >= np.abs(y), x, y))


def _laplacian_rule(levels: int | None = None):
    def rule(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = levels or max(1, min(5, int(np.log2(max(2, min(x.shape)) / 8))))
        gx, gy = [x], [y]
        for _ in range(n):
            gx.append(cv2.pyrDown(gx[-1]))
            gy.append(cv2.pyrDown(gy[-1]))
        out = (gx[-1] + gy[-1]) / 2.0  # base: average
        for k in range(n - 1, -1, -1):
            size = (gx[k].shape[1], gx[k].shape[0])
            lx = gx[k] - cv2.pyrUp(gx[k + 1], dstsize=size)
            ly = gy[k] - cv2.pyrUp(gy[k + 1], dstsize=size)
            out = cv2.pyrUp(out, dstsize=size) + np.where(np.abs(lx) >= np.abs(ly), lx, ly)  # details: max-abs
        return np.clip(out, 0.0, 1.0)

    return rule


def laplacian(a, b) -> np.ndarray:
    """Laplacian-pyramid fusion (Burt & Adelson): max-absolute detail selection, averaged base, up to 5 levels."""
    return _fuse_planes(a, b, _laplacian_rule())


def mertens(a, b) -> np.ndarray:
    """Mertens et al. exposure fusion, OpenCV `createMergeMertens` with default weights."""
    a8, b8 = (_to_u8(_to01(x)) for x in (a, b))
    a8, b8 = (np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x for x in (a8, b8))
    out = cv2.createMergeMertens().process([a8[..., ::-1].copy(), b8[..., ::-1].copy()])
    out = _to_u8(np.clip(out, 0.0, 1.0))[..., ::-1]
    if a.ndim == 2 and b.ndim == 2:
        return out[..., 0].copy()
    return np.ascontiguousarray(out)


def _focus_measure(x: np.ndarray, win: int) -> np.ndarray:
    lap = cv2.Laplacian(x, cv2.CV_32F, ksize=3)
    return cv2.boxFilter(lap * lap, -1, (win, win), borderType=cv2.BORDER_REFLECT)


def focus(a, b) -> np.ndarray:
    """Focus-measure multi-focus fusion: local Laplacian energy decides, majority-filtered decision map, feathered blend."""
    fa, fb = _to01(a), _to01(b)
    ga = fa if fa.ndim == 2 else cv2.cvtColor(fa, cv2.COLOR_RGB2GRAY)
    gb = fb if fb.ndim == 2 else cv2.cvtColor(fb, cv2.COLOR_RGB2GRAY)
    win = max(5, (min(ga.shape) // 64) | 1)
    dm = (_focus_measure(ga, win) >= _focus_measure(gb, win)).astype(np.float32)
    # Small misclassified islands are removed by a majority (box) vote, then the seam is feathered.
    k = max(7, (min(ga.shape) // 24) | 1)
    dm = (cv2.boxFilter(dm, -1, (k, k), borderType=cv2.BORDER_REFLECT) > 0.5).astype(np.float32)
    dm = ndimage.gaussian_filter(dm, sigma=1.5, mode="reflect")
    return _fuse_planes(a, b, lambda x, y: dm * x + (1.0 - dm) * y)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "average": average,
    "maxabs": maxabs,
    "laplacian": laplacian,
    "mertens": mertens,
    "focus": focus,
}


def run_baseline(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fuse one pair with the named baseline (see BASELINES)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"source sizes differ: {a.shape[:2]} vs {b.shape[:2]}")
    return BASELINES[name](a, b)

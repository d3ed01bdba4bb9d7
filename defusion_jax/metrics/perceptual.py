"""Human-perception-inspired metrics from Zheng Liu's toolbox as shipped in VIFB: Q_CB (Chen-Blum) and Q_CV (Chen-Varshney).

Inputs are float64 planes on [0,255]. Both follow MATLAB's frequency-domain filtering exactly,
including the complex results of a non-Hermitian filter grid (we keep the real part at the end).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._filters import filter2_same, matlab_round


def _normalize1(x: np.ndarray) -> np.ndarray:
    """Zheng Liu's `normalize1` for a non-constant (or all-zero) image: min-max to 0..255, rounded."""
    lo, hi = x.min(), x.max()
    if hi == 0 and lo == 0:
        return x.astype(np.float64)
    return matlab_round((x - lo) / (hi - lo) * 255.0)


def _flat_nonzero(*planes) -> bool:
    # MATLAB's normalize1 divides 0 by 0 on a constant non-zero image, so the toolbox result is NaN.
    return any(p.min() == p.max() != 0 for p in planes)


def _freqspace(shape):
    """MATLAB `freqspace([H W], 'meshgrid')`: (u, v) grids in [-1, 1)."""
    h, w = shape
    f1 = (np.arange(w) - np.floor(w / 2)) * (2.0 / w)
    f2 = (np.arange(h) - np.floor(h / 2)) * (2.0 / h)
    return np.meshgrid(f1, f2)


def _freq_filter(x: np.ndarray, transfer: np.ndarray) -> np.ndarray:
    return np.fft.ifft2(np.fft.ifftshift(np.fft.fftshift(np.fft.fft2(x)) * transfer))


def _gauss31_same(x: np.ndarray, sigma: float) -> np.ndarray:
    """`filter2(G, x, 'same')` for Zheng Liu's unnormalised 31x31 `gaussian2d`, applied separably."""
    k = np.arange(-15, 16, dtype=np.float64)
    e = np.exp(-(k * k) / (2 * sigma * sigma))

    def sep(v):
        v = ndimage.correlate1d(v, e, axis=0, mode="constant")
        return ndimage.correlate1d(v, e, axis=1, mode="constant") / (2 * np.pi * sigma * sigma)

    return sep(x.real) + 1j * sep(x.imag) if np.iscomplexobj(x) else sep(x)


def qcb(a, b, f) -> float:
    """Q_CB: Chen & Blum 2009 contrast-preservation metric (Zheng Liu `metricChenBlum.m`, as VIFB `metricsQcb`).

    NaN when any image is flat, as in the toolbox: a constant non-zero image is 0/0 in `normalize1`,
    and an all-zero one makes the local contrast ratio 0/0 everywhere.
    """
    if any(p.min() == p.max() for p in (a, b, f)):
        return float("nan")
    a, b, f = _normalize1(a), _normalize1(b), _normalize1(f)
    h, w = a.shape
    u, v = _freqspace((h, w))
    u, v = (w / 30.0) * u, (h / 30.0) * v
    r = np.sqrt(u * u + v * v)
    sd = np.exp(-(r / 15.3870) ** 2) - 0.7622 * np.exp(-(r / 1.3456) ** 2)

    def contrast_p(img):
        x = _freq_filter(img, sd)
        c = np.abs(_gauss31_same(x, 2.0) / _gauss31_same(x, 4.0) - 1.0)
        return c ** 3 / (c ** 2 + 0.0001)

    c1, c2, cf = contrast_p(a), contrast_p(b), contrast_p(f)
    with np.errstate(divide="ignore", invalid="ignore"):
        q1 = np.where(c1 < cf, c1 / cf, np.where(c1 == cf, 1.0, cf / c1))
        q2 = np.where(c2 < cf, c2 / cf, np.where(c2 == cf, 1.0, cf / c2))
        s = c1 * c1 + c2 * c2
        l1 = np.where(s > 0, c1 * c1 / s, 0.5)
    return float(np.mean(l1 * q1 + (1.0 - l1) * q2))


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    """MATLAB `blkproc` tiling: zero-pad bottom/right to a multiple of `size`, return (nby, nbx, size, size)."""
    h, w = x.shape
    ph, pw = -h % size, -w % size
    xp = np.pad(x, ((0, ph), (0, pw)))
    return xp.reshape(xp.shape[0] // size, size, xp.shape[1] // size, size).swapaxes(1, 2)


def qcv(a, b, f) -> float:
    """Q_CV: Chen & Varshney 2007 (Zheng Liu `metricChen.m`, as VIFB `metricsQcv`; 16x16 regions, alpha=5, Mannos-Sakrison CSF). Lower is better.

    NaN, as in the toolbox, when an image is constant and non-zero (`normalize1` is 0/0) or when
    neither source has any gradient (the saliency weights sum to 0); an all-zero image is kept as is.
    """
    if _flat_nonzero(a, b, f):
        return float("nan")
    a, b, f = _normalize1(a), _normalize1(b), _normalize1(f)
    flt1 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    flt2 = flt1.T.copy()

    def grad_mag(x):
        gx, gy = filter2_same(flt1, x), filter2_same(flt2, x)
        return np.sqrt(gx * gx + gy * gy)

    ws, alpha = 16, 5
    lam1 = (_blocks(grad_mag(a), ws) ** alpha).sum(axis=(2, 3))
    lam2 = (_blocks(grad_mag(b), ws) ** alpha).sum(axis=(2, 3))
    h, w = a.shape
    u, v = _freqspace((h, w))
    u, v = (w / 8.0) * u, (h / 8.0) * v
    r = np.sqrt(u * u + v * v)
    theta_m = 2.6 * (0.0192 + 0.144 * r) * np.exp(-(0.144 * r) ** 1.1)
    d1 = (_blocks(_freq_filter(a - f, theta_m), ws) ** 2).sum(axis=(2, 3)) / (ws * ws)
    d2 = (_blocks(_freq_filter(b - f, theta_m), ws) ** 2).sum(axis=(2, 3)) / (ws * ws)
    den = (lam1 + lam2).sum()
    if den == 0:
        return float("nan")
    return float(np.real((lam1 * d1 + lam2 * d2).sum() / den))

"""Filtering helpers that reproduce MATLAB's `filter2`, `conv2`, `imfilter` and `fspecial` numerically.

The published metric values were produced in MATLAB; where floating-point summation order decides
a tie (Qabf's ``gA == gF`` rule on [0,1] images) we accumulate in MATLAB's order, which reproduces
the published numbers bit for bit.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

EPS = np.finfo(np.float64).eps  # MATLAB `eps`


def gaussian_1d(size: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian whose outer product equals MATLAB `fspecial('gaussian', size, sigma)`."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def fspecial_gaussian(size: int, sigma: float) -> np.ndarray:
    """MATLAB `fspecial('gaussian', size, sigma)` (2-D, sums to 1)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(x, x)
    h = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    h[h < EPS * h.max()] = 0
    return h / h.sum()


def sep_filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """MATLAB `filter2(g*g', x, 'valid')` for a symmetric separable kernel given by its 1-D factor `g`."""
    r = len(g) // 2
    y = ndimage.correlate1d(x, g, axis=0, mode="constant")
    if r:
        y = y[r:-r]
    y = ndimage.correlate1d(y, g, axis=1, mode="constant")
    if r:
        y = y[:, r:-r]
    return y


def box_filter_valid(x: np.ndarray, size: int) -> np.ndarray:
    """MATLAB `filter2(ones(size)/size^2, x, 'valid')`."""
    return sep_filter_valid(x, np.full(size, 1.0 / size))


def filter2_same(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """MATLAB `filter2(w, x, 'same')`: correlation with zero padding (odd-sized kernels)."""
    if w.size > 49:
        # Large kernels (Qcb's 31x31 Gaussians): FFT is far faster; the kernel is flipped to turn
        # convolution into correlation. Works for complex x too. (scipy.signal is slow to import.)
        from scipy import signal

        return signal.fftconvolve(x, w[::-1, ::-1], mode="same")
    if np.iscomplexobj(x):
        return filter2_same(w, x.real) + 1j * filter2_same(w, x.imag)
    return ndimage.correlate(x, w, mode="constant", cval=0.0)


def conv2_same_matlab(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """MATLAB `conv2(x, h, 'same')` for a 3x3 kernel, accumulated in MATLAB's (column-major) order.

    The order matters only for exact ties between two images' gradients on non-integer data; it is
    what makes Tang's [0,1] Qabf reproduce to all digits.
    """
    kh, kw = h.shape
    H, W = x.shape
    ch, cw = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((kh - 1 - ch, ch), (kw - 1 - cw, cw)))
    out = np.zeros((H, W), dtype=np.float64)
    for q in range(kw):
        for p in range(kh):
            if h[p, q] == 0:
                continue
            # conv: out(i,j) += h(p,q) * x(i-p+ch, j-q+cw)
            out = out + h[p, q] * xp[kh - 1 - p: kh - 1 - p + H, kw - 1 - q: kw - 1 - q + W]
    return out


def correlate_reflect(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """3x3 correlation on an image mirror-extended without repeating the edge (Kumar's `per_extn_im_fn`)."""
    return ndimage.correlate(x, h, mode="mirror")


def imfilter_replicate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """MATLAB `imfilter(x, h, 'replicate')` (correlation, edge pixels repeated)."""
    return ndimage.correlate(x, h, mode="nearest")


def downsample2_symmetric(x: np.ndarray) -> np.ndarray:
    """MATLAB `imfilter(x, ones(2)/4, 'symmetric', 'same')` followed by `(1:2:end, 1:2:end)`."""
    xp = np.pad(x, ((0, 1), (0, 1)), mode="symmetric")
    s = (xp[:-1, :-1] + xp[1:, :-1] + xp[:-1, 1:] + xp[1:, 1:]) / 4.0
    return s[::2, ::2]


def matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB `round`: halves away from zero (numpy rounds halves to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)

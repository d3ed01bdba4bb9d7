"""Structural metrics: SSIM (Wang et al. 2004 as in VIFB, and the DeFusion-util variant), MEF-SSIM
(Ma, Zeng, Wang 2015) and pixel-domain VIF (Sheikh & Bovik).

Inputs are float64 planes on [0,255] unless stated otherwise.
"""
from __future__ import annotations

import hashlib

import numpy as np
from scipy import ndimage

from ._filters import EPS, box_filter_valid, downsample2_symmetric, gaussian_1d, sep_filter_valid

_G11 = gaussian_1d(11, 1.5)


def ssim_wang(x: np.ndarray, y: np.ndarray, data_range: float = 255.0) -> float:
    """Wang's SSIM: Gaussian 11x11 sigma 1.5 window, K=(0.01,0.03), 'valid' maps, mean of the map (VIFB `ssim`)."""
    if min(x.shape) < 11:
        return float("nan")  # the 'valid' map is empty
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx = sep_filter_valid(x, _G11)
    my = sep_filter_valid(y, _G11)
    sxx = sep_filter_valid(x * x, _G11) - mx * mx
    syy = sep_filter_valid(y * y, _G11) - my * my
    sxy = sep_filter_valid(x * y, _G11) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(m.mean())


def ssim_uniform7(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """SSIM as scikit-image computes it by default (DeFusion++ `calculate_ssim`): 7x7 uniform window, sample covariance, borders cropped."""
    win, np_ = 7, 49
    if min(x.shape) < win:
        return float("nan")  # nothing left after cropping the borders
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    cov_norm = np_ / (np_ - 1.0)
    ux = ndimage.uniform_filter(x, size=win, mode="reflect")
    uy = ndimage.uniform_filter(y, size=win, mode="reflect")
    uxx = ndimage.uniform_filter(x * x, size=win, mode="reflect")
    uyy = ndimage.uniform_filter(y * y, size=win, mode="reflect")
    uxy = ndimage.uniform_filter(x * y, size=win, mode="reflect")
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


def ssim_sources(a, b, f, variant: str = "default") -> float:
    """SSIM: SSIM(A,F) + SSIM(B,F), Wang/VIFB convention (`metricsSsim.m`); 'mean': half of it; 'skimage': DeFusion-util window."""
    if variant == "skimage":
        s = ssim_uniform7(a / 255.0, f / 255.0, 1.0) + ssim_uniform7(b / 255.0, f / 255.0, 1.0)
    else:
        s = ssim_wang(a, f) + ssim_wang(b, f)
    return s / 2.0 if variant == "mean" else s


# --------------------------------------------------------------------------- MEF-SSIM
_MEF_CACHE: dict = {}


def _mef_source_terms(seq: np.ndarray) -> dict:
    """Everything of single-scale MEF-SSIM that depends on the sources only (cached: several methods share sources)."""
    key = (seq.shape, hashlib.blake2b(seq.tobytes(), digest_size=16).digest())
    if key in _MEF_CACHE:
        return _MEF_CACHE[key]
    nk = seq.shape[0]
    w = 11
    n = float(w * w)
    # Patch statistics with the square (uniform) window.
    mu = np.stack([box_filter_valid(x, w) for x in seq])
    box_xx = {(i, j): box_filter_valid(seq[i] * seq[j], w) for i in range(nk) for j in range(i, nk)}
    sig2 = np.stack([box_xx[(i, i)] - mu[i] * mu[i] for i in range(nk)])
    ed = np.sqrt(np.maximum(n * sig2, 0.0)) + 0.001
    # Structure consistency: ||S - mean(S)|| / sum_k ||x_k - mu_k||, S = sum_k x_k (no +0.001 here).
    denom = np.sqrt(np.maximum(n * sig2, 0.0)).sum(0)
    s_mu = mu.sum(0)
    s_sq = sum(box_xx[(min(i, j), max(i, j))] for i in range(nk) for j in range(nk))
    num = np.sqrt(np.maximum(n * (s_sq - s_mu * s_mu), 0.0))
    r = (num + EPS) / (denom + EPS)
    r = np.where(r > 1, 1 - EPS, r)
    r = np.where(r < 0, EPS, r)
    p = np.minimum(np.tan(np.pi / 2 * r), 10.0)
    wmap = (ed / w) ** p[None] + EPS
    wmap = wmap / wmap.sum(0, keepdims=True)
    max_ed = ed.max(0)
    # Desired structure r = sum_k c_k (x_k - mu_k), c_k = w_k / ed_k, rescaled to norm max_ed:
    # ||r||^2 = n * sum_{k,l} c_k c_l cov_box(x_k, x_l).
    c = wmap / ed
    rnorm2 = np.zeros_like(max_ed)
    for i in range(nk):
        for j in range(nk):
            rnorm2 += c[i] * c[j] * (box_xx[(min(i, j), max(i, j))] - mu[i] * mu[j])
    rnorm = np.sqrt(np.maximum(n * rnorm2, 0.0))
    scale = np.where(rnorm > 0, max_ed / np.where(rnorm > 0, rnorm, 1.0), 1.0)
    a = c * scale[None]  # r = sum_k a_k (x_k - mu_k)
    # Gaussian-weighted moments of r.
    gx = np.stack([sep_filter_valid(x, _G11) for x in seq])
    mu_r = (a * (gx - mu)).sum(0)
    er2 = np.zeros_like(mu_r)
    for i in range(nk):
        for j in range(i, nk):
            gxx = sep_filter_valid(seq[i] * seq[j], _G11)
            t = a[i] * a[j] * (gxx - mu[i] * gx[j] - mu[j] * gx[i] + mu[i] * mu[j])
            er2 += t if i == j else 2 * t
    terms = {"mu": mu, "a": a, "mu_r": mu_r, "sig_r": er2 - mu_r * mu_r}
    if len(_MEF_CACHE) >= 8:
        _MEF_CACHE.pop(next(iter(_MEF_CACHE)))
    _MEF_CACHE[key] = terms
    return terms


def mef_ssim_single(seq: np.ndarray, f: np.ndarray, k: float = 0.03) -> float:
    """Ma et al.'s single-scale MEF-SSIM (`mef_ssim.m`, 11x11 patches, Gaussian sigma 1.5, C=(0.03*255)^2), vectorised."""
    seq = np.ascontiguousarray(seq, dtype=np.float64)  # (K, H, W)
    f = np.asarray(f, dtype=np.float64)
    if min(f.shape) < 11:
        return float("nan")  # no 11x11 patch fits
    t = _mef_source_terms(seq)
    mu, a, mu_r = t["mu"], t["a"], t["mu_r"]
    gf = sep_filter_valid(f, _G11)
    erf = np.zeros_like(mu_r)
    for i in range(seq.shape[0]):
        erf += a[i] * (sep_filter_valid(seq[i] * f, _G11) - mu[i] * gf)
    sig_f = sep_filter_valid(f * f, _G11) - gf * gf
    sig_rf = erf - mu_r * gf
    cc = (k * 255.0) ** 2
    q = (2 * sig_rf + cc) / (t["sig_r"] + sig_f + cc)
    return float(q.mean())


def mef_ssim(seq: np.ndarray, f: np.ndarray, levels: int = 3) -> float:
    """Ma et al.'s multi-scale MEF-SSIM (`mef_ms_ssim.m`): 3 levels, weights [0.0448,0.2856,0.3001] normalised."""
    weights = np.array([0.0448, 0.2856, 0.3001])[:levels]
    weights = weights / weights.sum()
    seq = np.asarray(seq, dtype=np.float64)
    if min(f.shape) / 2 ** (levels - 1) < 11:
        return float("nan")  # MATLAB returns -Inf: image too small for the 11x11 window at the coarsest level
    qs = []
    for lvl in range(levels):
        qs.append(mef_ssim_single(seq, f))
        if lvl < levels - 1:
            seq = np.stack([downsample2_symmetric(x) for x in seq])
            f = downsample2_symmetric(f)
    qs = np.array(qs)
    return float(np.prod(qs ** weights)) if levels > 1 else float(qs[0])


def mef_ssim_metric(a, b, f, variant: str = "default") -> float:
    """MEF-SSIM: Ma et al. 2015 on grey images, multi-scale `mef_ms_ssim` (MEFB); 'single': single-scale `mef_ssim`."""
    seq = np.stack([a, b])
    if variant == "single":
        return mef_ssim_single(seq, f)
    return mef_ssim(seq, f)


# --------------------------------------------------------------------------- VIF
def vifp(ref: np.ndarray, dist: np.ndarray, saturate_uint8: bool = False) -> float:
    """Pixel-domain multi-scale VIF (`vifp_mscale.m`, sigma_nsq=2); `saturate_uint8` mimics uint8 products at scale 1."""
    sigma_nsq = 2.0
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = gaussian_1d(n, n / 5.0)
        if scale > 1:
            ref = sep_filter_valid(ref, g)[::2, ::2]
            dist = sep_filter_valid(dist, g)[::2, ::2]
        if scale == 1 and saturate_uint8:
            mul = lambda u, v: np.minimum(u * v, 255.0)  # noqa: E731  (uint8 .* uint8 saturates in MATLAB)
        else:
            mul = np.multiply
        mu1 = sep_filter_valid(ref, g)
        mu2 = sep_filter_valid(dist, g)
        s1 = sep_filter_valid(mul(ref, ref), g) - mu1 * mu1
        s2 = sep_filter_valid(mul(dist, dist), g) - mu2 * mu2
        s12 = sep_filter_valid(mul(ref, dist), g) - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        gg = s12 / (s1 + 1e-10)
        sv = s2 - gg * s12
        m = s1 < 1e-10
        gg[m] = 0
        sv[m] = s2[m]
        s1[m] = 0
        m = s2 < 1e-10
        gg[m] = 0
        sv[m] = 0
        m = gg < 0
        sv[m] = s2[m]
        gg[m] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.log10(1 + gg * gg * s1 / (sv + sigma_nsq)).sum()
        den += np.log10(1 + s1 / sigma_nsq).sum()
    # den = 0: a flat reference, or an image smaller than the 17x17 scale-1 window (empty maps).
    return float(num / den) if den > 0 else float("nan")


def vif(a, b, f, variant: str = "default") -> float:
    """VIF: VIFp(A,F) + VIFp(B,F), Sheikh-Bovik pixel domain as in Tang's toolbox ([0,255]; 'tang2022': its uint8 saturation bug)."""
    sat = variant == "tang2022"
    return vifp(a, f, sat) + vifp(b, f, sat)

"""Information-theoretic fusion metrics: entropy, cross entropy, mutual information, NCIE.

Inputs are 2-D float64 planes on [0,255] (integer-valued for 8-bit images).
"""
from __future__ import annotations

import numpy as np

from ._filters import matlab_round


def _levels(x: np.ndarray) -> np.ndarray:
    """Integer grey levels 0..255 for histogramming (floor, as MATLAB's index `x+1` on integers)."""
    return np.clip(np.floor(x), 0, 255).astype(np.int64)


def _hist(x: np.ndarray) -> np.ndarray:
    return np.bincount(x.ravel(), minlength=256).astype(np.float64)


def _joint_hist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.bincount((x * 256 + y).ravel(), minlength=65536).astype(np.float64).reshape(256, 256)


def _shannon(counts: np.ndarray, log=np.log2) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * log(p)).sum())


def entropy(a, b, f) -> float:
    """EN: Shannon entropy (bits) of F's 256-bin histogram (MATLAB `entropy`; VIFB `metricsEntropy`)."""
    return _shannon(_hist(_levels(f)))


def cross_entropy(a, b, f) -> float:
    """VIFB `metricsCross_entropy`: mean over sources of KL(P_src || P_F) in bits, bins where both are non-zero."""
    pf = _hist(_levels(f)) / f.size
    out = []
    for s in (a, b):
        ps = _hist(_levels(s)) / s.size
        m = (ps > 0) & (pf > 0)
        out.append(float((ps[m] * np.log2(ps[m] / pf[m])).sum()))
    return (out[0] + out[1]) / 2.0


def _mi_bits(x: np.ndarray, f: np.ndarray, saturate: bool) -> float:
    hx, hf = _shannon(_hist(x)), _shannon(_hist(f))
    if saturate:
        # Tang's Hab.m adds 1 to uint8 images, which saturates: levels 254 and 255 share a bin.
        x, f = np.minimum(x, 254), np.minimum(f, 254)
    return hx + hf - _shannon(_joint_hist(f, x))


def mutual_information(a, b, f, variant: str = "default") -> float:
    """MI: MI(A,F) + MI(B,F) in bits on 256 grey levels (Qu's `MI_evaluation.m`; variant 'tang': Hab.m's uint8 saturation)."""
    la, lb, lf = _levels(a), _levels(b), _levels(f)
    sat = variant == "tang"
    return _mi_bits(la, lf, sat) + _mi_bits(lb, lf, sat)


def _minmax_levels(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros(x.shape, dtype=np.int64)
    return matlab_round((x - lo) / (hi - lo) * 255.0).astype(np.int64)


def mutinf_vifb(a, b, f) -> float:
    """VIFB `metricsMutinf`: MI(VI,F) + MI(IR,F) in nats, each image min-max stretched to 0..255 first."""
    lf = _minmax_levels(f)
    hf = _shannon(_hist(lf), np.log)
    total = 0.0
    for s in (a, b):
        ls = _minmax_levels(s)
        total += _shannon(_hist(ls), np.log) + hf - _shannon(_joint_hist(ls, lf), np.log)
    return total


def _normalize1(x: np.ndarray) -> np.ndarray:
    """Zheng Liu's `normalize1`: min-max to 0..255, rounded; an all-zero image is returned unchanged."""
    lo, hi = x.min(), x.max()
    if hi == 0 and lo == 0:
        return x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return matlab_round((x - lo) / (hi - lo) * 255.0)


def _ncc(x: np.ndarray, y: np.ndarray) -> float:
    """Nonlinear correlation coefficient of Wang et al.: H_x + H_y - H_xy, entropies in bits / log2(256)."""
    h = _joint_hist(x.astype(np.int64), y.astype(np.int64))
    return (_shannon(h.sum(1)) + _shannon(h.sum(0)) - _shannon(h)) / 8.0


def ncie(a, b, f) -> float:
    """NCIE (Q_NCIE): Wang et al.'s nonlinear correlation information entropy, Zheng Liu's `metricWang.m` (as in MEFB)."""
    na, nb, nf = _normalize1(a), _normalize1(b), _normalize1(f)
    if not (np.isfinite(na).all() and np.isfinite(nb).all() and np.isfinite(nf).all()):
        return float("nan")  # constant non-zero image: normalize1 divides by zero, as in MATLAB
    ab, af, bf = _ncc(na, nb), _ncc(na, nf), _ncc(nb, nf)
    r = np.linalg.eigvalsh(np.array([[1.0, ab, af], [ab, 1.0, bf], [af, bf, 1.0]]))
    k = 3.0
    r = np.clip(r, 0.0, None) / k  # 0*log(0) := 0; tiny negative eigenvalues are round-off
    nz = r > 0
    hr = -float((r[nz] * np.log2(r[nz])).sum()) / np.log2(256.0)
    return 1.0 - hr

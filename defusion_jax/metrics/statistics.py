"""Intensity statistics and error measures: SD, CC, SCD, MSE, RMSE and the PSNR variants.

Inputs are float64 planes on [0,255] unless stated otherwise.
"""
from __future__ import annotations

import numpy as np

from ._filters import matlab_round


def standard_deviation(a, b, f, variant: str = "default") -> float:
    """SD: population standard deviation of F (Tang `SD_evaluation.m`; 'tang2022': its uint8 saturating arithmetic)."""
    u = f.mean()
    if variant == "tang2022":
        # The 2022 toolbox passed uint8 F: (F - u) clips at 0 and rounds, the square clips at 255.
        d = np.clip(matlab_round(f - u), 0, 255)
        return float(np.sqrt(np.minimum(d * d, 255.0).sum() / f.size))
    return float(np.sqrt(((f - u) ** 2).sum() / f.size))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def correlation_coefficient(a, b, f) -> float:
    """CC: (r(A,F) + r(B,F)) / 2, Pearson correlations on grey (Tang `CC_evaluation.m`, CDDFuse `Evaluator.CC`)."""
    return (_pearson(a, f) + _pearson(b, f)) / 2.0


def scd(a, b, f) -> float:
    """SCD: corr2(F-B, A) + corr2(F-A, B), Aslantas & Bendes 2015 (`analysis_SCD.m`)."""
    return _pearson(f - b, a) + _pearson(f - a, b)


def _mse(x, y) -> float:
    return float(np.mean((x - y) ** 2))


def mse(a, b, f) -> float:
    """MSE: (mse(A,F) + mse(B,F)) / 2 on images scaled to [0,1] (Tang `MSE_evaluation.m`)."""
    return (_mse(a / 255.0, f / 255.0) + _mse(b / 255.0, f / 255.0)) / 2.0


def psnr_sources(a, b, f, variant: str = "default") -> float:
    """PSNR vs the sources: 10 log10(255^2 / MSE), MSE the mean of the two source MSEs on [0,255]; 'mean': mean of the two PSNRs; 'tang': Tang's 20log10(255/sqrt(MSE_[0,1])) (= default + 48.13 dB); 'cddfuse': peak max(F)."""
    ma, mb = np.float64(_mse(a, f)), np.float64(_mse(b, f))
    with np.errstate(divide="ignore", invalid="ignore"):  # 'cddfuse' on F = A = B = 0 is 0/0: NaN
        if variant == "mean":
            return float((10 * np.log10(255.0 ** 2 / ma) + 10 * np.log10(255.0 ** 2 / mb)) / 2.0)
        m = (ma + mb) / 2.0
        if variant == "tang":
            return float(20 * np.log10(255.0 / np.sqrt(m / 255.0 ** 2)))
        if variant == "cddfuse":
            return float(10 * np.log10(f.max() ** 2 / m))
        return float(10 * np.log10(255.0 ** 2 / m))


def _vifb_mse(x, y) -> float:
    # VIFB's `mse`: sqrt of the sum of squared errors over M*N (not a mean squared error).
    return float(np.sqrt(((x - y) ** 2).sum()) / x.size)


def psnr_vifb(a, b, f) -> float:
    """VIFB `metricsPsnr`: 20 log10(255 / sqrt(MES)), MES = mean over sources of sqrt(SSE)/(MN) (non-standard)."""
    m = (_vifb_mse(a, f) + _vifb_mse(b, f)) / 2.0
    with np.errstate(divide="ignore"):
        return float(20 * np.log10(255.0 / np.sqrt(m)))


def rmse_vifb(a, b, f) -> float:
    """VIFB `metricsRmse`: mean over sources of sqrt(SSE)/(MN) (VIFB's non-standard `mse`)."""
    return (_vifb_mse(a, f) + _vifb_mse(b, f)) / 2.0


def psnr_gt(f: np.ndarray, gt: np.ndarray) -> float:
    """PSNR vs ground truth: 20 log10(1/sqrt(MSE)) over all RGB values in [0,1] (DeFusion++ `calculate_psnr`)."""
    m = float(np.mean((f - gt) ** 2))
    with np.errstate(divide="ignore"):
        return float(20 * np.log10(1.0 / np.sqrt(m)))

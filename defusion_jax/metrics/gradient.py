"""Gradient-based fusion metrics: Q^{AB/F}, Kumar's N^{AB/F}, average gradient, edge intensity, spatial frequency.

Inputs are 2-D float64 planes on [0,255].
"""
from __future__ import annotations

import numpy as np

from ._filters import conv2_same_matlab, correlate_reflect, imfilter_replicate

_H1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)  # y response
_H3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)  # x response


def _qabf_edges(p: np.ndarray):
    sx = conv2_same_matlab(p, _H3)
    sy = conv2_same_matlab(p, _H1)
    g = np.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(zero, np.pi / 2, np.arctan(sy / np.where(zero, 1.0, sx)))
    return g, a


def _qabf_preservation(gx, ax, gf, af):
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    with np.errstate(divide="ignore", invalid="ignore"):
        # Hong's code: ratio of the smaller to the larger strength, but *gF itself* on exact ties.
        g = np.where(gx > gf, gf / np.where(gx > gf, gx, 1.0),
                     np.where(gx == gf, gf, gx / np.where(gf == 0, 1.0, gf)))
    a = 1.0 - np.abs(ax - af) / (np.pi / 2)
    return tg / (1.0 + np.exp(kg * (g - dg))) * ta / (1.0 + np.exp(ka * (a - da)))


def qabf(a, b, f, variant: str = "default") -> float:
    """Q^{AB/F}: Xydeas-Petrovic edge preservation, Hong's code as in VIFB/MEFB/Tang (zero-padded Sobel, [0,255]; 'tang2022': on [0,1])."""
    if variant == "tang2022":
        a, b, f = a / 255.0, b / 255.0, f / 255.0
    ga, aa = _qabf_edges(a)
    gb, ab = _qabf_edges(b)
    gf, af = _qabf_edges(f)
    qa = _qabf_preservation(ga, aa, gf, af)
    qb = _qabf_preservation(gb, ab, gf, af)
    den = (ga + gb).sum()
    return float((qa * ga + qb * gb).sum() / den) if den > 0 else float("nan")


_SOBEL_V = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 8.0
_SOBEL_H = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], dtype=np.float64) / 8.0


def _kumar_edges(x):
    gv = correlate_reflect(x, _SOBEL_V)
    gh = correlate_reflect(x, _SOBEL_H)
    g = np.sqrt(gh * gh + gv * gv)
    both0 = (gv == 0) & (gh == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ang = np.where(both0, 0.0, np.arctan(gv / gh))  # gh == 0 gives atan(+-inf) = +-pi/2, as in MATLAB
    return g, ang


def _kumar_q(gx, ax, gf, af):
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where((gx == 0) | (gf == 0), 0.0,
                     np.where(gx > gf, gf / np.where(gx == 0, 1.0, gx), gx / np.where(gf == 0, 1.0, gf)))
    ang = np.abs(np.abs(ax - af) - np.pi / 2) * 2.0 / np.pi
    qg = 0.9999 / (1.0 + np.exp(-19.0 * (g - 0.5)))
    qa = 0.9995 / (1.0 + np.exp(-22.0 * (ang - 0.5)))
    return np.sqrt(qg * qa)


def nabf(a, b, f, variant: str = "default") -> float:
    """N^{AB/F}: Kumar's modified fusion-artifact measure N_abf^m (`analysis_nabf.m`, F first, [0,255], Td=2, wt_min=0.001)."""
    td, wt_min, lg = 2.0, 0.001, 1.5
    ga, aa = _kumar_edges(a)
    gb, ab = _kumar_edges(b)
    gf, af = _kumar_edges(f)
    qa = _kumar_q(ga, aa, gf, af)
    qb = _kumar_q(gb, ab, gf, af)
    wa = np.where(ga >= td, ga ** lg, wt_min)
    wb = np.where(gb >= td, gb ** lg, wt_min)
    artefact = (gf > ga) & (gf > gb)
    if variant == "petrovic":  # Petrovic's original NABF1 from the same file
        num = np.where(artefact, 2.0 - qa - qb, 0.0) * (wa + wb)
    else:
        num = np.where(artefact, (1.0 - qa) * wa + (1.0 - qb) * wb, 0.0)
    return float(num.sum() / (wa + wb).sum())


def average_gradient(a, b, f) -> float:
    """AG: sum of sqrt((dx^2+dy^2)/2) over (H-1)(W-1), MATLAB `gradient` central differences (VIFB/Tang `AG`)."""
    if min(f.shape) < 2:  # no gradient along a 1-pixel side, and (H-1)(W-1) = 0
        return float("nan")
    gy, gx = np.gradient(f)
    s = np.sqrt((gx * gx + gy * gy) / 2.0)
    return float(s.sum() / ((f.shape[0] - 1) * (f.shape[1] - 1)))


def edge_intensity(a, b, f) -> float:
    """VIFB `metricsEdge_intensity`: mean Sobel magnitude, `imfilter(...,'replicate')`."""
    w = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    gx = imfilter_replicate(f, w)
    gy = imfilter_replicate(f, w.T)
    return float(np.sqrt(gx * gx + gy * gy).mean())


def spatial_frequency(a, b, f, variant: str = "default") -> float:
    """SF: sqrt(RF^2 + CF^2) with RF, CF the RMS of row/column first differences (Tang `SF_evaluation.m`; 'tang2022': on [0,1])."""
    if min(f.shape) < 2:  # no row (or column) differences to average
        return float("nan")
    if variant == "tang2022":
        f = f / 255.0
    rf = np.mean(np.diff(f, axis=0) ** 2)
    cf = np.mean(np.diff(f, axis=1) ** 2)
    return float(np.sqrt(rf + cf))


def spatial_frequency_vifb(f: np.ndarray) -> float:
    """VIFB `metricsSpatial_frequency`: differences summed and divided by H*W (not by the number of differences)."""
    m, n = f.shape
    rf = (np.diff(f, axis=1) ** 2).sum() / (m * n)
    cf = (np.diff(f, axis=0) ** 2).sum() / (m * n)
    return float(np.sqrt(rf + cf))

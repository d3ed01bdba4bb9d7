"""One hand-computed small case per metric (values derived on paper from the formulas)."""
import math

import numpy as np
import pytest

from defusion_jax.metrics import gradient, information, perceptual, statistics, structural
from defusion_jax.metrics import score
from defusion_jax.metrics.registry import METRICS

HALF = np.array([[0.0, 0.0, 255.0, 255.0]] * 4)  # two levels, half each: 1 bit
RAMP = np.tile(np.arange(6, dtype=np.float64), (5, 1))  # f(i, j) = j
ZERO = np.zeros((4, 4))


def test_entropy_two_and_four_levels():
    assert information.entropy(None, None, HALF) == pytest.approx(1.0)
    four = np.array([[0, 1, 2, 3]] * 4, dtype=float)
    assert information.entropy(None, None, four) == pytest.approx(2.0)


def test_cross_entropy_kl_by_hand():
    a = np.array([[0, 0, 1, 1]], dtype=float)  # P_A = (1/2, 1/2)
    f = np.array([[0, 1, 1, 1]], dtype=float)  # P_F = (1/4, 3/4)
    kl = 0.5 * math.log2(0.5 / 0.25) + 0.5 * math.log2(0.5 / 0.75)
    assert information.cross_entropy(a, f, f) == pytest.approx(kl / 2)


def test_mutual_information_one_bit():
    b = np.full_like(HALF, 7.0)  # constant: shares nothing with F
    assert information.mutual_information(HALF, b, HALF) == pytest.approx(1.0)
    assert information.mutinf_vifb(HALF, b, HALF) == pytest.approx(math.log(2))


def test_mi_tang_merges_254_and_255():
    a = np.array([[254.0, 255.0]])
    # Hab.m: uint8 + 1 saturates, so the joint histogram sees one cell; H(A) = H(F) = 1 bit.
    assert information.mutual_information(a, a, a, variant="tang") == pytest.approx(2 * (1 + 1 - 0))
    assert information.mutual_information(a, a, a) == pytest.approx(2 * (1 + 1 - 1))


def test_ncie_closed_form():
    # A = B = F, binary half/half: NCC = (1 + 1 - 1)/8 for every pair.
    c = 1 / 8
    lam = np.array([1 + 2 * c, 1 - c, 1 - c]) / 3
    expected = 1 + float((lam * np.log2(lam)).sum()) / 8
    assert information.ncie(HALF, HALF, HALF) == pytest.approx(expected, rel=1e-12)


def test_qabf_identical_source_gives_hong_tie_constant():
    # F = A, B constant: every edge pixel ties (gA == gF), where Hong's code uses gF itself (>= 1 here).
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (9, 11)).astype(float)
    expected = 0.9994 * 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))
    assert gradient.qabf(a, np.zeros_like(a), a) == pytest.approx(expected, rel=1e-9)


def test_nabf_vertical_step_on_flat_sources():
    f = np.zeros((6, 6))
    f[:, 3:] = 255.0
    # Flat sources: g_A = g_B = 0 -> G = 0, alpha_A = 0; vertical edge -> alpha_F = +-pi/2 -> A = 0.
    q = math.sqrt(0.9999 / (1 + math.exp(19 * 0.5)) * 0.9995 / (1 + math.exp(22 * 0.5)))
    # Columns 2 and 3 carry the edge; all weights are wt_min, so N = (2/6) * (1 - Q).
    assert gradient.nabf(np.zeros((6, 6)), np.zeros((6, 6)), f) == pytest.approx((2 / 6) * (1 - q))


def test_average_gradient_ramp():
    h, w = RAMP.shape
    assert gradient.average_gradient(None, None, RAMP) == pytest.approx(h * w * math.sqrt(0.5) / ((h - 1) * (w - 1)))


def test_edge_intensity_ramp():
    # Interior |Sobel_x| = 8; the replicated border columns see half the step: 4.
    w = RAMP.shape[1]
    assert gradient.edge_intensity(None, None, RAMP) == pytest.approx((8 * (w - 2) + 2 * 4) / w)


def test_spatial_frequency_ramp():
    assert gradient.spatial_frequency(None, None, RAMP) == pytest.approx(1.0)
    assert gradient.spatial_frequency(None, None, RAMP, variant="tang2022") == pytest.approx(1 / 255)
    w = RAMP.shape[1]
    assert gradient.spatial_frequency_vifb(RAMP) == pytest.approx(math.sqrt((w - 1) / w))


def test_sd_and_tang_uint8_bug():
    f = np.array([[0.0, 2.0]])
    assert statistics.standard_deviation(None, None, f) == pytest.approx(1.0)
    # uint8: (0 - 1) saturates to 0, so only one unit deviation counts.
    assert statistics.standard_deviation(None, None, f, variant="tang2022") == pytest.approx(math.sqrt(0.5))
    assert METRICS["Variance"].fn(None, None, f) == pytest.approx(1.0)


def test_cc_and_scd():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (8, 8))
    b = rng.uniform(0, 255, (8, 8))
    assert statistics.correlation_coefficient(a, 255 - a, a) == pytest.approx(0.0, abs=1e-12)
    assert statistics.scd(a, b, a + b) == pytest.approx(2.0)


def test_mse_psnr_variants():
    f = np.full((4, 4), 51.0)
    assert statistics.mse(np.zeros((4, 4)), np.full((4, 4), 255.0), f) == pytest.approx((0.2 ** 2 + 0.8 ** 2) / 2)
    a, b = f + 10, f - 10
    p = 10 * math.log10(255 ** 2 / 100)
    assert statistics.psnr_sources(a, b, f) == pytest.approx(p)
    assert statistics.psnr_sources(a, b, f, variant="mean") == pytest.approx(p)
    assert statistics.psnr_sources(a, b, f, variant="tang") == pytest.approx(p + 20 * math.log10(255))
    assert statistics.psnr_sources(a, b, f, variant="cddfuse") == pytest.approx(10 * math.log10(51 ** 2 / 100))


def test_vifb_psnr_and_rmse_sqrt_sse():
    f = np.zeros((4, 4))
    a = f + 1  # SSE = 16, sqrt = 4, / 16 pixels = 0.25
    assert statistics.rmse_vifb(a, a, f) == pytest.approx(0.25)
    assert statistics.psnr_vifb(a, a, f) == pytest.approx(20 * math.log10(255 / 0.5))


def test_ssim_constant_images():
    c1, c2 = 100.0, 50.0
    x, y = np.full((16, 16), c1), np.full((16, 16), c2)
    k1 = (0.01 * 255) ** 2
    expected = (2 * c1 * c2 + k1) / (c1 ** 2 + c2 ** 2 + k1)
    assert structural.ssim_sources(x, x, y) == pytest.approx(2 * expected)
    assert structural.ssim_sources(x, x, y, variant="mean") == pytest.approx(expected)
    k1u = 0.01 ** 2
    eu = (2 * c1 * c2 / 255 ** 2 + k1u) / ((c1 ** 2 + c2 ** 2) / 255 ** 2 + k1u)
    assert structural.ssim_sources(x, x, y, variant="skimage") == pytest.approx(2 * eu)


def test_mef_ssim_constant_images_is_one():
    # No structure anywhere: sigma terms vanish and q = C / C.
    x = np.full((48, 48), 80.0)
    assert structural.mef_ssim_metric(x, x + 50, x + 20) == pytest.approx(1.0)
    assert structural.mef_ssim_metric(x, x + 50, x + 20, variant="single") == pytest.approx(1.0)


def _mef_ssim_loop(seq, f):
    """Line-by-line port of Ma's mef_ssim.m, for a tiny image."""
    eps = np.finfo(float).eps
    wsize, bd = 11, 5
    x = np.arange(11) - 5.0
    g = np.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * 1.5 ** 2))
    window = (g / g.sum())
    k_, h, w = seq.shape
    qs = []
    for i in range(bd, h - bd):
        for j in range(bd, w - bd):
            blocks = seq[:, i - bd:i + bd + 1, j - bd:j + bd + 1]
            mu = blocks.reshape(k_, -1).mean(1)
            ed = np.array([np.linalg.norm(blocks[k] - mu[k]) for k in range(k_)]) + 0.001
            s = blocks.sum(0)
            num = np.linalg.norm(s - s.mean())
            den = sum(np.linalg.norm(blocks[k] - mu[k]) for k in range(k_))
            r = (num + eps) / (den + eps)
            r = 1 - eps if r > 1 else r
            p = min(math.tan(math.pi / 2 * r), 10)
            wts = (ed / wsize) ** p + eps
            wts /= wts.sum()
            rb = sum(wts[k] * (blocks[k] - mu[k]) / ed[k] for k in range(k_))
            if np.linalg.norm(rb) > 0:
                rb = rb / np.linalg.norm(rb) * ed.max()
            fb = f[i - bd:i + bd + 1, j - bd:j + bd + 1]
            m1, m2 = (window * rb).sum(), (window * fb).sum()
            s1 = (window * (rb - m1) ** 2).sum()
            s2 = (window * (fb - m2) ** 2).sum()
            s12 = (window * (rb - m1) * (fb - m2)).sum()
            c = (0.03 * 255) ** 2
            qs.append((2 * s12 + c) / (s1 + s2 + c))
    return float(np.mean(qs))


def test_mef_ssim_vectorised_equals_loop_port():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (20, 23)).astype(float)
    b = np.clip(a * 0.5 + rng.integers(0, 60, a.shape), 0, 255)
    f = (a + b) / 2 + rng.normal(0, 5, a.shape)
    assert structural.mef_ssim_single(np.stack([a, b]), f) == pytest.approx(_mef_ssim_loop(np.stack([a, b]), f), rel=1e-8)


def test_vif_offset_preserves_information():
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 255, (64, 64))
    assert structural.vifp(a, a + 20.0) == pytest.approx(1.0, rel=1e-9)


def test_qcb_qcv_identical_inputs():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (40, 48)).astype(float)
    assert perceptual.qcb(a, a, a) == pytest.approx(1.0)
    assert perceptual.qcv(a, a, a) == pytest.approx(0.0, abs=1e-9)


def test_gt_metrics():
    gt = np.full((8, 8, 3), 100, np.uint8)
    f = gt + np.uint8(round(0.1 * 255))  # off by 26/255 everywhere
    got = score(gt, gt, f, ["PSNR_gt", "SSIM_gt"], gt=gt)
    assert got["PSNR_gt"] == pytest.approx(-20 * math.log10(26 / 255))
    c1, c2, k = 100 / 255, 126 / 255, 0.01 ** 2
    assert got["SSIM_gt"] == pytest.approx((2 * c1 * c2 + k) / (c1 ** 2 + c2 ** 2 + k))


def test_qcb_qcv_flat_images_are_nan_as_in_the_toolbox(recwarn):
    # Zheng Liu's normalize1 (VIFB metricsQcb/metricsQcv) divides 0 by 0 on a constant non-zero image.
    c = np.full((40, 48), 128, np.uint8)
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, c.shape).astype(np.uint8)
    b = rng.integers(0, 256, c.shape).astype(np.uint8)
    for args in ((c, c, c), (a, b, c), (c, b, a)):
        got = score(*args, ["Qcb", "Qcv"])
        assert math.isnan(got["Qcb"]) and math.isnan(got["Qcv"])
    # An all-zero image is kept by normalize1: Qcb's contrast ratio is still 0/0, Qcv is finite
    # (F = 0 against real sources) unless neither source has a gradient.
    z = np.zeros_like(c)
    assert math.isnan(perceptual.qcb(a, b, z.astype(float)))
    assert math.isfinite(perceptual.qcv(a.astype(float), b.astype(float), z.astype(float)))
    assert math.isnan(perceptual.qcv(z.astype(float), z.astype(float), a.astype(float)))
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]

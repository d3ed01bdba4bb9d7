"""Property tests: ideal values on identical inputs, symmetry in the two sources, colour conventions."""
import math

import numpy as np
import pytest

from defusion_jax.metrics import METRICS, parse_metric, resolve, rgb2gray, score
from defusion_jax.metrics.color import channel_triplets

RNG = np.random.default_rng(0)


def _smooth_image(h=48, w=56, seed=0):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (2, 2, 0))
    x = (x - x.min()) / (x.max() - x.min()) * 255
    return np.round(x).astype(np.uint8)


A, B = _smooth_image(seed=1), _smooth_image(seed=2)
F = ((A.astype(int) + B) // 2).astype(np.uint8)
FUSION = [n for n, m in METRICS.items() if m.kind in ("fusion", "gray")]
IDEAL = {  # metric spec -> value when A = B = F
    "Nabf": 0.0, "SSIM": 2.0, "SSIM:mean": 1.0, "SSIM:skimage": 2.0, "Ssim": 2.0, "CC": 1.0, "MEF_SSIM": 1.0,
    "MEF_SSIM:single": 1.0, "PSNR": math.inf, "Psnr": math.inf, "MSE": 0.0, "Rmse": 0.0, "Cross_entropy": 0.0,
    "VIF": 2.0, "Qcb": 1.0, "Qcv": 0.0,
}


@pytest.mark.parametrize("spec", sorted(IDEAL))
def test_identical_inputs_give_ideal_value(spec):
    got = score(A, A, A, [spec])[spec]
    assert got == pytest.approx(IDEAL[spec], abs=1e-9)


def test_identical_inputs_gt_metrics_ideal():
    got = score(A, B, A, ["PSNR_gt", "SSIM_gt"], gt=A)
    assert got["PSNR_gt"] == math.inf and got["SSIM_gt"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", FUSION)
def test_symmetric_in_sources(name):
    specs = [name if v == "default" else f"{name}:{v}" for v in METRICS[name].variants]
    for color in ("gray", "per-channel"):
        ab = score(A, B, F, specs, color=color)
        ba = score(B, A, F, specs, color=color)
        for s in specs:
            assert ab[s] == pytest.approx(ba[s], rel=1e-9, abs=1e-12), (s, color)


def test_matlab_rgb2gray_rounds():
    px = np.array([[[10, 200, 30]]], np.uint8)
    y = 0.298936021293776 * 10 + 0.587043074451121 * 200 + 0.114020904254103 * 30
    assert rgb2gray(px)[0, 0] == round(y) and rgb2gray(px)[0, 0] != y


def test_per_channel_reuses_grey_source():
    grey = A[..., 0]
    planes = channel_triplets(A, grey, F, "per-channel")
    assert len(planes) == 3 and all(np.array_equal(p[1], grey) for p in planes)
    assert len(channel_triplets(A, grey, F[..., 0], "per-channel")) == 1  # grey F: grey everywhere


def test_sets_and_variants_resolve():
    assert resolve(["vifb"], "ivf")[0] == "Avg_gradient" and len(resolve(["vifb"], "ivf")) == 13
    assert resolve(["ivf"], "ivf") == ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "CC", "PSNR", "MSE"]
    assert "MEF_SSIM" in resolve(["paper"], "mef")
    assert parse_metric("PSNR:tang")[1] == "tang"
    with pytest.raises(ValueError, match="variants"):
        parse_metric("CC:nope")
    with pytest.raises(ValueError, match="unknown metric 'QQ'.*and the sets paper, vifb, ivf, tang2022, all"):
        parse_metric("QQ")
    with pytest.raises(ValueError, match=r"'vifb' is a set of metrics: expand it first with resolve\(\['vifb'\]"):
        parse_metric("vifb")  # score(..., ["vifb"]) said 'unknown metric', listing vifb as known


def test_every_metric_documents_its_convention():
    for name, m in METRICS.items():
        assert m.convention and len(m.convention) > 20, name


def test_integer_dtypes_score_like_uint8_and_floats_like_01():
    ref = score(A, B, F, ["PSNR", "EN", "SSIM"])
    as_int64 = score(A.astype(np.int64), B.astype(np.int32), F.astype(np.int16), ["PSNR", "EN", "SSIM"])
    assert as_int64 == ref  # bit for bit: same values, same rounding in rgb2gray
    # rgb2gray rounds only integer classes, so compare floats per channel (no grey conversion).
    ref = score(A, B, F, ["PSNR", "EN", "SSIM"], color="per-channel")
    as_float = score(A / 255.0, B / 255.0, F / 255.0, ["PSNR", "EN", "SSIM"], color="per-channel")
    for k in ref:
        assert as_float[k] == pytest.approx(ref[k], rel=1e-9), k
    m = np.zeros((16, 16), bool)
    m[:, 8:] = True
    assert score(m, m, m, ["EN"])["EN"] == pytest.approx(1.0)  # bool is {0, 255}: two levels, 1 bit


@pytest.mark.parametrize("bad, message", [
    (F.astype(np.float64), r"must be in \[0, 1\]"),  # a float image in 0..255
    (F.astype(np.int64) * 4, r"must lie in \[0, 255\]"),
    (F.astype(np.int64) - 300, r"must lie in \[0, 255\]"),
    (np.full(F.shape, np.nan), "NaN or inf"),
    (F.astype(np.complex128), "unsupported image dtype"),
])
def test_out_of_range_images_are_refused(bad, message):
    for color in ("gray", "per-channel"):
        with pytest.raises(ValueError, match=message):
            score(A, B, bad, ["PSNR", "EN"], color=color)
    with pytest.raises(ValueError, match=message):
        score(A, B, A, ["PSNR_gt"], gt=bad)


ALL_SPECS = [n if v == "default" else f"{n}:{v}" for n, m in METRICS.items() if m.kind in ("fusion", "gray", "gt")
             for v in m.variants]


def _degenerate_cases():
    rng = np.random.default_rng(7)
    for h in (1, 2, 5, 10, 16, 43):
        a, b = (rng.integers(0, 256, (h, h + 2)).astype(np.uint8) for _ in range(2))
        yield f"random{h}", (a, b, ((a.astype(int) + b) // 2).astype(np.uint8))
        if h == 1:  # a 1-pixel column as well as a row
            yield "random1-column", (a.T, b.T, ((a.astype(int) + b) // 2).astype(np.uint8).T)
    for v in (0, 128):
        c = np.full((20, 20), v, np.uint8)
        yield f"constant{v}", (c, c, c)


@pytest.mark.parametrize("name, imgs", list(_degenerate_cases()))
def test_degenerate_inputs_give_nan_without_runtime_warnings(name, imgs):
    import warnings

    a, b, f = imgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Mean of empty slice" & co. would leak to the user's stderr
        got = score(a, b, f, ALL_SPECS, gt=b)
    h = min(a.shape)
    nan = {k for k, v in got.items() if math.isnan(v)}
    if name.startswith("random"):
        # The documented size limits (docs/metrics.md): the windows no longer fit.
        expect = set()
        if h < 2:  # no differences along a 1-pixel side (a whole evaluation once stopped on AG here)
            expect |= {"AG", "Avg_gradient", "SF", "SF:tang2022"}
        if h < 7:
            expect |= {"SSIM_gt", "SSIM:skimage"}
        if h < 11:
            expect |= {"SSIM", "SSIM:mean", "Ssim", "MEF_SSIM:single"}
        if h < 17:
            expect |= {"VIF", "VIF:tang2022"}
        if h < 44:
            expect.add("MEF_SSIM")
        assert nan == expect, name
    else:
        assert {"SCD", "CC", "Qcb", "VIF"} <= nan


def test_scd_is_nan_for_identical_inputs():
    # corr2(F - B, A) with F = B: a zero image has no correlation.
    assert math.isnan(score(A, A, A, ["SCD"])["SCD"])

"""Classical baselines and the synthetic multi-focus generator."""
import cv2
import numpy as np
import pytest
from PIL import Image

from defusion_jax import baselines
from defusion_jax.mff_synth import disk_kernel, generate, make_pair


def _textured(seed, h=96, w=112):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (0.8, 0.8, 0))
    return np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


IMG = _textured(0)


@pytest.mark.parametrize("name, tol", [("average", 0), ("maxabs", 0), ("laplacian", 1), ("focus", 0), ("mertens", 3)])
def test_identical_inputs_reproduce_the_input(name, tol):
    out = baselines.run_baseline(name, IMG, IMG)
    assert out.dtype == np.uint8 and out.shape == IMG.shape
    assert np.abs(out.astype(int) - IMG).max() <= tol


def test_grey_sources_give_grey_output():
    g = IMG[..., 0]
    for name in baselines.BASELINES:
        assert baselines.run_baseline(name, g, g[::-1].copy()).shape == g.shape, name


def test_grey_and_colour_keep_the_colour_chroma():
    ir = _textured(1)[..., 0]
    out = baselines.average(ir, IMG)
    ycc_in = cv2.cvtColor(IMG, cv2.COLOR_RGB2YCrCb).astype(int)
    ycc_out = cv2.cvtColor(out, cv2.COLOR_RGB2YCrCb).astype(int)
    assert np.abs(ycc_in[..., 1:] - ycc_out[..., 1:]).mean() < 1.0
    expected_y = (ir.astype(float) + ycc_in[..., 0]) / 2
    assert np.abs(ycc_out[..., 0] - expected_y).mean() < 1.0


def test_average_and_maxabs_by_hand():
    a = np.array([[0, 100], [200, 255]], np.uint8)
    b = np.array([[50, 50], [50, 50]], np.uint8)
    assert baselines.average(a, b).tolist() == [[25, 75], [125, 152]]  # 152.5 rounds to even
    assert baselines.maxabs(a, b).tolist() == [[50, 100], [200, 255]]


def test_laplacian_keeps_detail_from_both_sides():
    flat = np.full_like(IMG, 128)
    a, b = IMG.copy(), IMG.copy()
    a[:, 56:] = flat[:, 56:]
    b[:, :56] = flat[:, :56]
    lap = baselines.laplacian(a, b).astype(float)
    avg = baselines.average(a, b).astype(float)
    energy = lambda x: np.abs(np.diff(x, axis=1)).mean()  # noqa: E731
    assert energy(lap) > 1.6 * energy(avg)
    assert np.abs(lap - IMG).mean() < np.abs(avg - IMG).mean()


def test_focus_recovers_synthetic_all_in_focus_better_than_average():
    rng = np.random.default_rng(0)
    a, b, near, _ = make_pair(IMG, rng, max_radius=5)
    err = lambda x: np.mean((x.astype(float) - IMG) ** 2)  # noqa: E731
    assert err(baselines.focus(a, b)) < 0.5 * err(baselines.average(a, b))


def test_bad_calls():
    with pytest.raises(ValueError, match="unknown baseline"):
        baselines.run_baseline("wavelet", IMG, IMG)
    with pytest.raises(ValueError, match="sizes differ"):
        baselines.run_baseline("average", IMG, IMG[:10])


def test_disk_kernel_is_a_normalised_disk():
    k = disk_kernel(3.0)
    assert k.shape == (7, 7) and k.sum() == pytest.approx(1.0) and k[0, 0] == 0 and k[3, 3] == k.max()


def test_mff_synth_pairs_are_complementary_and_seeded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(IMG).save(src / "x.png")
    generate(src, tmp_path / "s0", seed=0)
    generate(src, tmp_path / "s0b", seed=0)
    generate(src, tmp_path / "s1", seed=1)
    read = lambda d, r: np.asarray(Image.open(tmp_path / d / r / "x.png")).astype(int)  # noqa: E731
    assert np.array_equal(read("s0", "A"), read("s0b", "A")) and np.array_equal(read("s0", "B"), read("s0b", "B"))
    assert not np.array_equal(read("s0", "A"), read("s1", "A"))
    assert np.array_equal(read("s0", "GT"), IMG)
    a, b = read("s0", "A"), read("s0", "B")
    da, db = np.abs(a - IMG).mean(-1), np.abs(b - IMG).mean(-1)
    # Where A is sharp, B is blurred and vice versa: the errors rarely coincide.
    assert da.mean() > 2 and db.mean() > 2
    assert ((da < 1) & (db < 1)).mean() < 0.2
    assert (tmp_path / "s0" / "manifest.csv").read_text().startswith("name,source,seed")


def test_mff_synth_cli_errors(tmp_path, capsys):
    from defusion_jax import mff_synth

    assert mff_synth.main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_baselines_refuse_a_float_image_in_0_255():
    """A 0..255 float array (cv2 image .astype(float)) used to be clipped to white silently."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    as_int = baselines.run_baseline("average", a.astype(np.int64), a)
    np.testing.assert_array_equal(as_int, baselines.run_baseline("average", a, a))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        baselines.run_baseline("average", a.astype(np.float64), a)

"""Segmentation data and loss: the MSRS layout, the missing-data message, transforms, synthetic scenes."""

import numpy as np
import pytest
from PIL import Image

import jax
import jax.numpy as jnp

from defusion_jax.data import msrs_seg
from defusion_jax.data.sources import DataError
from defusion_jax.tasks.segment import cross_entropy_ignore


def test_cross_entropy_ignores_pixels():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 2, 3)), jnp.float32)
    labels = jnp.array([[[0, 2], [255, 1]]])
    ce, m = jax.jit(cross_entropy_ignore, static_argnums=2)(logits, labels, 255)
    logp = jax.nn.log_softmax(logits, -1)[0]
    want = -(logp[0, 0, 0] + logp[0, 1, 2] + logp[1, 1, 1]) / 3
    assert float(ce) == pytest.approx(float(want), rel=1e-6)
    assert float(m["seg/valid_frac"]) == 0.75
    ce0, _ = jax.jit(cross_entropy_ignore, static_argnums=2)(logits, jnp.full((1, 2, 2), 255), 255)  # nothing to learn: 0, not NaN
    assert float(ce0) == 0.0
    grads = jax.jit(jax.grad(lambda z: cross_entropy_ignore(z, labels, 255)[0]))(logits)
    assert float(jnp.abs(grads[0, 1, 0]).max()) == 0.0  # the ignored pixel gets no gradient


def _write_msrs(root, names, size=(32, 48)):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for f in msrs_seg.FOLDERS:
            (root / split / f).mkdir(parents=True)
        for n in names:
            Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8), "L").save(root / split / "ir" / f"{n}.png")
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / split / "vi" / f"{n}.png")
            lab = rng.integers(0, 9, size, dtype=np.uint8)
            lab[0, :5] = 255
            Image.fromarray(lab, "L").save(root / split / msrs_seg.LABEL_DIR / f"{n}.png")


def test_msrs_layout_loads(tmp_path):
    _write_msrs(tmp_path, ["00001D", "00002N"])
    (tmp_path / "train" / "vi" / "00003N.png").write_bytes(b"")  # no partners: left out
    src = msrs_seg.MSRSSegSource(tmp_path, "train")
    assert len(src) == 2 and src.name(1) == "00002N"
    ex = src.load(src[0])
    assert ex["ir"].shape == (32, 48, 3) and ex["ir"].dtype == np.float32
    np.testing.assert_array_equal(ex["ir"][..., 0], ex["ir"][..., 2])  # grey IR replicated
    want = np.asarray(Image.open(tmp_path / "train" / msrs_seg.LABEL_DIR / "00001D.png"))
    np.testing.assert_array_equal(ex["label"], want)
    assert ex["label"][0, 0] == 255


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DataError) as e:
        msrs_seg.MSRSSegSource(tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert "Segmentation_labels" in msg and "{train,test}/ir/NAME.png" in msg and "Linfeng-Tang/MSRS" in msg
    (tmp_path / "train" / "ir").mkdir(parents=True)
    with pytest.raises(DataError, match="missing: vi, Segmentation_labels"):
        msrs_seg.MSRSSegSource(tmp_path, "train")


def test_train_transform_keeps_image_and_label_aligned():
    class Src:  # label = a function of the visible image, so misalignment would show
        def load(self, _):
            vi = np.zeros((40, 56, 3), np.float32)
            vi[8:24, 16:40] = 1.0
            return {"ir": vi.copy(), "vi": vi, "label": (vi[..., 0] > 0.5).astype(np.uint8)}

    for seed in range(6):
        out = msrs_seg.train_transform(0, np.random.default_rng(seed), source=Src(), crop=(48, 48),
                                       scale=(0.6, 1.6), flip=True)
        assert out["vi"].shape == (48, 48, 3) and out["label"].shape == (48, 48)
        lab, img = out["label"], out["vi"][..., 0]
        assert set(np.unique(lab)) <= {0, 1, 255}  # nearest-neighbour labels, 255 padding
        inside = lab != 255
        agree = ((img > 0.5) == (lab == 1))[inside].mean()
        assert agree > 0.95, (seed, agree)
        assert (img[~inside] == 0).all()


def test_synthetic_scenes():
    src = msrs_seg.SyntheticSegSource(4, (64, 96), seed=3)
    a, b = src.load(1), src.load(1)
    np.testing.assert_array_equal(a["label"], b["label"])  # deterministic per index
    assert set(np.unique(a["label"])) == {0, 1, 2, 3, 255}
    lab, ir, vi = a["label"], a["ir"][..., 0], a["vi"]
    assert ir[lab == 2].mean() > 0.8 and abs(ir[lab == 1].mean() - ir[lab == 0].mean()) < 0.1  # hot only in IR
    assert vi[lab == 1].max(-1).mean() > 0.75 and vi[lab == 2].std() < 0.1  # coloured only in VI


def test_colour_overlay():
    lab = np.array([[0, 1], [2, 255]], np.uint8)
    col = msrs_seg.colorize(lab)
    np.testing.assert_array_equal(col[0, 1], [64, 0, 128])  # MSRS palette: car
    np.testing.assert_array_equal(col[1, 1], [255, 255, 255])
    img = np.full((2, 2, 3), 0.5, np.float32)
    ov = msrs_seg.overlay(img, lab, alpha=1.0)
    np.testing.assert_array_equal(ov[0, 0], [128, 128, 128])  # unlabelled keeps the image
    np.testing.assert_array_equal(ov[1, 0], [64, 64, 0])  # person

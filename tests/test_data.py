"""Input pipeline: sources, bad files, augmentation, determinism, resume, per-process shares."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defusion_jax.data import augment as aug
from defusion_jax.data import pipeline, sources

SAMPLE = Path(__file__).resolve().parents[1] / "defusion_jax" / "sample_data"


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        _write(tmp_path / "imgs" / f"ok_{i}.png", (rng.random((50 + 7 * i, 60, 3)) * 255).astype(np.uint8))
    _write(tmp_path / "imgs" / "sub" / "grey.png", (rng.random((48, 48)) * 255).astype(np.uint8))
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _write(tmp_path / "imgs" / "tiny.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path / "imgs"


def stream(src, seed=0, batch=4, index=0, count=1, **kw):
    return pipeline.make_stream(src, global_batch=batch, process_index=index, process_count=count, seed=seed,
                                image_size=(32, 32), num_threads=2, prefetch=2, **kw)


def test_bad_and_tiny_images_are_skipped_and_counted(folder, caplog):
    src = sources.ImageFolderSource(folder, min_size=16)
    assert len(src) == 8  # the .txt is not listed
    before = pipeline.skipped_files()
    with caplog.at_level(logging.WARNING):
        it = iter(stream(src))
        batches = [next(it) for _ in range(6)]  # 24 usable images = 4 epochs of the 6 good files
    assert all(b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32 for b in batches)
    assert pipeline.skipped_files() - before >= 2
    text = caplog.text
    assert "broken.jpg" in text and "unreadable" in text
    assert "tiny.png" in text and "too small" in text
    assert text.count("broken.jpg") == 1  # warned once per file, counted every time


def test_stream_is_deterministic_and_resumes_exactly():
    src = sources.ImageFolderSource(SAMPLE)
    a = iter(stream(src, seed=3))
    first = [next(a)["image"] for _ in range(3)]
    state = a.get_state()
    rest = [next(a)["image"] for _ in range(2)]
    b = iter(stream(src, seed=3))
    np.testing.assert_array_equal(next(b)["image"], first[0])
    c = iter(stream(src, seed=3))
    c.set_state(state)
    for want in rest:
        np.testing.assert_array_equal(next(c)["image"], want)
    other = next(iter(stream(src, seed=4)))["image"]
    assert not np.array_equal(other, first[0])


def test_process_shares_form_the_same_global_batch():
    """Process p takes rows p*b..p*b+b-1 of each global batch, with augmentation keyed by the global
    position: the concatenated shares equal the single-process batch for any process count."""
    src = sources.ImageFolderSource(SAMPLE)
    whole = iter(stream(src, batch=4))
    shares = [iter(stream(src, batch=4, index=i, count=2)) for i in range(2)]
    for _ in range(3):
        want = next(whole)["image"]
        got = np.concatenate([next(s)["image"] for s in shares])
        np.testing.assert_array_equal(got, want)


def test_mixed_streams_follow_the_ratio_and_resume():
    single = stream(sources.ImageFolderSource(SAMPLE), seed=0)
    multi = stream(sources.PairedFolderSource(SAMPLE / "ivf"), seed=1, jitter=False)
    mixed = pipeline.mix_streams({"single": single, "multi": multi}, {"single": 0.75, "multi": 0.25})
    it = iter(mixed)
    kinds = ["multi" if "ir" in next(it) else "single" for _ in range(8)]
    assert kinds.count("multi") == 2 and kinds.count("single") == 6
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = iter(mixed)
    again.set_state(state)
    for w in want:
        g = next(again)
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])
    only = pipeline.mix_streams({"single": single, "multi": multi}, {"single": 1.0, "multi": 0.0})
    assert "image" in next(iter(only))


def test_paired_source_matches_names_and_crops_alike(tmp_path, caplog):
    rng = np.random.default_rng(1)
    vis = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    grey = np.asarray(Image.fromarray(vis).convert("L"))
    for name in ("a.png", "b.png"):
        _write(tmp_path / "msrs" / "vi" / name, vis)
        _write(tmp_path / "msrs" / "ir" / name, grey)
    _write(tmp_path / "msrs" / "vi" / "lonely.png", vis)
    with caplog.at_level(logging.WARNING):
        src = sources.PairedFolderSource(tmp_path / "msrs")
    assert len(src) == 2 and "lonely.png" in caplog.text
    batch = next(iter(stream(src, batch=2, jitter=False)))
    assert batch["ir"].shape == batch["vi"].shape == (2, 32, 32, 3)
    # the infrared image is the visible one in grey: the same crop and flip keep them aligned
    grey_of_vis = batch["vi"] @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(batch["ir"][..., 0], grey_of_vis, atol=0.03)


def test_augment_crop_box_and_jitter():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        top, left, ch, cw = aug.random_resized_crop_box(rng, h, w)
        assert 0 <= top and 0 <= left and top + ch <= h and left + cw <= w and ch > 0 and cw > 0
    img = rng.random((30, 40, 3)).astype(np.float32)
    np.testing.assert_allclose(aug.color_jitter(img, rng, (1, 1), (1, 1), (1, 1)), img, atol=1e-6)
    dark = aug.color_jitter(img, np.random.default_rng(5), (0.2, 0.2), None, None)
    np.testing.assert_allclose(dark, img * 0.2, atol=1e-6)
    out = aug.color_jitter(img, rng)
    assert out.min() >= 0 and out.max() <= 1 and out.mean() <= img.mean() + 1e-6


def test_missing_coco_says_how_to_prepare(tmp_path):
    with pytest.raises(sources.DataError, match=r"tfds build coco/2017 --data_dir=.*array_record"):
        sources.build_source({"kind": "tfds", "name": "coco/2017", "data_dir": str(tmp_path)})


def test_bad_source_configs(tmp_path):
    with pytest.raises(sources.DataError, match="not found"):
        sources.build_source({"kind": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(sources.DataError, match="ir/ and vi/"):
        sources.build_source({"kind": "paired", "path": str(tmp_path)})
    with pytest.raises(sources.DataError, match="unknown data kind"):
        sources.build_source({"kind": "lmdb"})

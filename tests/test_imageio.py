"""Image reading/writing: formats, bit depths, channels, alpha, EXIF orientation, atomic writes."""

import io

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from defusion_jax import imageio
from defusion_jax.imageio import ImageReadError, read_image, write_image

RNG = np.random.default_rng(0)


def _u16(shape):
    # values with non-zero low bytes, so an 8-bit reduction cannot pass
    return (RNG.integers(0, 65536, size=shape) | 0x0101).astype(np.uint16)


def test_dev_images_keep_grey_and_colour(shared_dir):
    ir = read_image(shared_dir / "data/ivf/MSRS/ir/00004N.png")
    vi = read_image(shared_dir / "data/ivf/MSRS/vi/00004N.png")
    assert ir.pixels.shape == (480, 640, 1) and vi.pixels.shape == (480, 640, 3)
    assert ir.bit_depth == vi.bit_depth == 8 and ir.pixels.dtype == np.float32
    ref = np.asarray(Image.open(shared_dir / "data/ivf/MSRS/vi/00004N.png"), np.float32) / 255
    np.testing.assert_array_equal(vi.pixels, ref)
    # upper-case suffix (Night.JPG) reads too
    assert read_image(shared_dir / "data/mef/MEFB/over/Night.JPG").pixels.shape == (600, 800, 3)


@pytest.mark.parametrize("suffix,depth", [(".png", 8), (".png", 16), (".tif", 8), (".tif", 16), (".tif", 32),
                                          (".bmp", 8), (".npy", 32)])
@pytest.mark.parametrize("channels", [1, 3])
def test_write_read_round_trip(tmp_path, suffix, depth, channels):
    x = RNG.random((23, 37, channels)).astype(np.float32)
    path = write_image(tmp_path / f"x{suffix}", x, depth)
    got = read_image(path)
    assert got.bit_depth == depth and got.pixels.shape == x.shape and got.notes == ()
    tol = {8: 0.5 / 255, 16: 0.5 / 65535, 32: 0.0}[depth]
    assert np.abs(got.pixels - x).max() <= tol + 1e-7
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_jpeg_write_is_8_bit_and_close(tmp_path):
    x = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (48, 1))[..., None] * np.ones(3, np.float32)
    got = read_image(write_image(tmp_path / "x.jpg", x, 8))
    assert got.bit_depth == 8 and got.pixels.shape == (48, 64, 3)
    assert np.abs(got.pixels - x).mean() < 0.01
    with pytest.raises(ValueError, match="16-bit"):
        write_image(tmp_path / "y.jpg", x, 16)


def test_16_bit_tiff_and_png_from_other_writers(tmp_path):
    rgb, grey = _u16((19, 29, 3)), _u16((19, 29))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(tmp_path / "grey.tiff", grey, photometric="minisblack")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])  # OpenCV writes BGR
    Image.fromarray(grey.astype(np.uint16)).save(tmp_path / "grey.png")  # Pillow I;16
    for name, ref in [("rgb.tif", rgb), ("grey.tiff", grey[..., None]), ("planar.tif", rgb),
                      ("rgb.png", rgb), ("grey.png", grey[..., None])]:
        got = read_image(tmp_path / name)
        assert got.bit_depth == 16, name
        np.testing.assert_array_equal(np.rint(got.pixels * 65535).astype(np.uint16), ref, err_msg=name)


def test_alpha_dropped_with_note(tmp_path):
    rgba = RNG.integers(0, 256, (11, 13, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :2], "LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "rgba16.tif", _u16((11, 13, 4)), photometric="rgb", extrasamples=[2])
    pal = Image.fromarray(rgba[..., 0]).convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    np.save(tmp_path / "rgba.npy", rgba.astype(np.float32) / 255)
    for name, ch in [("rgba.png", 3), ("la.png", 1), ("rgba16.tif", 3), ("pal.png", 3), ("rgba.npy", 3)]:
        got = read_image(tmp_path / name)
        assert got.pixels.shape == (11, 13, ch), name
        assert "alpha channel dropped" in got.notes, name
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png").pixels, rgba[..., :3] / np.float32(255))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    stored = RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION] = orientation
    Image.fromarray(stored).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as im:
        shown = np.asarray(ImageOps.exif_transpose(im))
    got = read_image(tmp_path / "o.png")
    np.testing.assert_array_equal(np.rint(got.pixels * 255).astype(np.uint8), shown)
    assert (orientation != 1) == any("orientation" in n for n in got.notes)
    if orientation in (5, 6, 7, 8):
        assert got.pixels.shape[:2] == (10, 6)


def test_exif_orientation_jpeg_and_tiff(tmp_path):
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8] = 255  # left half white
    exif = Image.Exif()
    exif[imageio.EXIF_ORIENTATION] = 6  # shown rotated 90 degrees clockwise: white on top
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif, quality=100)
    got = read_image(tmp_path / "o.jpg").pixels
    assert got.shape == (16, 8, 3) and got[:8].mean() > 0.9 and got[8:].mean() < 0.1
    tifffile.imwrite(tmp_path / "o.tif", (stored.astype(np.uint16) * 257), photometric="rgb",
                     extratags=[(274, "H", 1, 6, True)])
    got = read_image(tmp_path / "o.tif")
    assert got.bit_depth == 16 and got.pixels.shape == (16, 8, 3) and got.pixels[:8].min() == 1.0


def test_npy_floats_kept_exactly(tmp_path):
    x = RNG.normal(0.5, 0.5, (9, 7, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    got = read_image(tmp_path / "x.npy")
    assert got.bit_depth == 32 and np.array_equal(got.pixels, x)
    assert any("outside [0, 1]" in n for n in got.notes)
    np.save(tmp_path / "u.npy", np.array([[0, 65535]], np.uint16))
    got = read_image(tmp_path / "u.npy")
    assert got.bit_depth == 16 and got.pixels[0, :, 0].tolist() == [0.0, 1.0]
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ImageReadError, match="bad.npy.*shape"):
        read_image(tmp_path / "bad.npy")


def test_bad_files_raise_one_line(tmp_path):
    good = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[:200])
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {"trunc.png": "cannot decode", "junk.jpg": "cannot decode", "junk.tif": "cannot decode",
             "x.gif": "unsupported file type", "missing.png": "no such file", "empty.png": "cannot decode"}
    for name, msg in cases.items():
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        assert msg in str(e.value) and name in str(e.value) and "\n" not in str(e.value), name


def test_atomic_write_leaves_old_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    write_image(target, np.zeros((4, 4, 3), np.float32))
    before = target.read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupt in the middle of encoding

    monkeypatch.setattr(cv2, "imencode", boom)
    with pytest.raises(KeyboardInterrupt):
        write_image(target, np.ones((4, 4, 3), np.float32))
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "new.png", np.ones((4, 4, 3), np.float32))
    assert target.read_bytes() == before and not (tmp_path / "new.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / f".a{imageio.TEMP_MARK}x1.png").write_bytes(b"partial")
    (tmp_path / ".hidden_but_mine.png").write_bytes(b"keep")
    (tmp_path / "a.png").write_bytes(b"keep")
    gone = imageio.remove_stale_temporaries(tmp_path)
    assert [p.name for p in gone] == [f".a{imageio.TEMP_MARK}x1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_but_mine.png", "a.png"]


def test_output_permissions_follow_umask(tmp_path):
    path = write_image(tmp_path / "p.png", np.zeros((2, 2), np.float32))
    mask = imageio._umask()
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_non_finite_floats_are_read_errors_and_never_quantized(tmp_path):
    x = RNG.random((6, 5, 3)).astype(np.float32)
    for bad, name in ((np.nan, "nan.tif"), (np.inf, "inf.npy"), (-np.inf, "ninf.tiff")):
        y = x.copy()
        y[2, 3, 1] = bad
        tifffile.imwrite(tmp_path / name, y, photometric="rgb") if name.endswith(("tif", "tiff")) \
            else np.save(tmp_path / name, y)
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        msg = str(e.value)
        assert name in msg and "1 of 90 float samples are NaN or infinite" in msg and "\n" not in msg
    y = x.copy()
    y[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        imageio.quantize(y, 8)  # the cast used to make it 0 (black) with a RuntimeWarning
    with pytest.raises(ValueError, match="NaN"):
        write_image(tmp_path / "o.png", y, 16)
    assert not (tmp_path / "o.png").exists()
    np.testing.assert_array_equal(imageio.quantize(np.float32([-0.5, 0.5, 2.0]), 8), [0, 128, 255])


def test_big_endian_16_bit_is_uint16(tmp_path):
    """'>u2' samples (big-endian TIFFs, Pillow's I;16B, .npy) are 16-bit like any other."""
    from defusion_jax.exported import as_unit_float

    x = (np.arange(12 * 10, dtype=np.uint16) * 541).reshape(12, 10)
    tifffile.imwrite(tmp_path / "be.tif", x, byteorder=">")
    np.save(tmp_path / "be.npy", x.astype(">u2"))
    for name in ("be.tif", "be.npy"):
        img = read_image(tmp_path / name)
        assert img.bit_depth == 16
        np.testing.assert_array_equal(img.pixels[..., 0], x / np.float32(65535))
    with Image.open(tmp_path / "be.tif") as im:  # what a user passes to the API as is
        arr = np.asarray(im)
    assert arr.dtype.byteorder == ">" or not arr.dtype.isnative
    np.testing.assert_array_equal(as_unit_float(arr), x / np.float32(65535))


def test_metrics_reader_decodes_like_fuse(tmp_path):
    """evaluate scores what `fuse` reads: 16-bit colour stays 16-bit, planar TIFFs are whole,
    float images are kept in [0, 1] and refused outside it, not rescaled by a guess."""
    from defusion_jax.metrics.io import _read_image

    rng = np.random.default_rng(3)
    rgb16 = rng.integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb16, -1, 0), photometric="rgb", planarconfig="separate")
    for name in ("c16.png", "planar.tif"):
        got = _read_image(tmp_path / name)
        assert got.dtype == np.uint16, name
        np.testing.assert_array_equal(got, rgb16, err_msg=name)
    grey = rng.random((9, 11)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", grey)
    np.testing.assert_array_equal(_read_image(tmp_path / "f.tif"), grey)
    grey[0, 0] = 1.002  # an unclipped network output
    tifffile.imwrite(tmp_path / "over.tif", grey)
    with pytest.raises(ValueError, match=r"over\.tif: float image with values in \[.*1\.002\]"):
        _read_image(tmp_path / "over.tif")

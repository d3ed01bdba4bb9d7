"""Fusing real pairs: padding protocol, colour, tiles, buckets, the folder CLI and its bad inputs.

Most CLI behaviour runs with `StubRunner` (pixel-wise mean, no compile); the official-size network
(random-weight fixture) runs on odd-sized 93x95 crops of dev pairs, all on one 128x128 canvas so
that they share one compiled function.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from defusion_jax import fuse, imageio, inference
from defusion_jax.inference import fuse_arrays, pad_amounts

RNG = np.random.default_rng(1)
FIXTURE_FILE = "ucmimnet_state_dict.safetensors"
CROP = (93, 95)  # -> 128x128 canvas (16 px reflect border on each side, then up to 16)


class StubRunner:
    """fused = (a+b)/2 and a pixel-wise decomposition; records the canvases it was given."""

    patch = 16
    has_parts = True

    def __init__(self, fail_on_call=None):
        self.shapes, self.inputs, self.fail_on_call = set(), [], fail_on_call

    def __call__(self, a, b, parts=False):
        assert a.shape == b.shape and a.shape[1] % 16 == 0 and a.shape[2] % 16 == 0 and a.shape[-1] == 3
        if self.fail_on_call is not None and len(self.inputs) == self.fail_on_call:
            raise KeyboardInterrupt
        self.inputs.append((a.copy(), b.copy()))
        self.shapes.add((a.shape, parts))
        out = {"fused": 0.5 * (a + b)}
        if parts:
            c = np.minimum(a, b)
            out.update(common=c, unique1=a - c, unique2=b - c)
        return out


def _run(argv, runner=None):
    return fuse.run(fuse.build_parser().parse_args([str(x) for x in argv]), runner=runner)


def _args(model="stub", **kw):
    out = ["--model", model]
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [v])
    return out


# ---- protocol --------------------------------------------------------------------------------
def test_odd_size_padding_protocol():
    a, b = RNG.random((333, 517, 3), np.float32), RNG.random((333, 517, 3), np.float32)
    assert pad_amounts(333, 517) == ((16, 16 + 3), (16, 16 + 11))
    r = StubRunner()
    res = fuse_arrays(r, a, b, "mef")
    (pa, _), = r.inputs
    assert pa.shape == (1, 368, 560, 3) and res.canvas == (368, 560) and res.tiles == 1
    np.testing.assert_array_equal(pa[0], np.pad(a, ((16, 19), (16, 27), (0, 0)), mode="reflect"))
    np.testing.assert_allclose(res.fused, 0.5 * (a + b), atol=1e-7)


def test_bucket_pads_further_and_crops_back():
    a, b = RNG.random((100, 150, 3), np.float32), RNG.random((100, 150, 3), np.float32)
    r = StubRunner()
    for bucket, canvas in [(0, (144, 192)), (64, (192, 192)), (128, (256, 256))]:
        res = fuse_arrays(r, a, b, "mff", bucket=bucket)
        assert res.canvas == canvas
        np.testing.assert_allclose(res.fused, 0.5 * (a + b), atol=1e-7)
    with pytest.raises(ValueError, match="multiple of 16"):
        pad_amounts(10, 10, bucket=40)


def test_ivf_feeds_grey_mef_feeds_rgb_and_grey_rgb_mixes():
    ir, vi = RNG.random((40, 50, 1), np.float32), RNG.random((40, 50, 3), np.float32)
    r = StubRunner()
    fuse_arrays(r, ir, vi, "ivf")
    pa, pb = r.inputs[-1]
    luma = vi @ np.float32([0.299, 0.587, 0.114])  # 16-bit/float sources: exact 601 weights
    np.testing.assert_allclose(pb[0, 16:56, 16:66], np.repeat(luma[..., None], 3, -1), atol=1e-6)
    np.testing.assert_array_equal(pa[0, 16:56, 16:66], np.repeat(ir, 3, -1))
    fuse_arrays(r, ir, vi, "mef")
    np.testing.assert_array_equal(r.inputs[-1][1][0, 16:56, 16:66], vi)  # colour kept
    with pytest.raises(ValueError, match="differ in size"):
        fuse_arrays(r, ir, vi[:-1], "ivf")


def test_ivf_grey_of_8_bit_images_is_pils_convert_l():
    rgb = RNG.integers(0, 256, (37, 41, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb).convert("L").convert("RGB"), np.float32) / 255
    np.testing.assert_array_equal(inference.to_model_input(rgb / np.float32(255), "ivf"), want)


def test_recolor_takes_luma_from_fused_and_chroma_from_visible():
    import cv2  # an independent YCbCr implementation

    vi = RNG.random((20, 30, 3), np.float32) * 0.6 + 0.2
    np.testing.assert_allclose(inference.recolor(vi, vi), vi, atol=1e-6)  # fused == visible: identity
    grey = np.repeat(RNG.random((20, 30, 1), np.float32) * 0.5 + 0.25, 3, -1)
    out = inference.recolor(grey, vi)
    y_out, y_vi = cv2.cvtColor(out, cv2.COLOR_RGB2YCrCb), cv2.cvtColor(vi, cv2.COLOR_RGB2YCrCb)
    inside = (out > 1e-6).all(-1) & (out < 1 - 1e-6).all(-1)  # where no channel was clipped
    assert inside.mean() > 0.9
    np.testing.assert_allclose(y_out[inside][:, 0], grey[inside][:, 0], atol=3e-4)
    np.testing.assert_allclose(y_out[inside][:, 1:], y_vi[inside][:, 1:], atol=3e-4)
    np.testing.assert_allclose(inference.recolor(grey, vi[..., :1]), np.repeat(grey[..., :1], 3, -1), atol=1e-6)


# ---- tiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("hc,wc,max_pixels,overlap", [(368, 560, 200 * 208, 64), (1232, 848, 512 * 512, 64),
                                                       (128, 2000, 128 * 400, 32), (4096, 4096, 1024 * 1024, 128)])
def test_tile_plan_covers_canvas_with_overlaps(hc, wc, max_pixels, overlap):
    plan = inference.plan_tiles(hc, wc, max_pixels, overlap)
    th, tw = plan.tile
    assert th * tw <= max_pixels and th % 16 == 0 and tw % 16 == 0
    for starts, t, length in ((plan.ys, th, hc), (plan.xs, tw, wc)):
        assert starts[0] == 0 and starts[-1] + t == length and all(s % 16 == 0 for s in starts)
        assert all(0 < s1 - s0 <= t - overlap for s0, s1 in zip(starts, starts[1:]))


def test_blending_is_exact_for_pixelwise_functions():
    """The weights are a partition of unity: tiling an identity-like function changes nothing."""
    a, b = RNG.random((300, 410, 3), np.float32), RNG.random((300, 410, 3), np.float32)
    r = StubRunner()
    res = fuse_arrays(r, a, b, "mff", parts=True, max_pixels=160 * 208, overlap=48)
    assert res.tiles > 4 and len({s for s, _ in r.shapes}) == 1  # one tile shape, one compile
    np.testing.assert_allclose(res.fused, 0.5 * (a + b), atol=2e-6)
    np.testing.assert_allclose(res.parts["common"], np.minimum(a, b), atol=2e-6)


def test_blending_has_no_seams_between_disagreeing_tiles():
    """Each tile answers a different constant: the blend must ramp smoothly across the overlaps
    (a hard cut would step by the full difference)."""
    offsets = iter(RNG.permutation(np.linspace(0, 1, 64)))
    plan = inference.plan_tiles(400, 400, 160 * 160, 64)
    out = inference.run_tiled(lambda x, y: {"fused": np.full(x.shape[:2] + (1,), next(offsets))},
                              np.zeros((400, 400, 3)), np.zeros((400, 400, 3)), plan)["fused"][..., 0]
    step = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    # a raised cosine over r px rises at most pi/(2r) per px, times the largest difference (1)
    assert step <= np.pi / (2 * 64) * 1.05, step
    assert out.min() >= 0 and out.max() <= 1


# ---- folder CLI (stub runner) ----------------------------------------------------------------
def _img(shape, kind="u8"):
    x = RNG.random(shape)
    return (x * 255).astype(np.uint8) if kind == "u8" else (x * 65535).astype(np.uint16)


@pytest.fixture()
def folders(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    Image.fromarray(_img((40, 52))).save(a / "grey_rgb.png")  # grey + RGB mix
    Image.fromarray(_img((40, 52, 3))).save(b / "grey_rgb.jpg")
    tifffile.imwrite(a / "deep.tif", _img((33, 47, 3), "u16"), photometric="rgb")  # 16-bit TIFF
    tifffile.imwrite(b / "deep.tif", _img((33, 47), "u16"))
    Image.fromarray(_img((30, 31, 4)), "RGBA").save(a / "alpha.png")  # RGBA
    Image.fromarray(_img((30, 31, 3))).save(b / "alpha.bmp")
    Image.fromarray(_img((33, 51, 3))).save(a / "odd.png")
    Image.fromarray(_img((33, 51, 3))).save(b / "odd.png")
    Image.fromarray(_img((20, 20, 3))).save(a / "mismatch.png")
    Image.fromarray(_img((21, 20, 3))).save(b / "mismatch.png")
    (a / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.fromarray(_img((20, 20, 3))).save(b / "corrupt.png")
    Image.fromarray(_img((20, 20, 3))).save(a / "only_a.png")
    Image.fromarray(_img((20, 20, 3))).save(b / "only_b.png")
    (a / "notes.txt").write_text("not an image")
    return a, b


def test_folder_run_outputs_summary_and_rerun(folders, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "out"
    r = StubRunner()
    rc = _run(_args(task="mef", a=a, b=b, out=out, quiet=True), r)
    cap = capsys.readouterr()
    assert rc == 2  # two pairs failed (size mismatch, corrupt): reported, the rest fused
    assert "fused 4 pair(s)" in cap.out and "2 failed" in cap.out and "2 unmatched" in cap.out
    assert "size mismatch" in cap.out and "corrupt.jpg: cannot decode" in cap.out
    assert "only_a: only in" in cap.out and "only_b: only in" in cap.out
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "deep.tif", "grey_rgb.png", "odd.png"]
    deep = imageio.read_image(out / "deep.tif")
    assert deep.bit_depth == 16 and deep.pixels.shape == (33, 47, 3)  # keeps the deeper input's depth
    src_a = imageio.read_image(a / "deep.tif").pixels
    src_b = np.repeat(imageio.read_image(b / "deep.tif").pixels, 3, -1)
    np.testing.assert_allclose(deep.pixels, 0.5 * (src_a + src_b), atol=1e-4)
    assert imageio.read_image(out / "odd.png").pixels.shape == (33, 51, 3)
    assert imageio.read_image(out / "alpha.png").bit_depth == 8

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r2 = StubRunner()
    rc = _run(_args(task="mef", a=a, b=b, out=out, quiet=True), r2)
    cap = capsys.readouterr()
    assert "fused 0 pair(s)" in cap.out and "4 already done" in cap.out and not r2.inputs
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _run(_args(task="mef", a=a, b=b, out=out, quiet=True, overwrite=True), r2)
    assert len(r2.inputs) == 4 and "fused 4 pair(s)" in capsys.readouterr().out


def test_crash_mid_folder_keeps_finished_outputs_and_rerun_continues(folders, tmp_path, capsys, monkeypatch):
    a, b = folders
    for p in list(a.iterdir()) + list(b.iterdir()):  # keep the four good pairs
        if p.stem in ("mismatch", "corrupt", "only_a", "only_b"):
            p.unlink()
    out = tmp_path / "out"
    rc = _run(_args(task="mff", a=a, b=b, out=out, quiet=True), StubRunner(fail_on_call=2))
    assert rc == 130 and "rerun" in capsys.readouterr().err
    done = sorted(p.name for p in out.iterdir())
    assert done == ["alpha.png", "deep.tif"]  # alphabetical: the first two finished
    for name in done:
        imageio.read_image(out / name)  # complete files

    # an interrupt while a file is being encoded leaves no file under the final name
    real = imageio.write_image

    def interrupted(path, *args, **kw):
        if path.name == "grey_rgb.png":
            with imageio.atomic_path(path) as tmp:
                tmp.write_bytes(b"half a png")
                raise KeyboardInterrupt
        return real(path, *args, **kw)

    monkeypatch.setattr(imageio, "write_image", interrupted)
    assert _run(_args(task="mff", a=a, b=b, out=out, quiet=True), StubRunner()) == 130
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "deep.tif"]
    monkeypatch.setattr(imageio, "write_image", real)

    r = StubRunner()
    assert _run(_args(task="mff", a=a, b=b, out=out, quiet=True), r) == 0
    assert len(r.inputs) == 2  # only the two missing pairs
    assert sorted(p.name for p in out.iterdir()) == ["alpha.png", "deep.tif", "grey_rgb.png", "odd.png"]


def test_single_pair_formats_depths_and_decomposition(tmp_path, capsys):
    a, b = _img((45, 61, 3), "u16"), _img((45, 61, 3), "u16")
    np.save(tmp_path / "a.npy", a.astype(np.float32) / 65535)
    cv_b = tmp_path / "b.png"
    import cv2

    cv2.imwrite(str(cv_b), b[..., ::-1])
    r = StubRunner()
    assert _run(_args(task="mff", a=tmp_path / "a.npy", b=cv_b, out=tmp_path / "o"), r) == 0
    got = np.load(tmp_path / "o" / "a.npy")  # .npy in -> float .npy out
    np.testing.assert_allclose(got, 0.5 * (a / 65535 + b / 65535), atol=1e-6)
    assert _run(_args(task="mff", a=tmp_path / "a.npy", b=cv_b, out=tmp_path / "f16.png"), r) == 0
    assert imageio.read_image(tmp_path / "f16.png").bit_depth == 16  # float source -> 16-bit PNG
    assert _run(_args(task="mff", a=tmp_path / "a.npy", b=cv_b, out=tmp_path / "f8.jpg", bit_depth="8"), r) == 0
    assert imageio.read_image(tmp_path / "f8.jpg").bit_depth == 8
    assert _run(_args(task="mff", a=tmp_path / "a.npy", b=cv_b, out=tmp_path / "d.png",
                      save_decomposition=True), r) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d"))
    assert names == ["d.png", "d_common.png", "d_heat_common.png", "d_heat_unique_a.png", "d_heat_unique_b.png",
                     "d_unique_a.png", "d_unique_b.png"]
    heat = imageio.read_image(tmp_path / "d_heat_unique_a.png")
    assert heat.pixels.shape == (45, 61, 3) and heat.bit_depth == 8
    # a second run skips the existing output, says so, and exits 0
    assert _run(_args(task="mff", a=tmp_path / "a.npy", b=cv_b, out=tmp_path / "d.png"), r) == 0
    assert "skipped d" in capsys.readouterr().out


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_one_line_exit_2(tmp_path, capsys, folders):
    a, b = folders
    good = a / "odd.png"
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "notamodel").mkdir()
    stub = StubRunner()
    cases = [
        (_args(task="mef", a=tmp_path / "missing.png", b=good, out=tmp_path / "o.png"), stub, "no such file"),
        (_args(task="mef", a=a / "corrupt.jpg", b=b / "corrupt.png", out=tmp_path / "o.png"), stub, "cannot decode"),
        (_args(task="mef", a=a / "mismatch.png", b=b / "mismatch.png", out=tmp_path / "o.png"), stub, "size mismatch"),
        (_args(task="mef", a=tmp_path / "empty", b=b, out=tmp_path / "o"), stub, "no images in"),
        (_args(task="mef", a=a / "notes.txt", b=good, out=tmp_path / "o.png"), stub, "unsupported file type"),
        (_args(task="mef", a=a, b=good, out=tmp_path / "o"), stub, "both be files or both be folders"),
        (_args(task="mff", a=good, b=good, out=tmp_path / "o.png", color=True), stub, "--color is for IVF"),
        (_args(model=tmp_path / "junk.pth", task="mef", a=good, b=good, out=tmp_path / "o.png"), None, "cannot load model"),
        (_args(model=tmp_path / "nope.pth", task="mef", a=good, b=good, out=tmp_path / "o.png"), None, "model not found"),
        (_args(model=tmp_path / "notamodel", task="mef", a=good, b=good, out=tmp_path / "o.png"), None, "cannot load model"),
    ]
    for argv, runner, msg in cases:
        err = _one_line_error(capsys, _run(argv, runner))
        assert msg in err, (msg, err)
    assert not (tmp_path / "o.png").exists()


def test_cli_process_bad_input_no_traceback(tmp_path, shared_dir):
    proc = subprocess.run([sys.executable, "-m", "defusion_jax.fuse", "--model", str(tmp_path / "none.pth"), "--task",
                           "ivf", "--a", str(tmp_path / "x.png"), "--b", str(tmp_path / "y.png"), "--out",
                           str(tmp_path / "o.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


# ---- the official-size network (random-weight fixture) ---------------------------------------
DEV_PAIRS = {"ivf": ("ivf/MSRS/ir/00004N.png", "ivf/MSRS/vi/00004N.png"),
             "mef": ("mef/MEFB/under/House.png", "mef/MEFB/over/House.png"),
             "mff": ("mff/Lytro/A/lytro_01.jpg", "mff/Lytro/B/lytro_01.jpg")}


@pytest.fixture(scope="module")
def model(fixture_dir):
    from defusion_jax.api import load_model

    return load_model(fixture_dir / FIXTURE_FILE)


@pytest.fixture(scope="module")
def runner(model):
    return inference.ModelRunner(model)


def _crop_pair(shared_dir, tmp_path, task, size=CROP, y=100, x=120):
    """Crops of a dev pair, saved in their source format (grey stays grey)."""
    out = []
    for rel, folder in zip(DEV_PAIRS[task], ("A", "B")):
        src = shared_dir / "data" / rel
        im = Image.open(src)
        crop = im.crop((x, y, x + size[1], y + size[0]))
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        dst = tmp_path / folder / f"{task}{src.suffix}"
        crop.save(dst, quality=100) if src.suffix == ".jpg" else crop.save(dst)
        out.append(dst)
    return out


def _reference(model, path_a, path_b, task):
    """The official test protocol written out independently: PIL loading as the official
    loaders (IVF `convert('L').convert('RGB')`, else `convert('RGB')`), reflect 16 + up to 16."""
    def load(p):
        im = Image.open(p)
        im = im.convert("L").convert("RGB") if task == "ivf" else im.convert("RGB")
        return np.asarray(im, np.float32) / 255

    a, b = load(path_a), load(path_b)
    h, w = a.shape[:2]
    ph, pw = (-(h + 32)) % 16, (-(w + 32)) % 16
    pad = lambda x: np.pad(x, ((16, 16 + ph), (16, 16 + pw), (0, 0)), mode="reflect")[None]  # noqa: E731
    return np.asarray(model.fuse(pad(a), pad(b)))[0, 16:16 + h, 16:16 + w]


def test_dev_pairs_of_every_task_through_the_cli(shared_dir, tmp_path, model, runner, capsys):
    for task in ("ivf", "mef", "mff"):
        pa, pb = _crop_pair(shared_dir, tmp_path / task, task)
        out = tmp_path / task / "out"
        assert _run(_args(task=task, a=pa.parent, b=pb.parent, out=out, format="npy", quiet=True), runner) == 0
        got = np.load(out / f"{task}.npy")
        ref = _reference(model, pa, pb, task)
        assert got.shape == (*CROP, 3)
        np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=1e-5)
        # the Python API agrees
        np.testing.assert_allclose(model.fuse_image(imageio.read_image(pa).pixels, imageio.read_image(pb).pixels,
                                                    task), got, atol=1e-5)
    assert {s for s, _ in runner.shapes} == {(1, 128, 128, 3)}  # one compiled canvas for all


def test_decomposition_outputs_with_the_network(shared_dir, tmp_path, model, runner):
    pa, pb = _crop_pair(shared_dir, tmp_path, "mef")
    assert _run(_args(task="mef", a=pa, b=pb, out=tmp_path / "o" / "f.npy", save_decomposition=True, quiet=True),
                runner) == 0
    fused = np.load(tmp_path / "o" / "f.npy")
    np.testing.assert_allclose(fused, np.clip(_reference(model, pa, pb, "mef"), 0, 1), atol=1e-5)
    for k in ("common", "unique_a", "unique_b"):
        assert np.load(tmp_path / "o" / f"f_{k}.npy").shape == (*CROP, 3)
        assert imageio.read_image(tmp_path / "o" / f"f_heat_{k}.png").pixels.shape == (*CROP, 3)


def test_model_path_color_output(shared_dir, tmp_path, fixture_dir):
    """Through --model (a fresh load) with --color: visible chroma, fused luma, 8-bit PNG."""
    pa, pb = _crop_pair(shared_dir, tmp_path, "ivf")
    rc = fuse.main(["--model", str(fixture_dir / FIXTURE_FILE), "--task", "ivf", "--a", str(pa), "--b", str(pb),
                    "--out", str(tmp_path / "c.png"), "--color"])
    assert rc == 0
    got = imageio.read_image(tmp_path / "c.png")
    assert got.bit_depth == 8 and got.pixels.shape == (*CROP, 3) and inference.chroma_energy(got.pixels) > 0.01


def test_tiled_network_output_is_seamless(shared_dir, tmp_path, runner):
    """2 tiles of the shared 128x128 canvas vs one 128x208 pass. Random weights make the two
    disagree (global attention sees different context), but the blend must show no seam."""
    pa, pb = _crop_pair(shared_dir, tmp_path, "mff", size=(CROP[0], 173))
    a, b = imageio.read_image(pa).pixels, imageio.read_image(pb).pixels
    full = fuse_arrays(runner, a, b, "mff").fused
    tiled = fuse_arrays(runner, a, b, "mff", max_pixels=128 * 128, overlap=32)
    assert tiled.tiles == 2 and tiled.canvas == (128, 128)
    corr = np.corrcoef(full.ravel(), tiled.fused.ravel())[0, 1]
    assert corr > 0.8, corr
    # column-to-column change: the overlap band (image columns 64..112) is no rougher than the rest
    gx = np.abs(np.diff(tiled.fused, axis=1)).mean(axis=(0, 2))
    band, rest = gx[60:116], np.concatenate([gx[:60], gx[116:]])
    assert band.max() <= 1.25 * np.percentile(rest, 95), (band.max(), np.percentile(rest, 95))
    gx_full = np.abs(np.diff(full, axis=1)).mean(axis=(0, 2))
    assert abs(gx.mean() / gx_full.mean() - 1) < 0.15


def test_outputs_never_overwrite_inputs(tmp_path, capsys, folders):
    """An output path that is an input (by name, through '..' or a symlink) is refused before
    anything runs: with --overwrite it would replace the source, without it the pair would be
    'already done'."""
    a, b = folders
    victim = a / "odd.png"
    before = {p: p.read_bytes() for p in list(a.iterdir()) + list(b.iterdir())}
    (tmp_path / "link").symlink_to(a)
    r = StubRunner()
    cases = [
        _args(task="mef", a=victim, b=b / "odd.png", out=victim, overwrite=True),
        _args(task="mef", a=victim, b=b / "odd.png", out=b / ".." / "B" / "odd.png", overwrite=True),
        _args(task="mef", a=victim, b=b / "odd.png", out=a, overwrite=True),  # folder: A/odd.png
        _args(task="mef", a=a, b=b, out=a, overwrite=True),
        _args(task="mef", a=a, b=b, out=b),
        _args(task="mef", a=a, b=b, out=tmp_path / "link", format="png", overwrite=True),
    ]
    for argv in cases:
        err = _one_line_error(capsys, _run(argv, r))
        assert "--a" in err or "--b" in err, err
    # a decomposition image named like an input counts too
    (tmp_path / "f_common.png").write_bytes(victim.read_bytes())
    err = _one_line_error(capsys, _run(_args(task="mef", a=tmp_path / "f_common.png", b=b / "odd.png",
                                             out=tmp_path / "f.png", save_decomposition=True, overwrite=True), r))
    assert "f_common.png is the --a input" in err
    assert not r.inputs and before == {p: p.read_bytes() for p in before}


def test_outputs_of_two_pairs_never_share_a_name(tmp_path, capsys, folders):
    """Pair `odd`'s common part `odd_common.png` would be pair `odd_common`'s fused image: the run is
    refused before anything is fused, instead of one output silently replacing the other."""
    a, b = folders
    for d in (a, b):
        (d / "odd_common.png").write_bytes((d / "odd.png").read_bytes())
    r = StubRunner()
    err = _one_line_error(capsys, _run(_args(task="mef", a=a, b=b, out=tmp_path / "o", save_decomposition=True), r))
    assert "odd_common.png would be both the common output of pair 'odd' and the fused output of pair " \
           "'odd_common'" in err, err
    assert not r.inputs and not (tmp_path / "o").exists()
    _run(_args(task="mef", a=a, b=b, out=tmp_path / "o"), r)  # no clash without the parts
    assert (tmp_path / "o" / "odd.png").exists() and (tmp_path / "o" / "odd_common.png").exists()


def test_nan_in_a_float_input_or_output_fails_clearly(tmp_path, capsys):
    import warnings

    a = RNG.random((20, 24, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb")
    a[5, 5, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", a, photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning leaks out either
        err = _one_line_error(capsys, _run(_args(task="mef", a=tmp_path / "nan.tif", b=tmp_path / "a.tif",
                                                 out=tmp_path / "o.png"), StubRunner()))
        assert "nan.tif" in err and "NaN or infinite" in err and not (tmp_path / "o.png").exists()

        class NaNRunner(StubRunner):
            def __call__(self, a, b, parts=False):
                out = super().__call__(a, b, parts)
                out["fused"][..., 20, 20, :] = np.nan  # inside the image, not the border
                return out

        err = _one_line_error(capsys, _run(_args(task="mef", a=tmp_path / "a.tif", b=tmp_path / "a.tif",
                                                 out=tmp_path / "o.png"), NaNRunner()))
        assert "fused output has 3 NaN" in err and not (tmp_path / "o.png").exists()


# ---- the input rule shared by the API, fuse_arrays and the exported function ------------------
def test_as_unit_float_scales_8_and_16_bit_and_rejects_the_rest():
    import jax.numpy as jnp

    from defusion_jax.exported import as_unit_float

    u8 = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_array_equal(as_unit_float(u8), np.float32([[0, 128, 255]]) / np.float32(255))
    np.testing.assert_array_equal(as_unit_float(np.array([65535], np.uint16)), [1.0])
    edge = np.float32([-5e-4, 1.0005])  # rounding noise is accepted as is
    np.testing.assert_array_equal(as_unit_float(edge), edge)
    on_device = as_unit_float(jnp.asarray(u8))
    assert isinstance(on_device, type(jnp.zeros(1))) and on_device.dtype == jnp.float32
    for bad in (np.array([1], np.int64), np.array([1], np.int32), np.array([True]), np.array([1], np.uint32)):
        with pytest.raises(TypeError, match=f"{bad.dtype} samples"):
            as_unit_float(bad)
    with pytest.raises(ValueError, match=r"a: values span \[0, 255\], expected floats in \[0, 1\].*divide by 255"):
        as_unit_float(np.float32([0, 17, 255]), "a")
    with pytest.raises(ValueError, match=r"span \[-0.01, 1\]"):
        as_unit_float(jnp.float32([-0.01, 1.0]))
    with pytest.raises(ValueError, match="1 of 3 values are NaN"):
        as_unit_float(np.float32([0, np.nan, 1]))


@pytest.fixture(scope="module")
def tiny_model():
    import jax

    from defusion_jax.api import FusionModel
    from defusion_jax.models.defusion import build_model, init_params

    cfg = {"vit": dict(width=32, depth=1, heads=2, mlp_dim=64), "dim": 32, "heads": 2}
    return FusionModel(init_params(build_model(cfg), jax.random.key(0), (32, 32)), cfg)


def test_api_accepts_8_and_16_bit_arrays_and_rejects_wrong_scales(tiny_model):
    m = tiny_model
    u8 = RNG.integers(0, 256, (2, 20, 27, 3), dtype=np.uint8)  # np.asarray(Image.open(...)) of a pair
    want = m.fuse_image(u8[0] / np.float32(255), u8[1] / np.float32(255), "ivf")
    np.testing.assert_array_equal(m.fuse_image(u8[0], u8[1], "ivf"), want)
    u16 = u8.astype(np.uint16) * 257
    np.testing.assert_allclose(m.fuse_image(u16[0], u16[1], "mef"),
                               m.fuse_image(u8[0] / np.float32(255), u8[1] / np.float32(255), "mef"), atol=1e-6)
    with pytest.raises(ValueError, match=r"values span \[0, 255\]"):
        m.fuse_image(u8[0].astype(np.float32), u8[1].astype(np.float32), "mef")
    with pytest.raises(TypeError, match="int64"):
        m.fuse_image(u8[0].astype(np.int64), u8[1].astype(np.int64), "mef")
    x = RNG.random((1, 32, 48, 3)).astype(np.float32)
    x[0, 0, 0] = 0.0, 0.5, 1.0
    with pytest.raises(ValueError, match=r"span \[0, 2\], expected floats in \[0, 1\]$"):
        m.decompose(2 * x, x)
    with pytest.raises(ValueError, match="NaN"):
        m.fuse(x * np.nan, x)
    with pytest.raises(ValueError, match=r"looks like NCHW: pass x.transpose\(0, 2, 3, 1\)"):
        m.fuse(x.transpose(0, 3, 1, 2), x.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"looks like CxHxW: pass x.transpose\(1, 2, 0\)"):
        m.fuse_image(x[0].transpose(2, 0, 1), x[0].transpose(2, 0, 1), "mef")
    with pytest.raises(ValueError, match=r"a batch: pass one image \(x\[0\]\)"):
        m.fuse_image(x, x, "mef")
    with pytest.raises(ValueError, match=r"one image: pass x\[None\]"):
        m.decompose(x[0], x[0])
    with pytest.raises(ValueError, match="empty image"):
        m.fuse_image(x[0, :0], x[0, :0], "mef")


def test_cli_refuses_float_files_outside_0_1(tmp_path, capsys):
    x = RNG.random((20, 24, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x * 255)
    err = _one_line_error(capsys, _run(_args(task="mef", a=tmp_path / "a.npy", b=tmp_path / "b.npy",
                                             out=tmp_path / "o.npy"), StubRunner()))
    assert "b.npy: values span [" in err and "expected floats in [0, 1]" in err


def test_unwritable_output_folder_fails_before_any_pair_runs(tmp_path, capsys, folders):
    import tempfile

    a, b = folders
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file" / "sub", "Not a directory")]
    try:  # /sys refuses new files even to root (where chmod would not)
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        cases.append((Path("/sys"), "Permission denied"))
    else:
        os.close(fd), os.unlink(probe)
    for out, why in cases:
        for argv in (_args(task="mef", a=a / "odd.png", b=b / "odd.png", out=out / "o.png"),
                     _args(task="mef", a=a, b=b, out=out)):
            r = StubRunner()
            err = _one_line_error(capsys, _run(argv, r))
            assert err == f"error: cannot write to output folder {out}: {why}", err
            assert not r.inputs  # found before computing anything


def test_tiles_show_their_plan_first_and_a_progress_bar(tmp_path, capsys):
    a = _img((100, 150, 3))
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(a[::-1]).save(tmp_path / "b.png")
    plans, updates = [], []

    class Bar:
        def update(self, n):
            updates.append(n)

        def close(self):
            updates.append("closed")

    res = fuse_arrays(StubRunner(), a / np.float32(255), a / np.float32(255), "mef", max_pixels=96 * 96,
                      overlap=32, progress=lambda plan: plans.append(plan) or Bar())
    assert res.tiles == plans[0].count > 1 and updates == [1] * res.tiles + ["closed"]

    class Peek(StubRunner):  # what stderr held when the first tile started
        def __call__(self, *args, **kw):
            if not self.inputs:
                self.before = capsys.readouterr().err
            return super().__call__(*args, **kw)

    r = Peek()
    assert _run(_args(task="mef", a=tmp_path / "a.png", b=tmp_path / "b.png", out=tmp_path / "o.png",
                      max_pixels=96 * 96, overlap=32), r) == 0
    n = len(r.inputs)
    assert n == res.tiles and f"note: o: {n} tiles of 96x96" in r.before
    after = capsys.readouterr().err
    assert f"o: tiles:   0%" in r.before + after and f"0/{n} " in r.before + after  # tqdm over the tiles
    assert _run(_args(task="mef", a=tmp_path / "a.png", b=tmp_path / "b.png", out=tmp_path / "q.png",
                      max_pixels=96 * 96, overlap=32, quiet=True), StubRunner()) == 0
    assert capsys.readouterr().err == ""


def test_ambiguous_stems_are_listed_once(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir(), b.mkdir()
    for folder, names in ((a, ["x.png", "y.png", "y.jpg", "z.png", "k.png"]), (b, ["x.png", "y.png", "z.png", "z.tif"])):
        for n in names:
            (folder / n).write_bytes(b"")
    pairs, unmatched = fuse.match_folders(a, b)
    assert [p.name for p in pairs] == ["x"]
    assert sorted(unmatched) == sorted([("k", f"only in {a}"), ("y (y.jpg, y.png)", f"several files with this stem in {a}"),
                                        ("z (z.png, z.tif)", f"several files with this stem in {b}")])


def test_out_suffix_aliases_dotted_folders_and_max_pixels(tmp_path, capsys):
    Image.fromarray(_img((20, 24, 3))).save(tmp_path / "a.png")
    common = dict(task="mef", a=tmp_path / "a.png", b=tmp_path / "a.png")
    r = StubRunner()
    for fmt, name in (("tif", "x.tiff"), ("tiff", "y.tif"), ("jpg", "x.jpeg"), ("jpeg", "y.JPG")):
        assert _run(_args(**common, out=tmp_path / name, format=fmt), r) == 0, fmt
        assert imageio.read_image(tmp_path / name).pixels.shape == (20, 24, 3)
    err = _one_line_error(capsys, _run(_args(**common, out=tmp_path / "x.png", format="tif"), r))
    assert "contradicts" in err
    # folders whose names look like files: an existing one, or one written with a trailing slash
    for folder in ("results.v2", "fused.png"):
        (tmp_path / folder).mkdir()
        assert _run(_args(**common, out=tmp_path / folder), r) == 0
        assert (tmp_path / folder / "a.png").is_file()
    assert _run(_args(**common, out=f"{tmp_path / 'new.v3'}/"), r) == 0 and (tmp_path / "new.v3" / "a.png").is_file()
    for bad in ("-5", "0", "many"):
        with pytest.raises(SystemExit):
            fuse.build_parser().parse_args([str(x) for x in _args(**common, out="o.png", max_pixels=bad)])
        assert "--max-pixels" in capsys.readouterr().err


def test_api_runs_at_the_clis_matmul_precision_by_default(tiny_model, monkeypatch):
    """fuse_image / decompose / fuse default to `highest` like the CLI and the export (they used
    to inherit the global default, TF32/bf16 passes on GPUs); `precision=` chooses, None inherits."""
    import jax

    m, seen = tiny_model, []

    def spy(parts):  # records the precision in force when the jitted function is called
        def f(params, a, b, direction):
            seen.append(jax.config.jax_default_matmul_precision)
            z = np.zeros(a.shape, np.float32)
            return {k: z for k in ("fused",) + inference.PARTS} if parts else z
        return f

    monkeypatch.setitem(m.__dict__, "_fuse", spy(False))
    monkeypatch.setitem(m.__dict__, "_decompose", spy(True))
    x = RNG.random((1, 32, 32, 3)).astype(np.float32)
    jax.config.update("jax_default_matmul_precision", None)  # conftest sets highest for every test
    try:
        m.fuse_image(x[0, :20, :20], x[0, :20, :20], "mef")
        m.decompose(x, x)
        m.fuse(x, x)
        m.fuse(x, x, precision="high")
        m.decompose(x, x, precision=None)
        inference.fuse_arrays(inference.ModelRunner(m, precision="default"), x[0], x[0], "mef")
    finally:
        jax.config.update("jax_default_matmul_precision", "highest")
    assert seen == ["highest", "highest", "highest", "high", None, "default"]


def _products(jaxpr) -> list[tuple[tuple[str, ...], int]]:
    """(operand dtypes, largest operand rank) of every dot_general in a jaxpr and its sub-jaxprs."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            out.append((tuple(str(v.aval.dtype) for v in e.invars), max(v.aval.ndim for v in e.invars)))
        for value in e.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    out.extend(_products(sub))
    return out


def test_bfloat16_precision_rounds_every_token_product(tiny_model):
    """precision="bfloat16" (API, CLI, export): every product over tokens takes bfloat16 operands
    with float32 sums, which XLA:CPU would not do for the setting alone (`models.vit.bf16_products`);
    the output moves by bfloat16 rounding and no more. The weight-only compositions of the
    cross-attention projections stay float32."""
    import jax

    from defusion_jax.models.defusion import DeFusionPP

    m = tiny_model
    a, b = RNG.random((2, 1, 32, 48, 3)).astype(np.float32)

    def products(precision):
        with jax.default_matmul_precision(precision):
            jaxpr = jax.make_jaxpr(lambda p: m.module.apply({"params": p}, a, b, method=DeFusionPP.fuse))(m.params)
        return _products(jaxpr.jaxpr)

    assert {d for dtypes, _ in products("highest") for d in dtypes} == {"float32"}
    got = products("bfloat16")
    over_tokens = {d for dtypes, rank in got if rank >= 3 for d in dtypes}  # (B, L, D) and (B, H, L, Dh)
    weights_only = {d for dtypes, rank in got if rank <= 2 for d in dtypes}
    assert over_tokens == {"bfloat16"} and weights_only == {"float32"}, got
    ref, low = (np.asarray(m.fuse(a, b, precision=p), np.float64) for p in ("highest", "bfloat16"))
    rel = np.linalg.norm(low - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 2e-2, rel
    assert fuse.build_parser().parse_args(["--model", "m", "--task", "mef", "--a", "a", "--b", "b", "--out", "o",
                                           "--precision", "bfloat16"]).precision == "bfloat16"


def test_depth_note_only_when_samples_are_lost():
    from defusion_jax.fuse import _depth_for

    assert _depth_for(Path("x.jpg"), 16) == (8, ".jpg holds 8-bit samples: writing 8-bit instead of 16-bit")
    assert _depth_for(Path("x.npy"), 8) == (32, None)  # floats hold 8-bit data exactly: no note per pair
    assert _depth_for(Path("x.png"), 16) == (16, None)

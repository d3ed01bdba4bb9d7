"""The exported fusion function: written by the CLI, loaded in a process without the model code,
equal to `load_model(...).decompose(...)["fused"]` within 1e-5 on a padded dev pair."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from defusion_jax import exported, fuse, imageio
from defusion_jax import export as export_cli
from defusion_jax.inference import pad_amounts, pad_image, to_model_input

FIXTURE_FILE = "ucmimnet_state_dict.safetensors"


@pytest.fixture(scope="module")
def export_dir(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "defusionpp"
    assert export_cli.main(["--model", str(fixture_dir / FIXTURE_FILE), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def padded_pair(shared_dir):
    """A dev MEF pair, cropped to an odd size and padded by the protocol: 1 x 144 x 176 x 3."""
    ims = [np.asarray(Image.open(shared_dir / "data/mef/MEFB" / r / "House.png").convert("RGB"), np.float32)[40:149, 60:201] / 255
           for r in ("under", "over")]
    pads = pad_amounts(*ims[0].shape[:2])
    a, b = (pad_image(to_model_input(x, "mef"), pads)[None] for x in ims)
    assert a.shape == (1, 144, 176, 3)
    return a, b


def test_export_folder_and_manifest(export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == ["fuse.jax", "manifest.json", "weights.npz"]
    m = json.loads((export_dir / "manifest.json").read_text())
    assert m["format"] == exported.FORMAT and m["platforms"] == ["cpu", "cuda", "tpu"]
    assert m["inputs"]["layout"] == "NHWC" and m["inputs"]["shape"] == "(batch, 16*h, 16*w, 3)"
    assert m["inputs"]["value_range"] == [0.0, 1.0]
    assert "np.pad(x, ((16, 16 + eh), (16, 16 + ew), (0, 0)), mode='reflect')" in m["padding_rule"]
    assert "mode='symmetric' instead when 16 + eh >= H or 16 + ew >= W" in m["padding_rule"]
    assert "19595 R + 38470 G + 7471 B + 0x8000" in m["color"]["ivf"]
    assert m["versions"]["jax"] and m["direction"] == "q_view2" and m["model"]["num_params"] == 13_420_800
    # weights are stored beside the function, not baked into it
    assert (export_dir / "fuse.jax").stat().st_size < 2 << 20 < (export_dir / "weights.npz").stat().st_size
    exp = exported.load(export_dir).exported
    assert str(exp.in_avals[-1].shape) == "(b, 16*h, 16*w, 3)"


def test_exported_function_in_a_process_without_the_model_code(export_dir, padded_pair, fixture_dir, tmp_path):
    from defusion_jax.api import load_model

    a, b = padded_pair
    # batch 2 (symbolic batch) with the pair and its swap; a second size checks symbolic H, W
    np.save(tmp_path / "a.npy", np.concatenate([a, b]))
    np.save(tmp_path / "b.npy", np.concatenate([b, a]))
    iso = tmp_path / "iso"
    iso.mkdir()
    shutil.copy(exported.__file__, iso / "exported.py")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("defusion_jax", "flax", "torch"):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        sys.path = [p for p in sys.path if "work/main" not in p]
        import numpy as np, exported
        f = exported.load({str(export_dir)!r})
        np.save("fused.npy", np.asarray(f(np.load("a.npy"), np.load("b.npy"))))
        other = np.asarray(f(np.full((1, 64, 48, 3), 0.5, np.float32), np.zeros((1, 64, 48, 3), np.float32)))
        assert other.shape == (1, 64, 48, 3) and np.isfinite(other).all()
        try:
            f(np.zeros((1, 40, 48, 3), np.float32), np.zeros((1, 40, 48, 3), np.float32))
        except ValueError as e:
            assert "multiples of 16" in str(e)
        else:
            raise SystemExit("a 40-px input was accepted")
        print("loaded without", [m for m in ("defusion_jax", "flax") if m in sys.modules])
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(iso),
                                                        "JAX_PLATFORMS": "cpu", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded without []" in proc.stdout
    got = np.load(tmp_path / "fused.npy")
    ref = np.asarray(load_model(fixture_dir / FIXTURE_FILE).decompose(a, b)["fused"])
    assert got.shape == (2, 144, 176, 3)
    err = float(np.abs(got[0] - ref[0]).max())
    assert err <= 1e-5, err
    print(f"exported vs decompose: max |diff| {err:.2e}")


def test_fuse_cli_runs_an_export(export_dir, shared_dir, tmp_path, capsys):
    a, b = (shared_dir / "data/mff/MFIFB_other" / r / "savic_01.jpg" for r in ("A", "B"))
    for p, name in ((a, "a.png"), (b, "b.png")):
        Image.open(p).crop((0, 0, 112, 80)).save(tmp_path / name)  # 144x176 canvas as above
    rc = fuse.main(["--model", str(export_dir), "--task", "mff", "--a", str(tmp_path / "a.png"), "--b",
                    str(tmp_path / "b.png"), "--out", str(tmp_path / "f.png")])
    assert rc == 0 and imageio.read_image(tmp_path / "f.png").pixels.shape == (80, 112, 3)
    rc = fuse.main(["--model", str(export_dir), "--task", "mff", "--a", str(tmp_path / "a.png"), "--b",
                    str(tmp_path / "b.png"), "--out", str(tmp_path / "g.png"), "--save-decomposition"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "needs a checkpoint" in err and "\n" not in err


def test_evaluate_scores_an_export_as_fuse_writes_it(export_dir, shared_dir, tmp_path):
    from defusion_jax import evaluate

    ds = tmp_path / "mff" / "Crop"
    for r in ("A", "B"):
        (ds / r).mkdir(parents=True)
        Image.open(shared_dir / "data/mff/MFIFB_other" / r / "savic_01.jpg").crop((0, 0, 112, 80)).save(ds / r / "s.png")
    assert evaluate.main(["--task", "mff", "--pairs", str(ds), "--model", str(export_dir), "--metrics", "EN",
                          "--out", str(tmp_path / "ev"), "--workers", "1", "--no-compare"]) == 0
    assert fuse.main(["--model", str(export_dir), "--task", "mff", "--a", str(ds / "A" / "s.png"), "--b",
                      str(ds / "B" / "s.png"), "--out", str(tmp_path / "f.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ev/fused/DeFusion++/Crop/s.png")),
                                  np.asarray(Image.open(tmp_path / "f.png")))
    # a precision the export was not made with is refused, as by fuse, before anything is fused
    assert evaluate.main(["--task", "mff", "--pairs", str(ds), "--model", str(export_dir), "--metrics", "EN",
                          "--precision", "bfloat16", "--out", str(tmp_path / "ev2")]) == 2
    assert not (tmp_path / "ev2" / "fused").exists()


def test_bad_exports_and_models(export_dir, tmp_path, capsys):
    assert export_cli.main(["--model", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert export_cli.main(["--model", str(export_dir), "--out", str(tmp_path / "y")]) == 2  # not a checkpoint
    err = capsys.readouterr().err
    assert "cannot load model" in err and "is an export folder" in err and "exported.load" in err
    from defusion_jax.api import load_model
    from defusion_jax.params_io import CheckpointError

    with pytest.raises(CheckpointError, match="is an export folder.*fuse --model"):
        load_model(export_dir)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "junk.pth")
    assert "junk.pth: not a loadable checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    from defusion_jax import convert

    assert convert.main(["official", "--input", str(tmp_path / "junk.pth"), "--output", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err  # the converter reads through the same loader: no unsafe advice there either
    assert "junk.pth: not a loadable checkpoint" in err and "weights_only" not in err
    with pytest.raises(exported.ExportedModelError, match="/nonexistent: no such folder"):
        exported.load("/nonexistent")
    with pytest.raises(exported.ExportedModelError, match="not a folder"):
        exported.load(tmp_path / "junk.pth")
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    with open(broken / "weights.npz", "r+b") as f:
        f.seek(1000)
        f.write(b"\0" * 16)
    with pytest.raises(exported.ExportedModelError, match="checksum"):
        exported.load(broken)
    img = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(img)
    rc = fuse.main(["--model", str(broken), "--task", "mff", "--a", str(img), "--b", str(img),
                    "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "checksum" in err
    (broken / "manifest.json").write_text('{"format": "defusion_jax.exported/99"}')
    with pytest.raises(exported.ExportedModelError, match="format"):
        exported.load(broken)
    with pytest.raises(exported.ExportedModelError, match="not an export folder"):
        exported.load(tmp_path)


def test_export_refuses_to_overwrite(export_dir, fixture_dir, capsys):
    rc = export_cli.main(["--model", str(fixture_dir / FIXTURE_FILE), "--out", str(export_dir)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_overwrite_replaces_only_export_folders(export_dir, fixture_dir, tmp_path, capsys):
    """--overwrite deletes the old folder, so it must refuse anything that is not an export:
    a source tree, an export folder with the user's own files in it, a file."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "code.py").write_text("precious = 1\n")
    target_file = tmp_path / "model.bin"
    target_file.write_bytes(b"precious")
    mixed = tmp_path / "mixed"
    shutil.copytree(export_dir, mixed)
    (mixed / "notes.txt").write_text("mine")
    for out, msg in ((src, "not an export folder"), (mixed, "not an export folder"), (target_file, "is a file")):
        for extra in ([], ["--overwrite"]):
            rc = export_cli.main(["--model", str(fixture_dir / FIXTURE_FILE), "--out", str(out), *extra])
            err = capsys.readouterr().err.strip()
            assert rc == 2 and err.startswith("error: ") and msg in err and "\n" not in err, (out, extra, err)
        with pytest.raises(FileExistsError, match=msg):
            export_cli.check_target(out, overwrite=True)
    assert (src / "pkg" / "code.py").read_text() == "precious = 1\n" and target_file.read_bytes() == b"precious"
    assert (mixed / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "model.bin", "src"]  # no hidden leftovers
    # what may be written: a new path, an empty folder, an export (with --overwrite only)
    (tmp_path / "empty").mkdir()
    for ok in (tmp_path / "new", tmp_path / "empty"):
        export_cli.check_target(ok)
    export_cli.check_target(export_dir, overwrite=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_cli.check_target(export_dir)


def test_exported_function_checks_dtype_range_and_layout(export_dir):
    f = exported.load(export_dir)
    u8 = np.random.default_rng(3).integers(0, 256, (2, 1, 32, 32, 3), dtype=np.uint8)
    as_float = np.asarray(f(u8[0] / np.float32(255), u8[1] / np.float32(255)))
    np.testing.assert_array_equal(np.asarray(f(u8[0], u8[1])), as_float)
    with pytest.raises(ValueError, match=r"a: values span \[0, 255\]"):
        f(u8[0].astype(np.float32), u8[1])
    with pytest.raises(TypeError, match="int32"):
        f(u8[0].astype(np.int32), u8[1].astype(np.int32))
    with pytest.raises(ValueError, match="looks like NCHW"):
        f(u8[0].transpose(0, 3, 1, 2), u8[1].transpose(0, 3, 1, 2))


def test_fuse_options_an_export_cannot_honour_fail_before_loading(export_dir, tmp_path, capsys, monkeypatch):
    img = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(img)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(fuse, "load_runner", no_load)
    base = ["--model", str(export_dir), "--task", "mff", "--a", str(img), "--b", str(img), "--out", str(tmp_path / "o.png")]
    for extra, msg in ((["--save-decomposition"], "needs a checkpoint"),
                       (["--direction", "q_view1"], f"--direction q_view1: the export {export_dir} was made with direction q_view2"),
                       (["--precision", "high"], "made with matmul_precision highest")):
        rc = fuse.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and msg in err and "\n" not in err, err
    fuse.check_export_options(str(export_dir), direction="q_view2", precision="highest")  # the baked values are fine
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("h,w", [(109, 141), (33, 51), (31, 40), (20, 7), (1, 1)])
def test_documented_padding_rule_is_what_the_code_does(h, w):
    """The manifest's padding_rule (and docs/fusion.md, exported.py) written out == pad_image."""
    x = np.random.default_rng(h * w).random((h, w, 3)).astype(np.float32)
    eh, ew = (-(h + 32)) % 16, (-(w + 32)) % 16
    mode = "reflect" if 16 + eh < h and 16 + ew < w else "symmetric"
    want = np.pad(x, ((16, 16 + eh), (16, 16 + ew), (0, 0)), mode=mode)
    np.testing.assert_array_equal(pad_image(x, pad_amounts(h, w)), want)
    assert want.shape[0] % 16 == 0 and want.shape[1] % 16 == 0
    np.testing.assert_array_equal(want[16:16 + h, 16:16 + w], x)

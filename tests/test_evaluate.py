"""The evaluation command end to end on tiny generated data."""
import csv
import sys
import types

import numpy as np
import pytest
from PIL import Image

from defusion_jax import evaluate
from defusion_jax.mff_synth import generate


def _img(seed, h=64, w=72, rgb=True):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (0.8, 0.8, 0))
    x = np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
    return x if rgb else x[..., 0]


@pytest.fixture()
def mff_data(tmp_path):
    src = tmp_path / "sharp"
    src.mkdir()
    for i in range(2):
        Image.fromarray(_img(i)).save(src / f"im{i}.png")
    ds = tmp_path / "mff" / "Synth"
    generate(src, ds, seed=0, max_radius=4)
    return tmp_path, ds


def _read(path):
    return list(csv.DictReader(open(path)))


def test_mff_with_gt_baselines_and_fused_dir(mff_data, capsys):
    root, ds = mff_data
    out = root / "out"
    rc = evaluate.main(["--task", "mff", "--pairs", str(ds), "--fused", f"oracle={ds / 'GT'}", "--fused", "average",
                        "--baseline", "focus", "--metrics", "paper,CC", "--out", str(out), "--workers", "1"])
    assert rc == 0
    rows = _read(out / "per_image.csv")
    assert set(rows[0]) == {"image", "method", "metric", "value"}
    got = {(r["image"], r["method"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("im0", "oracle", "PSNR_gt")] == float("inf")
    assert got[("im0", "oracle", "SSIM_gt")] == pytest.approx(1.0)
    # A focus-measure rule must beat plain averaging against the all-in-focus truth.
    for im in ("im0", "im1"):
        assert got[(im, "focus", "PSNR_gt")] > got[(im, "average", "PSNR_gt")]
    summary = _read(out / "summary.csv")
    assert [r["method"] for r in summary] == ["oracle", "average", "focus"]
    md = (out / "summary.md").read_text()
    assert "PSNR_gt ↑" in md and "**" in md and "<u>" in md
    assert sorted(p.name for p in (out / "compare").iterdir()) == ["im0.png", "im1.png"]
    assert (out / "fused" / "focus" / "Synth" / "im0.png").is_file()
    grid = Image.open(out / "compare" / "im0.png")
    assert grid.width > 5 * 64  # A, B, GT and three methods side by side


def test_summary_means_and_ranking(mff_data):
    root, ds = mff_data
    out = root / "o2"
    assert evaluate.main(["--task", "mff", "--pairs", str(ds), "--baseline", "average", "--baseline", "maxabs",
                          "--metrics", "MSE,SSIM", "--out", str(out), "--workers", "2", "--no-compare"]) == 0
    rows = _read(out / "per_image.csv")
    mean = np.mean([float(r["value"]) for r in rows if r["method"] == "average" and r["metric"] == "MSE"])
    s = {r["method"]: r for r in _read(out / "summary.csv")}
    assert float(s["average"]["MSE"]) == pytest.approx(mean)
    best_mse = min(s, key=lambda m: float(s[m]["MSE"]))
    line = next(l for l in (out / "summary.md").read_text().splitlines() if l.startswith(f"| {best_mse} |"))
    assert line.split("|")[2].strip().startswith("**")  # lower MSE is better: bold
    assert not (out / "compare").exists()


def test_task_folder_with_several_datasets(tmp_path):
    for d, n in (("D1", 1), ("D2", 1)):
        for role, seed in (("ir", 0), ("vi", 1)):
            (tmp_path / "ivf" / d / role).mkdir(parents=True)
            Image.fromarray(_img(seed + n, rgb=role == "vi")).save(tmp_path / "ivf" / d / role / f"x{d}.png")
    out = tmp_path / "out"
    assert evaluate.main(["--task", "ivf", "--pairs", str(tmp_path), "--baseline", "laplacian", "--metrics", "vifb",
                          "--color", "per-channel", "--out", str(out), "--workers", "1"]) == 0
    rows = _read(out / "per_image.csv")
    assert {r["image"] for r in rows} == {"D1/xD1", "D2/xD2"}
    assert {r["metric"] for r in rows} == set(evaluate_vifb_names())
    assert [r["dataset"] for r in _read(out / "summary.csv")] == ["D1", "D2", "ALL"]


def evaluate_vifb_names():
    from defusion_jax.metrics import SETS

    return SETS["vifb"]


@pytest.mark.parametrize("extra, message", [
    (["--fused", "x=/nonexistent"], "expected NAME=DIR"),
    (["--baseline", "nope"], "unknown baseline"),
    (["--metrics", "BOGUS"], "unknown metric"),
    (["--metrics", "CLIPIQA", "--baseline", "average"], "CLIP RN50 weights"),
    ([], "nothing to evaluate"),
])
def test_bad_input_is_one_line_exit_2(mff_data, capsys, extra, message):
    root, ds = mff_data
    rc = evaluate.main(["--task", "mff", "--pairs", str(ds), "--out", str(root / "bad")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_only_gt_metrics_without_gt_say_why(mff_data, capsys):
    root, ds = mff_data
    (root / "no_gt").mkdir()
    rc = evaluate.main(["--task", "mff", "--pairs", str(ds), "--out", str(root / "o"), "--baseline", "average",
                        "--metrics", "PSNR_gt", "--gt", str(root / "no_gt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "no metric left to compute (PSNR_gt not computed: no ground truth" in err[0], err


def test_wrong_roles_exit_2(mff_data, capsys):
    root, ds = mff_data
    assert evaluate.main(["--task", "ivf", "--pairs", str(ds), "--baseline", "average", "--out", str(root / "b")]) == 2
    assert "'ir/' and 'vi/'" in capsys.readouterr().err


def test_model_without_network_code_is_a_clear_error(mff_data, capsys, monkeypatch):
    root, ds = mff_data
    monkeypatch.setitem(sys.modules, "defusion_jax.api", None)  # import fails
    ckpt = root / "model.pth"
    ckpt.write_bytes(b"")
    rc = evaluate.main(["--task", "mff", "--pairs", str(ds), "--model", str(ckpt), "--out", str(root / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "defusion_jax.api" in err


def test_model_fusion_path_with_a_stub(mff_data, monkeypatch):
    root, ds = mff_data
    seen = []

    def check(a, b, precision):  # the stored uint8 sources reach the network as the official padded [0, 1] canvas
        seen.append(a.shape)
        assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1

    _stub_model(monkeypatch, check=check)
    ckpt = root / "model.pth"
    ckpt.write_bytes(b"")
    out = root / "m"
    assert evaluate.main(["--task", "mff", "--pairs", str(ds), "--model", str(ckpt), "--metrics", "PSNR_gt",
                          "--out", str(out), "--workers", "1", "--no-compare"]) == 0
    # 64 x 72 + 16 px reflect border on each side -> 96 x 112 (multiples of 16)
    assert seen == [(1, 96, 112, 3)] * 2, seen
    assert {r["method"] for r in _read(out / "per_image.csv")} == {"DeFusion++"}
    a, b = (np.asarray(Image.open(ds / d / "im1.png").convert("RGB")) for d in ("A", "B"))
    fused = np.asarray(Image.open(out / "fused" / "DeFusion++" / "Synth" / "im1.png"))
    np.testing.assert_array_equal(fused, np.maximum(a, b))  # cropped back to the pair, pixel for pixel


def _rows(ds, method, metric, values):
    return [{"dataset": ds, "image": f"im{i}", "method": method, "metric": metric, "value": v}
            for i, v in enumerate(values) if v is not None]


def test_incomplete_cells_are_flagged_and_not_ranked(tmp_path):
    from defusion_jax import report

    nan = float("nan")
    # 'partial' has one real value (image 0), a NaN (image 1) and nothing for image 2: its mean 0.9
    # would be the best SSIM, but over one image of three.
    rows = (_rows("D", "good", "SSIM", [0.5, 0.6, 0.7]) + _rows("D", "partial", "SSIM", [0.9, nan, None])
            + _rows("D", "bad", "SSIM", [0.3, 0.3, 0.3]))
    s = report.summarise(rows, {"D": 3})
    assert list(s.means) == ["D"]  # one dataset: no ALL row
    assert s.means["D"]["partial"]["SSIM"] == 0.9 and s.counts["D"]["partial"]["SSIM"] == 1
    assert s.nans["D"]["partial"]["SSIM"] == 1 and s.counts["D"]["good"]["SSIM"] == 3
    methods = ["good", "partial", "bad"]
    table = report.markdown_table(s, "D", methods, ["SSIM"]).splitlines()
    cell = {l.split("|")[1].strip(): l.split("|")[2].strip() for l in table[2:]}
    assert cell == {"good": "**0.6000**", "partial": "0.9000 (1/3)", "bad": "<u>0.3000</u>"}
    report.write_summary_csv(tmp_path / "s.csv", s, methods, ["SSIM"])
    got = list(csv.reader(open(tmp_path / "s.csv")))
    assert got[0] == ["dataset", "method", "SSIM", "n:SSIM"]
    assert [r[3] for r in got[1:]] == ["3", "1", "3"]
    md = report.write_summary_md(tmp_path / "s.md", s, methods, ["SSIM"], ["# t"])
    assert "partial / SSIM: 1/3 pairs (1 NaN, 1 not scored" in md
    assert "NaN for some images" in md and "SSIM (1 value)" in md


def test_all_row_counts_pairs_over_datasets():
    from defusion_jax import report

    rows = _rows("D1", "x", "CC", [0.1, 0.2]) + _rows("D2", "x", "CC", [0.4]) + _rows("D1", "y", "CC", [0.5, 0.5])
    s = report.summarise(rows, {"D1": 2, "D2": 1})
    assert list(s.means) == ["D1", "D2", "ALL"]
    assert s.expected["ALL"]["CC"] == 3 and s.counts["ALL"]["x"]["CC"] == 3
    assert s.means["ALL"]["x"]["CC"] == pytest.approx(0.7 / 3)  # mean over images, not of dataset means
    assert s.complete("ALL", "x", "CC") and not s.complete("ALL", "y", "CC")  # y has no D2 image
    assert "y / CC: D2 0/1" in "\n".join(report.coverage_notes(s, ["x", "y"], ["CC"]))


def test_inf_means_rank_first_and_small_values_keep_digits():
    from defusion_jax import report

    inf = float("inf")
    rows = (_rows("D", "oracle", "PSNR_gt", [inf, 30.0]) + _rows("D", "a", "PSNR_gt", [30.0, 31.0])
            + _rows("D", "b", "PSNR_gt", [20.0, 21.0]) + _rows("D", "a", "MSE", [0.001234, 0.001234])
            + _rows("D", "b", "MSE", [0.0, 0.0]) + _rows("D", "oracle", "MSE", [0.5, 0.5]))
    s = report.summarise(rows)
    lines = report.markdown_table(s, "D", ["oracle", "a", "b"], ["PSNR_gt", "MSE"]).splitlines()[2:]
    cells = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:4]] for l in lines}
    assert cells["oracle"][0] == "**inf**" and cells["a"][0] == "<u>30.5000</u>" and cells["b"][0] == "20.5000"
    assert cells["a"][1] == "<u>0.00123</u>" and cells["b"][1] == "**0**"  # lower MSE is better


def test_a_tall_thin_image_gives_a_compare_grid_of_bounded_size():
    """The whole image fits a 256 x 512 box (it was always 256 wide: 64,000 px high for 2000 x 8)."""
    from defusion_jax import report

    x = np.full((2000, 8, 3), 200, np.uint8)
    g = np.asarray(report.compare_grid([("ir", x), ("vi", x), ("m", x)]))
    assert g.shape == (22 + 512 + 4 + 256 + 4, 3 * 260 + 4, 3), g.shape
    row = g[22 + 100, 4:260]  # the strip (2 px wide for 512 px high), centred in its 256 px column
    drawn = np.flatnonzero(np.any(row != 255, axis=-1))
    assert len(drawn) == 2 and abs(drawn.mean() - 127.5) <= 1, drawn
    wide = np.asarray(report.compare_grid([("ir", x[:8, :1].repeat(2000, axis=1))] * 2))
    assert wide.shape[0] == 22 + 1 + 4 + 256 + 4  # a wide, short one keeps the full 256 px width


def test_tiny_pairs_get_a_compare_grid(tmp_path):
    from defusion_jax import report

    x = _img(0, h=7, w=7)
    t, l, s = report.pick_crop([x, x[..., 0]])
    assert (t, l, s) == (0, 0, 7)
    assert report.pick_crop([np.zeros((1, 5), np.uint8)] * 2)[2] == 1
    ds = tmp_path / "ivf" / "Tiny"
    for role, seed in (("ir", 0), ("vi", 1)):
        (ds / role).mkdir(parents=True)
        Image.fromarray(_img(seed, h=7, w=7, rgb=role == "vi")).save(ds / role / "t.png")
    out = tmp_path / "out"
    assert evaluate.main(["--task", "ivf", "--pairs", str(ds), "--baseline", "average", "--metrics", "CC,SSIM",
                          "--out", str(out), "--workers", "1"]) == 0
    assert Image.open(out / "compare" / "t.png").width > 3 * 7
    assert "SSIM" in (out / "summary.md").read_text()  # NaN below 11 px, reported rather than a crash


def _run(ds, out, *extra, metrics="PSNR,SSIM:mean,PSNR_gt"):
    return evaluate.main(["--task", "mff", "--pairs", str(ds), "--metrics", metrics, "--out", str(out),
                          "--workers", "1", "--no-compare", *extra])


def _no_traceback(err):
    assert "Traceback" not in err and "Error:" not in err.replace("error:", "")


def test_corrupt_or_mismatched_source_skips_the_pair(mff_data, capsys):
    root, ds = mff_data
    (ds / "A" / "im0.png").write_bytes(b"not a png")
    assert _run(ds, root / "o", "--baseline", "average") == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "Synth/im0: source: cannot read" in err
    assert {r["image"] for r in _read(root / "o" / "per_image.csv")} == {"im1"}
    md = (root / "o" / "summary.md").read_text()
    assert "1 pair skipped" in md and "Synth/im0" in md and "(2 pairs, 1 scored: Synth 1)" in md
    assert "Incomplete cells" not in md  # the remaining pair is the whole scored set
    Image.fromarray(_img(5, h=32, w=32)).save(ds / "A" / "im0.png")  # now readable, but another size
    assert _run(ds, root / "o2", "--baseline", "average") == 0
    assert "sources differ in size (32x32 vs 72x64); pair skipped" in capsys.readouterr().err


def test_corrupt_fused_image_skips_that_method_only(mff_data, capsys):
    root, ds = mff_data
    fused = root / "mine"
    fused.mkdir()
    (fused / "im0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.fromarray(np.asarray(Image.open(ds / "GT" / "im1.png"))).save(fused / "im1.png")
    assert _run(ds, root / "o", "--fused", f"mine={fused}", "--baseline", "average") == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "mine: Synth/im0: cannot read" in err
    s = {r["method"]: r for r in _read(root / "o" / "summary.csv")}
    assert s["mine"]["n:PSNR"] == "1" and s["average"]["n:PSNR"] == "2"
    md = (root / "o" / "summary.md").read_text()
    assert "1 method/image combination was skipped" in md and "(1/2)" in md


@pytest.mark.parametrize("bad_gt", ["corrupt", "size"])
def test_bad_gt_skips_gt_metrics_of_that_pair(mff_data, capsys, bad_gt):
    root, ds = mff_data
    if bad_gt == "corrupt":
        (ds / "GT" / "im0.png").write_bytes(b"garbage")
    else:
        Image.fromarray(_img(3, h=16, w=16)).save(ds / "GT" / "im0.png")
    assert _run(ds, root / "o", "--baseline", "average", "--baseline", "maxabs") == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    assert ("GT: cannot read" if bad_gt == "corrupt" else "GT is 16x16, sources are 72x64") in err
    got = {(r["image"], r["method"], r["metric"]) for r in _read(root / "o" / "per_image.csv")}
    assert ("im0", "average", "PSNR") in got and ("im0", "average", "PSNR_gt") not in got
    assert ("im1", "average", "PSNR_gt") in got
    md = (root / "o" / "summary.md").read_text()
    assert "GT unusable" in md and "**" in md  # N for GT metrics is the pairs with a usable GT: still ranked


def test_out_that_is_a_file_is_a_usage_error(mff_data, capsys):
    root, ds = mff_data
    f = root / "taken.txt"
    f.write_text("x")
    assert _run(ds, f, "--baseline", "average") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not a folder" in err[0]


def test_bad_clip_weights_fail_before_any_work(mff_data, capsys):
    root, ds = mff_data
    w = root / "rn50.pt"
    w.write_bytes(b"not weights")
    out = root / "o"
    assert _run(ds, out, "--baseline", "average", "--clip-weights", str(w), metrics="PSNR,CLIPIQA") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CLIPIQA: cannot load")
    assert not out.exists()  # nothing fused or scored first


def test_stem_matching_duplicates_and_case(mff_data, capsys):
    root, ds = mff_data
    fused = root / "mine"
    fused.mkdir()
    gt0 = Image.open(ds / "GT" / "im0.png")
    gt0.save(fused / "im0.png")
    gt0.save(fused / "im0.jpg", quality=50)
    Image.open(ds / "GT" / "im1.png").save(fused / "IM1.PNG")  # no exact stem: case-insensitive match
    assert _run(ds, root / "o", "--fused", f"mine={fused}") == 0
    err = capsys.readouterr().err
    assert "im0.jpg, im0.png share the stem 'im0'; using im0.jpg" in err
    got = {(r["image"], r["metric"]): float(r["value"]) for r in _read(root / "o" / "per_image.csv")}
    assert got[("im1", "PSNR_gt")] == float("inf")  # IM1.PNG is the GT itself
    assert got[("im0", "PSNR_gt")] < 60  # the JPEG was taken, as the warning says
    md = (root / "o" / "summary.md").read_text()
    assert "(2 pairs: Synth 2)" in md


def test_single_pair_is_singular(tmp_path):
    ds = tmp_path / "mef" / "One"
    for role, seed in (("under", 0), ("over", 1)):
        (ds / role).mkdir(parents=True)
        Image.fromarray(_img(seed)).save(ds / role / "x.png")
    assert evaluate.main(["--task", "mef", "--pairs", str(ds), "--baseline", "average", "--metrics", "CC",
                          "--out", str(tmp_path / "o"), "--workers", "1", "--no-compare"]) == 0
    assert "(1 pair: One 1)" in (tmp_path / "o" / "summary.md").read_text()


def test_ctrl_c_writes_what_was_scored_and_exits_130(mff_data, capsys, monkeypatch):
    root, ds = mff_data
    real, calls = evaluate.score_item, []

    def interrupted_on_second(job):
        calls.append(job["item"].stem)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(evaluate, "score_item", interrupted_on_second)
    out = root / "o"
    rc = evaluate.main(["--task", "mff", "--pairs", str(ds), "--baseline", "average", "--metrics", "PSNR,CC",
                        "--out", str(out), "--workers", "1", "--no-compare"])
    cap = capsys.readouterr()
    assert rc == 130 and "Traceback" not in cap.err
    assert cap.err.strip().splitlines()[-1].startswith("interrupted after 1 of 2 pairs; wrote")
    assert {r["image"] for r in _read(out / "per_image.csv")} == {"im0"}
    md = (out / "summary.md").read_text()
    assert "Interrupted after 1 of 2 pairs" in md and "Incomplete cells" not in md  # N is the pairs scored
    assert [r["n:PSNR"] for r in _read(out / "summary.csv")] == ["1"]


def test_pool_workers_leave_ctrl_c_to_the_parent():
    import signal

    old = signal.getsignal(signal.SIGINT)
    try:
        evaluate._ignore_sigint()  # the pool initializer
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def _stub_model(monkeypatch, meta=None, fail_at=None, check=None):
    """A stand-in network behind `load_model` (so evaluate's runner, padding and cropping are the real
    ones) that fuses by the maximum; returns the list of its calls."""
    calls = []

    class Stub:
        module = types.SimpleNamespace(patch=16)

        def __init__(self):
            self.meta = dict(meta or {})

        def fuse(self, a, b, direction, precision=None):
            calls.append(a.shape)
            if check is not None:
                check(a, b, precision)
            if fail_at is not None and len(calls) == fail_at:
                raise KeyboardInterrupt
            return np.maximum(a, b)

    monkeypatch.setitem(sys.modules, "defusion_jax.api", types.SimpleNamespace(load_model=lambda p: Stub()))
    return calls


def _model_run(ds, out, model, *extra):
    return evaluate.main(["--task", "mff", "--pairs", str(ds), "--model", str(model), "--metrics", "PSNR_gt",
                          "--out", str(out), "--workers", "1", "--no-compare", *extra])


def test_model_reruns_reuse_pngs_of_the_same_model_only(mff_data, monkeypatch, capsys):
    import os

    root, ds = mff_data
    ckpt, out = root / "model.pth", root / "m"
    ckpt.write_bytes(b"v1")
    precisions = []
    calls = _stub_model(monkeypatch, check=lambda a, b, precision: precisions.append(precision))
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 2
    first = _read(out / "per_image.csv")
    capsys.readouterr()
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 2  # nothing fused again
    assert "reused 2 of 2 fused images" in capsys.readouterr().err
    assert _read(out / "per_image.csv") == first
    (out / "fused" / "DeFusion++" / "Synth" / "im1.png").unlink()
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 3  # only the missing one
    src = ds / "A" / "im0.png"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # a source changed
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 4
    ckpt.write_bytes(b"v2, another model")
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 6  # all again
    assert "reused" not in capsys.readouterr().err.split("fusing with")[-1]
    assert _model_run(ds, out, ckpt, "--precision", "highest") == 0 and len(calls) == 6  # the default, named
    assert _model_run(ds, out, ckpt, "--precision", "bfloat16") == 0 and len(calls) == 8  # another precision
    assert precisions[-2:] == ["bfloat16"] * 2 and set(precisions[:-2]) == {"highest"}
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 10  # and back
    assert evaluate.main(["--task", "mff", "--pairs", str(ds), "--baseline", "average", "--precision", "bfloat16",
                          "--out", str(root / "b")]) == 2
    assert "there is no --model" in capsys.readouterr().err


def test_model_workdir_reuse_follows_the_checkpoint_step(mff_data, monkeypatch):
    root, ds = mff_data
    wd, out = root / "workdir", root / "m"
    wd.mkdir()
    calls = _stub_model(monkeypatch, {"step": 100, "source": str(wd / "checkpoints" / "100")})
    assert _model_run(ds, out, wd) == 0 and _model_run(ds, out, wd) == 0 and len(calls) == 2
    calls2 = _stub_model(monkeypatch, {"step": 200, "source": str(wd / "checkpoints" / "200")})
    assert _model_run(ds, out, wd) == 0 and len(calls2) == 2


def test_interrupted_png_write_is_never_reused(mff_data, monkeypatch, capsys):
    from PIL import Image as PILImage

    root, ds = mff_data
    ckpt, out = root / "model.pth", root / "m"
    ckpt.write_bytes(b"v1")
    calls = _stub_model(monkeypatch)
    real_save, n = PILImage.Image.save, []

    def save_then_ctrl_c(self, fp, *a, **k):
        n.append(fp)
        if len(n) == 2:  # the second PNG: half written, then Ctrl-C
            open(fp, "wb").write(b"\x89PNG\r\n\x1a\n")
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", save_then_ctrl_c)
    assert _model_run(ds, out, ckpt) == 130
    assert "Traceback" not in capsys.readouterr().err
    folder = out / "fused" / "DeFusion++" / "Synth"
    assert sorted(p.name for p in folder.iterdir()) == ["im0.png"]  # no partial file left under any name
    monkeypatch.setattr(PILImage.Image, "save", real_save)
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 3  # im0 reused, im1 fused again
    assert {r["image"] for r in _read(out / "per_image.csv")} == {"im0", "im1"}


def test_model_skips_a_pair_with_an_unreadable_source(mff_data, monkeypatch, capsys):
    root, ds = mff_data
    ckpt, out = root / "model.pth", root / "m"
    ckpt.write_bytes(b"v1")
    (ds / "B" / "im1.png").write_bytes(b"junk")
    calls = _stub_model(monkeypatch)
    assert _model_run(ds, out, ckpt) == 0 and len(calls) == 1
    err = capsys.readouterr().err
    assert "Synth/im1: source: cannot read" in err and "Traceback" not in err
    assert "1 pair skipped" in (out / "summary.md").read_text()
    loads = []  # a rerun left with the unreadable pair only must not load the network
    monkeypatch.setitem(sys.modules, "defusion_jax.api", types.SimpleNamespace(load_model=loads.append))
    assert _model_run(ds, out, ckpt) == 0 and loads == [] and len(calls) == 1  # im0 reused, im1 still unreadable
    assert "Synth/im1: source: cannot read" in capsys.readouterr().err


def test_clip_scorer_built_once_and_warnings_printed_once(mff_data, monkeypatch, capsys):
    root, ds = mff_data
    fused = root / "mine"
    fused.mkdir()
    for stem in ("im0", "im1"):
        Image.open(ds / "GT" / f"{stem}.png").save(fused / f"{stem}.png")
    Image.open(ds / "GT" / "im0.png").save(fused / "im0.bmp")
    built = []

    def fake_clip(weights):
        built.append(weights)
        return lambda img: float(img.mean())  # HxWx3 in [0,1]

    monkeypatch.setattr(evaluate, "load_clip", fake_clip)
    w = root / "rn50.pt"
    w.write_bytes(b"x")
    assert _run(ds, root / "o", "--fused", f"mine={fused}", "--clip-weights", str(w), metrics="CLIPIQA,CC") == 0
    assert built == [str(w)]
    rows = [r for r in _read(root / "o" / "per_image.csv") if r["metric"] == "CLIPIQA"]
    assert len(rows) == 2 and all(0 < float(r["value"]) < 1 for r in rows)
    assert capsys.readouterr().err.count("share the stem 'im0'") == 1  # scoring and CLIPIQA both looked it up

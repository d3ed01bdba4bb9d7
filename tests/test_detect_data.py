"""M3FD reading (VOC XML, layout, split, missing-data message), fixed-shape samples, generated
scenes, and the pycocotools evaluation / report on hand-computed cases."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defusion_jax.data import m3fd
from defusion_jax.data.sources import DataError
from defusion_jax.detection import evaluate as E

REPO = Path(__file__).resolve().parents[1]

XML = """<annotation><filename>00007.png</filename>
<size><width>1024</width><height>768</height><depth>3</depth></size>
<object><name>People</name><difficult>0</difficult>
  <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>30</xmax><ymax>80</ymax></bndbox></object>
<object><name>truck</name><bndbox><xmin>101</xmin><ymin>201</ymin><xmax>300.5</xmax><ymax>400</ymax></bndbox></object>
<object><name>Dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>
<object><name>Lamp</name><bndbox><xmin>50</xmin><ymin>50</ymin><xmax>49</xmax><ymax>60</ymax></bndbox></object>
</annotation>"""


def test_parse_voc_by_hand(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    ann = m3fd.parse_voc(p)
    assert (ann.width, ann.height) == (1024, 768)
    # 1-based xmin/ymin -> continuous; unknown class and the empty box left out; case-insensitive names.
    np.testing.assert_allclose(ann.boxes, [[10, 20, 30, 80], [100, 200, 300.5, 400]])
    np.testing.assert_array_equal(ann.classes, [0, 5])


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DataError) as e:
        m3fd.index_m3fd(tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("nowhere/Ir/NAME.png", "nowhere/Vis/NAME.png", "nowhere/Annotation/NAME.xml", "M3FD_Detection",
                 "--config.data.root"):
        assert part in msg, part


def test_missing_dataset_through_main_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "defusion_jax.main", "--config=configs/detect_m3fd.py",
                        f"--workdir={tmp_path / 'wd'}", f"--config.data.root={tmp_path / 'M3FD'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Ir/NAME.png" in errors[0] and "Traceback" not in r.stderr


def test_split_8_1_1_deterministic_and_override(tmp_path):
    names = [f"{i:05d}" for i in range(4200)]
    parts = {s: m3fd.split_names(names[::-1], s) for s in m3fd.SPLITS}
    assert [len(parts[s]) for s in m3fd.SPLITS] == [3360, 420, 420]
    assert sorted(sum(parts.values(), [])) == names  # disjoint and complete
    assert parts["test"] == m3fd.split_names(names, "test")  # input order does not matter
    assert parts["train"][:3] == [names[i] for i in np.random.default_rng(0).permutation(4200)[:3]]
    assert m3fd.split_names(names, "test", seed=1) != parts["test"]
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["00001.png", "00002"], "val": [], "test": ["00003"]}))
    assert m3fd.split_names(names, "train", split_file=str(f)) == ["00001", "00002"]
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "test.txt").write_text("00009\n00010\n")
    assert m3fd.split_names(names, "test", split_file=str(tmp_path / "meta")) == ["00009", "00010"]
    with pytest.raises(DataError, match="not in the data set"):
        m3fd.split_names(names[:5], "test", split_file=str(tmp_path / "meta"))


def test_prepare_resizes_flips_and_pads_by_hand():
    sample = {"ir": np.zeros((60, 80, 3), np.float32), "vi": np.zeros((60, 80, 3), np.float32),
              "boxes": np.array([[10, 6, 30, 36], [0, 0, 80, 60]], np.float32), "classes": np.array([2, 4])}
    out = m3fd.prepare(sample, (120, 160), max_boxes=3)
    np.testing.assert_allclose(out["boxes"], [[20, 12, 60, 72], [0, 0, 160, 120], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["valid"], [True, True, False])
    np.testing.assert_array_equal(out["classes"], [2, 4, 0])
    np.testing.assert_allclose(out["scale"], [2, 2])
    assert out["ir"].shape == (120, 160, 3)
    flipped = m3fd.prepare(sample, (120, 160), max_boxes=1, flip=True)  # x -> 160 - x; second box dropped
    np.testing.assert_allclose(flipped["boxes"], [[100, 12, 140, 72]])
    assert flipped["valid"].tolist() == [True]


def test_synthetic_scenes_need_both_modalities():
    a, b = m3fd.synthetic_pair(3), m3fd.synthetic_pair(3)
    np.testing.assert_array_equal(a["vi"], b["vi"])  # deterministic
    seen = {"ir_only": 0, "vi_only": 0}
    for seed in range(40):
        s = m3fd.synthetic_pair(seed)
        assert 2 <= len(s["boxes"]) <= 4 and s["ir"].shape == (128, 128, 3)
        assert (s["boxes"][:, :2] >= 0).all() and (s["boxes"][:, 2:] <= 128).all()
        for bx in s["boxes"].astype(int):
            x1, y1, x2, y2 = bx[0] + 2, bx[1] + 2, bx[2] - 2, bx[3] - 2
            hot = s["ir"][y1:y2, x1:x2, 0].max() > 0.42  # objects are >= 0.5, background <= ~0.35
            coloured = np.ptp(s["vi"][y1:y2, x1:x2], axis=-1).max() > 0.6  # saturated object colour
            seen["ir_only"] += hot and not coloured
            seen["vi_only"] += coloured and not hot
    assert seen["ir_only"] > 5 and seen["vi_only"] > 5


def test_m3fd_source_reads_the_layout(tmp_path):
    root = m3fd.write_synthetic_m3fd(tmp_path / "M3FD", 10, (64, 96))
    src = m3fd.M3FDSource(root, "test")
    assert len(src) == 1 and len(m3fd.M3FDSource(root, "train")) == 8
    name = src[0]
    raw = src.load(name)
    want = m3fd.synthetic_pair(int(name), (64, 96))
    assert raw["ir"].shape == raw["vi"].shape == (64, 96, 3)
    np.testing.assert_allclose(raw["boxes"], want["boxes"], atol=0.06)  # written with one decimal
    np.testing.assert_array_equal(raw["classes"], want["classes"])
    np.testing.assert_allclose(raw["vi"], want["vi"], atol=1 / 255)


# ---- evaluation ----------------------------------------------------------------------------------
def test_coco_evaluation_by_hand():
    names = ("a", "b")
    d = E.Detections(names)
    d.add("img1", 100, 100, [[0, 0, 10, 10]], [0], [[0, 0, 10, 6.2]], [0.9], [0])  # IoU .62 with its box
    r = d.evaluate()
    assert r["AP50"] == pytest.approx(100.0)
    assert r["AP"] == pytest.approx(30.0)  # matched at IoU .50, .55, .60 of ten thresholds
    assert r["per_class_AP50"]["a"] == pytest.approx(100.0) and math.isnan(r["per_class_AP50"]["b"])
    d.add("img2", 100, 100, [[20, 20, 50, 50]], [1], [[60, 60, 90, 90]], [0.8], [1])  # a miss for class b
    r = d.evaluate()
    assert r["per_class_AP50"]["b"] == pytest.approx(0.0) and r["AP50"] == pytest.approx(50.0)
    assert r["num_gt"] == {"a": 1, "b": 1} and r["num_images"] == 2


def test_coco_evaluation_ranking_by_hand():
    # Two boxes of one class; the higher-scored detection is a false positive: precision at recall
    # 0.5 and 1.0 is 1/2 and 2/3 -> interpolated precision 2/3 everywhere -> AP50 = 66.7.
    d = E.Detections(("a",))
    d.add("i", 100, 100, [[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0],
          [[80, 80, 90, 90], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [0, 0, 0])
    assert d.evaluate()["AP50"] == pytest.approx(100 * 2 / 3, abs=0.01)


def test_report_files(tmp_path):
    d = E.Detections(m3fd.CLASSES)
    d.add("x", 768, 1024, [[0, 0, 10, 10], [5, 5, 50, 50]], [0, 4], [[0, 0, 10, 10]], [0.9], [0])
    r = d.evaluate()
    paths = E.write_report(tmp_path, r, m3fd.CLASSES, "mine", "test")
    md = paths["markdown"].read_text()
    assert "| Method | People | Car | Bus | Lamp | Motor | Truck | AP50 | AP |" in md
    assert "| mine | 100.00 | n/a | n/a | n/a | 0.00 | n/a | 50.00 |" in md
    assert "DeFusion++ (paper, ViT-T) | 88.70" in md
    rows = E.read_report_csv(paths["csv"])
    assert rows[0]["method"] == "mine" and float(rows[0]["AP50"]) == pytest.approx(50.0)
    for name, vals in E.PAPER_TABLE4.items():  # the placement of the paper rows: AP50 = class mean
        assert np.mean(vals[:6]) == pytest.approx(vals[6], abs=0.01), name
    png = E.draw_boxes(np.zeros((32, 48, 3)), np.ones((32, 48, 3)), [[1, 1, 20, 20]], [0], [[2, 2, 21, 21]], [0.9],
                       [1], m3fd.CLASSES, tmp_path / "b.png")
    from PIL import Image

    assert Image.open(png).size[0] > 2 * 48

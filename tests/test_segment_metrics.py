"""Segmentation metrics against hand-computed confusion matrices (ignored pixels, absent classes)."""

import math

import numpy as np
import pytest

from defusion_jax import seg_metrics as sm


def test_hand_computed_confusion_and_scores():
    label = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 2]])  # the ignored pixel's prediction (2) must count nowhere
    cm = sm.confusion_matrix(pred, label, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])
    s = sm.scores(cm)
    # IoU: class 0 = 1 / (2 + 1 - 1); class 1 = 2 / (2 + 4 - 2); class 2 = 0 / (1 + 0 - 0)
    np.testing.assert_allclose(s["iou"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(s["acc"], [0.5, 1.0, 0.0])
    assert s["mIoU"] == pytest.approx(1 / 3)
    assert s["mAcc"] == pytest.approx(0.5)
    assert s["aAcc"] == pytest.approx(3 / 5)
    assert s["pixels"] == 5


def test_absent_classes():
    label = np.array([0, 0, 1, 1, 255, 7])  # 7 is outside [0, 4): ignored like 255
    pred = np.array([0, 3, 1, 1, 3, 3])  # class 3 never in the labels, predicted once on a counted pixel
    cm = sm.confusion_matrix(pred, label, 4)
    np.testing.assert_array_equal(cm, [[1, 0, 0, 1], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    s = sm.scores(cm)
    # class 2: no ground truth, never predicted -> NaN IoU and Acc, left out of the means;
    # class 3: no ground truth but one false positive -> IoU 0 (counts), Acc NaN (does not)
    assert math.isnan(s["iou"][2]) and math.isnan(s["acc"][2])
    assert s["iou"][3] == 0.0 and math.isnan(s["acc"][3])
    np.testing.assert_allclose(s["iou"][:2], [0.5, 1.0])
    assert s["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert s["mAcc"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["aAcc"] == pytest.approx(3 / 4)


def test_set_level_accumulation_is_not_a_mean_of_images():
    # two images: per-image IoU of class 1 would be 1.0 and 0.0 (mean 0.5); set-level it is 1/3
    l1, p1 = np.array([1, 0]), np.array([1, 0])
    l2, p2 = np.array([1, 1]), np.array([0, 0])
    cm = sm.confusion_matrix(p1, l1, 2) + sm.confusion_matrix(p2, l2, 2)
    np.testing.assert_array_equal(cm, sm.confusion_matrix(np.r_[p1, p2], np.r_[l1, l2], 2))
    assert sm.scores(cm)["iou"][1] == pytest.approx(1 / 3)


def test_everything_ignored_and_bad_predictions():
    s = sm.scores(sm.confusion_matrix(np.zeros(3), np.full(3, 255), 2))
    assert s["pixels"] == 0 and math.isnan(s["mIoU"]) and math.isnan(s["aAcc"])
    with pytest.raises(ValueError, match="predictions"):
        sm.confusion_matrix(np.array([5]), np.array([0]), 2)
    with pytest.raises(ValueError, match="shape"):
        sm.confusion_matrix(np.zeros(2), np.zeros(3), 2)


def test_table5_markdown_and_csv():
    s = sm.scores(np.array([[3, 1], [0, 0]]))  # class 1 absent but predicted once: IoU 0, Acc n/a
    md = sm.table5_markdown([("run", s)], ["bg", "car"])
    assert md.splitlines()[0] == "| Method | bg IoU | bg Acc | car IoU | car Acc | mIoU | mAcc |"
    assert md.splitlines()[2] == "| run | 75.00 | 75.00 | 0.00 | n/a | 37.50 | 75.00 |"
    csv = sm.table5_csv([("run", s)], ["bg", "car"]).splitlines()
    assert csv[1] == "run,75.00,75.00,0.00,n/a,37.50,75.00"
    long = sm.per_class_csv(s, ["bg", "car"]).splitlines()
    assert long[2] == "1,car,0.00,n/a,0,1"
    paper = sm.from_percent_row([10, 20, 30, 40, 20, 30], 2)
    np.testing.assert_allclose(paper["iou"], [0.1, 0.3])
    np.testing.assert_allclose(paper["acc"], [0.2, 0.4])

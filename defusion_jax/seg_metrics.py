"""Semantic-segmentation scores as Table 5 of the paper reports them (per-class IoU and Acc, mIoU, mAcc).

Conventions (those of mmsegmentation's `IoUMetric`, which the UPerHead setting of the paper uses):

- One confusion matrix is accumulated over the whole evaluation set (not averaged per image);
  rows are ground-truth classes, columns predicted classes.
- Pixels whose label is `ignore_index` (255 in MSRS) or otherwise outside [0, num_classes) count
  nowhere, whatever is predicted there.
- IoU_c = TP / (TP + FP + FN); Acc_c = TP / (TP + FN) (per-class recall, the "Acc" of Table 5);
  aAcc = sum TP / number of counted pixels.
- A class with no ground-truth pixel in the set has Acc = NaN, and IoU = NaN if it is never
  predicted either, but IoU = 0 if it is predicted somewhere (those are all false positives).
  mIoU and mAcc are means over the classes that are not NaN.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Mapping, Sequence

import numpy as np


def confusion_matrix(pred, label, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts: entry [g, p] = pixels of true class g predicted p.

    `pred` and `label` are integer arrays of the same shape (any number of images). Predictions
    outside [0, num_classes) are an error (a bug upstream), labels outside it are ignored.
    """
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    pred = pred.reshape(-1).astype(np.int64)
    label = label.reshape(-1).astype(np.int64)
    keep = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        keep &= label != ignore_index
    pred, label = pred[keep], label[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes}), got [{pred.min()}, {pred.max()}]")
    return np.bincount(label * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores(cm: np.ndarray) -> dict:
    """Per-class IoU and Acc (fractions, NaN where undefined), their NaN-skipping means, aAcc."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    union = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()

    def nanmean(x):
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else math.nan

    return {"iou": iou, "acc": acc, "mIoU": nanmean(iou), "mAcc": nanmean(acc),
            "aAcc": float(tp.sum() / total) if total else math.nan, "pixels": int(total),
            "gt_pixels": gt.astype(np.int64), "pred_pixels": predicted.astype(np.int64)}


# ---- report tables ---------------------------------------------------------------------------
def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100.0 * x:.2f}"


def table5_header(class_names: Sequence[str]) -> list[str]:
    cols = ["Method"]
    for name in class_names:
        cols += [f"{name} IoU", f"{name} Acc"]
    return cols + ["mIoU", "mAcc"]


def table5_row(method: str, s: Mapping) -> list[str]:
    row = [method]
    for i, a in zip(s["iou"], s["acc"]):
        row += [_pct(float(i)), _pct(float(a))]
    return row + [_pct(s["mIoU"]), _pct(s["mAcc"])]


def table5_markdown(rows: Sequence[tuple[str, Mapping]], class_names: Sequence[str]) -> str:
    """Table 5 layout: one row per method, IoU and Acc (percent) per class, then mIoU and mAcc."""
    header = table5_header(class_names)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, s in rows:
        lines.append("| " + " | ".join(table5_row(method, s)) + " |")
    return "\n".join(lines) + "\n"


def table5_csv(rows: Sequence[tuple[str, Mapping]], class_names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table5_header(class_names))
    for method, s in rows:
        w.writerow(table5_row(method, s))
    return buf.getvalue()


def per_class_csv(s: Mapping, class_names: Sequence[str]) -> str:
    """Long form: one line per class with IoU, Acc (percent) and pixel counts, then the means."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "class", "IoU", "Acc", "gt_pixels", "pred_pixels"])
    for k, name in enumerate(class_names):
        w.writerow([k, name, _pct(float(s["iou"][k])), _pct(float(s["acc"][k])), int(s["gt_pixels"][k]),
                    int(s["pred_pixels"][k])])
    for key in ("mIoU", "mAcc", "aAcc"):
        w.writerow(["", key, _pct(s[key]), "", "", ""])
    return buf.getvalue()


def from_percent_row(values: Sequence[float], num_classes: int) -> dict:
    """A published Table 5 row (IoU, Acc per class in percent, then mIoU, mAcc) as a `scores` dict."""
    v = np.asarray(values, dtype=np.float64) / 100.0
    if v.size != 2 * num_classes + 2:
        raise ValueError(f"expected {2 * num_classes + 2} numbers, got {v.size}")
    return {"iou": v[0:2 * num_classes:2], "acc": v[1:2 * num_classes:2], "mIoU": float(v[-2]), "mAcc": float(v[-1])}

"""COCO-style evaluation with pycocotools, Table-4 style reports (markdown + CSV), drawn boxes.

AP is COCO's mean over IoU 0.50:0.95 and AP50 the value at IoU 0.5 (area 'all', 100 detections per
image), both in percent like Table 4; per-class AP50 columns are read from the same COCOeval
precision array (iou index 0). A class without ground truth in the evaluated images has no AP ("n/a").
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from absl import logging

# Table 4 of the paper (M3FD test set, percent) for reference rows in the report.
PAPER_TABLE4 = {
    # name: (People, Car, Bus, Lamp, Motor, Truck, AP50, AP)
    "VIS (paper, ViT-B ViTDet)": (74.81, 89.46, 79.98, 85.46, 71.03, 82.28, 80.50, 47.97),
    "IR (paper, ViT-B ViTDet)": (86.31, 83.40, 79.31, 61.44, 72.37, 82.07, 77.49, 45.87),
    "DeFusion++ (paper, ViT-T)": (88.70, 90.13, 86.30, 81.55, 79.34, 84.57, 85.10, 51.01),
}
PAPER_NOTE = ("Paper rows: Table 4 of the paper. In the text extraction the VIS and IR rows are shifted (the "
              "IR Lamp value 61.44 sits in the VIS row); the placement used here is the one whose class mean "
              "equals the printed AP50 of each row (80.50, 77.49) and agrees with the text (DeFusion++ Motor "
              "79.34 is 6.97 above IR).")
SHORT_NAMES = {"Motorcycle": "Motor"}


class Detections:
    """Accumulates ground truth and detections image by image (original-image pixel coordinates)."""

    def __init__(self, class_names: Sequence[str]):
        self.class_names = tuple(class_names)
        self.images: list[dict] = []
        self.gt: list[dict] = []
        self.dt: list[dict] = []

    def add(self, name: str, height: int, width: int, gt_boxes, gt_classes, boxes, scores, classes) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": str(name), "height": int(height), "width": int(width)})
        for b, c in zip(np.asarray(gt_boxes, float).reshape(-1, 4), np.asarray(gt_classes).reshape(-1)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            self.gt.append({"id": len(self.gt) + 1, "image_id": image_id, "category_id": int(c) + 1,
                            "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
        for b, s, c in zip(np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores).reshape(-1),
                           np.asarray(classes).reshape(-1)):
            self.dt.append({"image_id": image_id, "category_id": int(c) + 1, "score": float(s),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})

    def coco_gt(self):
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = {"images": list(self.images), "annotations": list(self.gt),
                        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def evaluate(self) -> dict:
        """{'AP', 'AP50', 'AP75', 'per_class_AP50': {name: percent or nan}, 'per_class_AP', 'summary',
        'num_images', 'num_gt': {name: count}, 'num_detections'} (AP values in percent)."""
        from pycocotools.cocoeval import COCOeval

        k = len(self.class_names)
        num_gt = {n: sum(1 for g in self.gt if g["category_id"] == i + 1) for i, n in enumerate(self.class_names)}
        result = {"num_images": len(self.images), "num_gt": num_gt, "num_detections": len(self.dt)}
        if not self.dt or not self.gt:  # pycocotools cannot load an empty result list
            nan_or_zero = {n: (0.0 if num_gt[n] else math.nan) for n in self.class_names}
            return {**result, "AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class_AP50": dict(nan_or_zero),
                    "per_class_AP": dict(nan_or_zero), "summary": "no detections" if self.gt else "no ground truth"}
        gt = self.coco_gt()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            dt = gt.loadRes(list(self.dt))
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        prec = ev.eval["precision"]  # (iou T, recall R, class K, area A, maxDets M)

        def ap(p):
            p = p[p > -1]
            return float(np.mean(p)) * 100 if p.size else math.nan

        per50 = {n: ap(prec[0, :, i, 0, -1]) for i, n in enumerate(self.class_names[:k])}
        per = {n: ap(prec[:, :, i, 0, -1]) for i, n in enumerate(self.class_names[:k])}
        return {**result, "AP": float(ev.stats[0]) * 100, "AP50": float(ev.stats[1]) * 100,
                "AP75": float(ev.stats[2]) * 100, "per_class_AP50": per50, "per_class_AP": per,
                "summary": buf.getvalue().split("Accumulating")[-1].strip()}


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def write_report(out_dir, result: Mapping, class_names: Sequence[str], method: str, split: str,
                 extra_lines: Sequence[str] = (), paper_rows: bool = True, heading: str | None = None
                 ) -> dict[str, Path]:
    """detection_<split>.md (Table-4 layout, titled `heading` or '<split> split') and
    detection_<split>.csv (one row per method)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = [SHORT_NAMES.get(c, c) for c in class_names] + ["AP50", "AP"]
    row = [result["per_class_AP50"][c] for c in class_names] + [result["AP50"], result["AP"]]
    rows = [(method, row)]
    with_paper = paper_rows and tuple(class_names) == ("People", "Car", "Bus", "Lamp", "Motorcycle", "Truck")
    if with_paper:
        rows += [(k, list(v)) for k, v in PAPER_TABLE4.items()]
    md = [f"# Object detection, {heading or f'{split} split'}", "",
          f"Per-class AP50, AP50 and AP (COCO, IoU 0.50:0.95) in percent; {result['num_images']} images, "
          f"{sum(result['num_gt'].values())} ground-truth boxes, {result['num_detections']} detections.", "",
          "| Method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    md += ["| " + name + " | " + " | ".join(_fmt(v) for v in vals) + " |" for name, vals in rows]
    md += ["", "Ground-truth boxes per class: " + ", ".join(f"{c} {n}" for c, n in result["num_gt"].items())]
    if with_paper:
        md += ["", PAPER_NOTE]
    md += list(extra_lines)
    md += ["", "```", str(result.get("summary", "")), "```", ""]
    paths = {"markdown": out / f"detection_{split}.md", "csv": out / f"detection_{split}.csv"}
    paths["markdown"].write_text("\n".join(md))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "split"] + cols)
        for name, vals in rows:
            w.writerow([name, split] + ["" if (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" for v in vals])
    logging.info("detection report: %s", paths["markdown"])
    return paths


def read_report_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60)]


def draw_boxes(ir: np.ndarray, vi: np.ndarray, gt_boxes, gt_classes, boxes, scores, classes,
               class_names: Sequence[str], path, min_score: float = 0.3) -> Path:
    """PNG: infrared with the ground truth (white) | visible with detections >= min_score (class colours)."""
    from PIL import Image, ImageDraw

    def u8(x):
        return Image.fromarray((np.clip(np.asarray(x, np.float32), 0, 1) * 255).round().astype(np.uint8))

    left, right = u8(ir).convert("RGB"), u8(vi).convert("RGB")
    zoom = max(1, math.ceil(384 / max(left.size)))  # small (smoke) images are enlarged to stay legible
    if zoom > 1:
        left = left.resize((left.width * zoom, left.height * zoom), Image.NEAREST)
        right = right.resize((right.width * zoom, right.height * zoom), Image.NEAREST)
        gt_boxes, boxes = np.asarray(gt_boxes, float) * zoom, np.asarray(boxes, float) * zoom
    dl, dr = ImageDraw.Draw(left), ImageDraw.Draw(right)
    lw = max(1, round(min(left.size) / 200))
    for b, c in zip(np.asarray(gt_boxes).reshape(-1, 4), np.asarray(gt_classes).reshape(-1)):
        dl.rectangle([float(v) for v in b], outline=(255, 255, 255), width=lw)
        dl.text((float(b[0]) + 2, float(b[1]) + 1), class_names[int(c)], fill=(255, 255, 255))
    for b, s, c in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1),
                       np.asarray(classes).reshape(-1)):
        if s < min_score:
            continue
        col = PALETTE[int(c) % len(PALETTE)]
        dr.rectangle([float(v) for v in b], outline=col, width=lw)
        dr.text((float(b[0]) + 2, float(b[1]) + 1), f"{class_names[int(c)]} {s:.2f}", fill=col)
    canvas = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)), (0, 0, 0))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 4, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

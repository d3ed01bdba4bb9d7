"""Object detection fine-tuning on DeFusion++ fused features (paper Sec. 4.4.1, Table 4).

The backbone (encoder, CA decomposition, MFM encoder) and a ViTDet Faster R-CNN head
(`defusion_jax.detection.detector`: simple feature pyramid, RPN, RoIAlign, box head) train together
on M3FD IR/visible pairs with the Faster R-CNN losses; the shared trainer (`defusion_jax.train`) does
everything else. `config.modality` 'fused' feeds (IR, visible); 'ir' / 'vi' feed one image as both
views (the single-modality rows of Table 4).

Evaluation: every `config.eval_every` steps on `config.eval.split` (AP50 / AP into the metrics), and
at the end on every split of `config.eval.report_splits`, with pycocotools in original-image pixels.
The report goes to WORKDIR/report/: detection_<split>.md / .csv (Table 4 layout), detections_<split>.json
(COCO results) and boxes_<split>_<NAME>.png (IR + ground truth | visible + detections).

Re-evaluate a trained workdir without training:
    python -m defusion_jax.tasks.detect --workdir=DIR [--split=val]
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from defusion_jax import sharding as sh
from defusion_jax.data import m3fd, pipeline
from defusion_jax.detection import evaluate as E
from defusion_jax.detection.detector import DeFusionDetector, build_detector
from defusion_jax.tasks import (
    Task, as_dict, backbone_model_config, check_same_structure, restore_for_eval, trainer_keys, workdir_eval_main,
)

REPORT_DIR = "report"
ROW_NAMES = {"fused": "DeFusion++ (this run)", "ir": "IR only (this run)", "vi": "VIS only (this run)"}
LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


class DetectTask(Task):
    console_keys = LOSS_KEYS + ("roi/fg_cls_accuracy",)

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.image_size = tuple(int(s) for s in config.image_size)
        self.max_boxes = int(config.max_boxes)
        self.dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        d = as_dict(config.data)
        self.class_names = tuple(d.get("class_names") or (m3fd.SYNTHETIC_CLASSES if d.get("kind") == "synthetic"
                                                          else m3fd.CLASSES))
        m = backbone_model_config(config)
        m["head"] = {**dict(m.get("head") or {}), "num_classes": len(self.class_names)}
        m["modality"] = str(config.modality)
        self._model_cfg = m
        self.model: DeFusionDetector = build_detector({**m, "dtype": self.dtype})
        mult = 64 if self.model.head.top_block else 32
        if any(s % mult for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} must be a multiple of {mult} (patch 16 and the pyramid)")
        self.init_report: dict | None = None
        self._sources: dict[str, Any] = {}
        if not (config.get("init") or config.get("resume") or d.get("kind") == "synthetic"):
            logging.warning("no --config.init: the backbone starts from random weights, not from DeFusion++ "
                            "pretraining (the paper fine-tunes the pretrained backbone)")

    # ---- model -------------------------------------------------------------------------------
    def init_params(self, rng):
        x = jnp.zeros((1, 64, 64, 3), jnp.float32)  # parameter shapes do not depend on the size
        return self.model.init({"params": rng}, x, x, method=DeFusionDetector.initialize)["params"]

    def model_config(self) -> dict:
        cfg = json.loads(json.dumps(self._model_cfg, default=list))
        if cfg["backbone"].get("vit"):
            cfg["backbone"]["vit"].pop("remat", None)
        return {"detection": cfg, "class_names": list(self.class_names), "image_size": list(self.image_size)}

    def load_init_params(self, path: str, params_shape):
        """Backbone from a pretraining workdir / converted folder / official checkpoint
        (`segment.load_backbone`); the pyramid and heads as a from-scratch run of this config
        initialises them."""
        from defusion_jax.tasks.segment import load_backbone

        backbone, self.init_report = load_backbone(path, self._model_cfg["backbone"], params_shape["backbone"])
        # Only the heads are initialised here (what a from-scratch run gives them; see
        # DeFusionDetector.initialize_heads): no second compile of the whole model's init.
        dim = int(params_shape["backbone"]["enc_norm1"]["scale"].shape[0])
        fmap = jnp.zeros((1, 4, 4, dim), jnp.float32)
        params = jax.device_get(jax.jit(lambda r: self.model.init(
            {"params": r}, fmap, method=DeFusionDetector.initialize_heads)["params"])(trainer_keys(self.config)[0]))
        params["backbone"] = backbone
        return check_same_structure(params, params_shape, path)

    # ---- data --------------------------------------------------------------------------------
    def source(self, split: str):
        if split not in self._sources:
            self._sources[split] = m3fd.build_source(as_dict(self.config.data), split)
        return self._sources[split]

    def make_train_data(self, process_index: int, process_count: int):
        d = self.config.data
        src = self.source("train")
        for split in self._eval_splits():  # a missing split fails now, not after training
            self.source(split)
        logging.info("detection data (%s): %d training pairs; evaluation on %s", d.kind, len(src),
                     ", ".join(f"{s} ({len(self.source(s))})" for s in self._eval_splits()))
        transform = functools.partial(m3fd.train_transform, source=src, image_size=self.image_size,
                                      max_boxes=self.max_boxes, flip=bool(self.config.augment.flip))
        return pipeline.make_stream(src, global_batch=int(self.config.batch_size), process_index=process_index,
                                    process_count=process_count, seed=int(self.config.seed),
                                    num_threads=int(d.num_threads), prefetch=int(d.prefetch), transform=transform)

    def _eval_splits(self):
        e = self.config.eval
        return sorted({str(e.split)} | set(e.report_splits))

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, params, frozen, batch, rng, step):
        k_sample, k_drop = jax.random.split(rng)
        out = self.model.apply({"params": params}, batch["ir"].astype(jnp.float32), batch["vi"].astype(jnp.float32),
                               batch["boxes"], batch["classes"], batch["valid"],
                               deterministic=not bool(self.config.get("dropout", False)),
                               rngs={"sample": k_sample, "dropout": k_drop})
        loss = sum(out[k] for k in LOSS_KEYS)
        return loss, out

    # ---- evaluation --------------------------------------------------------------------------
    @functools.cached_property
    def _predict(self):
        def f(params, ir, vi):
            return self.model.apply({"params": params}, ir, vi, method=DeFusionDetector.predict)

        return jax.jit(f, out_shardings=sh.replicated(self.mesh))

    def run_eval(self, params, split: str, limit: int = 0, keep: int = 0):
        """(Detections accumulator, first `keep` (name, ir, vi, gt, det) examples). Every process runs it."""
        src = self.source(split)
        ndev = math.prod(self.mesh.shape[a] for a in sh.batch_axes(self.mesh))
        bs = -(-int(self.config.eval.batch_size) // ndev) * ndev
        n_total = len(src) if not limit else min(limit, len(src))
        acc = E.Detections(self.class_names)
        kept = []
        names = getattr(src, "names", None)

        def load(i):
            raw = src.load(src[i])
            return None if raw is None else (raw, m3fd.prepare(raw, self.image_size, self.max_boxes))

        with ThreadPoolExecutor(max(1, int(self.config.data.num_threads))) as pool:
            for start in range(0, n_total, bs):
                items = [x for x in pool.map(load, range(start, min(start + bs, n_total))) if x is not None]
                if not items:
                    continue
                n = len(items)
                x = {k: np.stack([it[1][k] for it in items] + [np.zeros_like(items[0][1][k])] * (bs - n))
                     for k in ("ir", "vi")}
                g = sh.global_batch([x[k][sh.process_rows(bs)] for k in ("ir", "vi")], self.mesh)
                with jax.set_mesh(self.mesh):
                    det = jax.device_get(self._predict(params, *g))
                for i, (raw, prep) in enumerate(items):
                    v = det["valid"][i]
                    sy, sx = prep["scale"]
                    boxes = det["boxes"][i][v] / np.asarray([sx, sy, sx, sy], np.float32)
                    h, w = raw["vi"].shape[:2]
                    name = raw.get("name") or (names[start + i] if names else str(start + i))
                    acc.add(name, h, w, raw["boxes"], raw["classes"], boxes, det["scores"][i][v],
                            det["classes"][i][v])
                    if len(kept) < keep:
                        kept.append((name, raw, boxes, det["scores"][i][v], det["classes"][i][v]))
        return acc, kept

    def evaluate(self, params, frozen, step: int) -> Mapping[str, float]:
        e = self.config.eval
        acc, _ = self.run_eval(params, str(e.split), limit=int(e.get("max_images", 0)))
        r = acc.evaluate()
        return {f"{e.split}/AP50": r["AP50"], f"{e.split}/AP": r["AP"]}

    def final_report(self, params, frozen, workdir: str) -> None:
        for split in self.config.eval.report_splits:
            t0 = time.perf_counter()
            acc, kept = self.run_eval(params, str(split), keep=int(self.config.eval.get("drawings", 4)))
            if jax.process_index() == 0:
                r = write_report(Path(workdir) / REPORT_DIR, acc, kept, class_names=self.class_names,
                                 modality=str(self.config.modality), split=str(split),
                                 data_kind=str(self.config.data.kind), init_report=self.init_report,
                                 step=int(self.config.total_steps))
                logging.info("detection report %s (%d images, %.1fs): AP50 %.2f, AP %.2f -> %s", split,
                             r["num_images"], time.perf_counter() - t0, r["AP50"], r["AP"], r["paths"]["markdown"])


def write_report(out: Path, acc: E.Detections, kept, *, class_names, modality: str, split: str, data_kind: str,
                 init_report: Mapping | None = None, step: int | None = None) -> dict:
    """Evaluate the accumulated detections; write the Table-4 markdown/CSV, COCO-format detections
    and drawn boxes under `out`. Returns the evaluation dict with 'paths'."""
    out.mkdir(parents=True, exist_ok=True)
    r = acc.evaluate()
    data = "generated scenes (overfitting check: evaluated on the training images)" if data_kind == "synthetic" \
        else "M3FD"
    extra = ["", f"Data: {data}. Modality: {modality}. Step: {step}. "
             f"Backbone init: {init_report['source'] if init_report else 'random / resumed'}."]
    synthetic = data_kind == "synthetic"
    paths = E.write_report(out, r, class_names, ROW_NAMES.get(modality, modality), split, extra,
                           paper_rows=not synthetic,
                           heading=f"{split} split of the generated scenes (every split is the training images)"
                           if synthetic else None)
    paths["detections"] = out / f"detections_{split}.json"
    paths["detections"].write_text(json.dumps({"images": acc.images, "categories": [
        {"id": i + 1, "name": n} for i, n in enumerate(class_names)], "detections": acc.dt}) + "\n")
    for name, raw, boxes, scores, classes in kept:
        E.draw_boxes(raw["ir"], raw["vi"], raw["boxes"], raw["classes"], boxes, scores, classes, class_names,
                     out / f"boxes_{split}_{name}.png")
    r["paths"] = paths
    return r


TASK = DetectTask


# ---- re-evaluation of a finished workdir ---------------------------------------------------------
def evaluate_workdir(workdir: str, split: str | None = None) -> dict:
    """Rebuild the task from WORKDIR/config.json, load the latest checkpoint's parameters and write
    the report for `split` (default: the config's report splits) into WORKDIR/report."""
    task, params, config, meta = restore_for_eval(workdir, "detect")
    results = {}
    for s in ([split] if split else list(config.eval.report_splits)):
        acc, kept = task.run_eval(params, s, keep=int(config.eval.get("drawings", 4)))
        results[s] = write_report(Path(workdir) / REPORT_DIR, acc, kept, class_names=task.class_names,
                                  modality=str(config.modality), split=s, data_kind=str(config.data.kind),
                                  init_report=task.init_report, step=meta.get("step"))
    return results


def main(argv=None) -> int:
    return workdir_eval_main(argv, "python -m defusion_jax.tasks.detect", __doc__.split("\n")[0], evaluate_workdir,
                             lambda results: [f"{s}: AP50 {r['AP50']:.2f}  AP {r['AP']:.2f}  -> "
                                              f"{r['paths']['markdown']}" for s, r in results.items()])


if __name__ == "__main__":
    sys.exit(main())

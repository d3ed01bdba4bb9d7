"""Semantic-segmentation fine-tuning on DeFusion++ fused features (paper Sec. 3.5, 4.4.2, Table 5).

The backbone (encoder, CA decomposition, MFM encoder) and a ViTDet simple feature pyramid + UPerHead
(`defusion_jax.models.seg_head`) are trained together with pixel-wise cross-entropy (ignore index
255) on MSRS IR/visible pairs; the shared trainer (`defusion_jax.train`) does everything else.
`config.modality` picks the input: 'fused' (IR, visible) or, for the single-modality rows of
Table 5, the same image as both views: 'ir' (IR, IR) or 'vi' (visible, visible).

Evaluation (every `config.eval_every` steps on up to `config.eval.max_images` images, and on the
whole split at the end) runs at full resolution; the report goes to WORKDIR/report/:
segmentation_table.md / .csv (Table 5 layout), per_class.csv, metrics.json (with the confusion
matrix) and overlays/NAME.png (visible | infrared | ground truth | prediction, MSRS palette).

Re-evaluate a trained workdir (e.g. on another split) without training:
    python -m defusion_jax.tasks.segment --workdir=DIR [--split=test]
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from defusion_jax import seg_metrics
from defusion_jax import sharding as sh
from defusion_jax.data import msrs_seg, pipeline
from defusion_jax.models.defusion import DeFusionPP
from defusion_jax.models.seg_head import DeFusionSeg, build_seg_model
from defusion_jax.params_io import CheckpointError, flatten, shape_mismatch, unflatten
from defusion_jax.tasks import (
    Task, as_dict, backbone_model_config, check_same_structure, restore_for_eval, trainer_keys, workdir_eval_main,
)

# (view 1, view 2) fed to the network; view 1 takes the infrared role of pretraining's MCUD.
MODALITIES = {"fused": ("ir", "vi"), "ir": ("ir", "ir"), "vi": ("vi", "vi")}
ROW_NAMES = {"fused": "DeFusion++", "ir": "IR", "vi": "VI"}

# Table 5 of the paper (MSRS test split, EVA ViT-B + UPerHead for IR/VI, DeFusion++ ViT-T + UPerHead):
# IoU, Acc per class in CLASS_NAMES order, then mIoU, mAcc (percent).
PAPER_TABLE5 = {
    "IR": (97.51, 99.13, 79.66, 84.91, 65.98, 81.46, 56.72, 64.89, 50.84, 61.13, 63.32, 75.85, 63.85, 68.66,
           46.45, 55.13, 60.68, 68.18, 65.00, 73.26),
    "VI": (97.66, 99.16, 82.73, 90.68, 46.99, 59.14, 59.46, 70.38, 54.74, 64.56, 68.00, 77.89, 76.19, 91.47,
           51.74, 66.90, 76.08, 79.24, 68.18, 77.71),
    "DeFusion++": (98.47, 99.28, 87.91, 93.49, 73.68, 85.93, 69.74, 80.60, 65.18, 76.27, 78.16, 87.21, 85.14,
                   91.75, 62.51, 72.79, 81.30, 86.56, 78.01, 85.99),
}
REPORT_DIR = "report"
_JIT_CACHE: dict = {}


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array, ignore_index: int = 255):
    """Mean pixel cross-entropy over pixels whose label is a class id (not `ignore_index`, not out of
    range), and the pixel accuracy over the same pixels. logits (B, H, W, C) float, labels (B, H, W)."""
    c = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < c)
    safe = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    ce = jnp.where(valid, nll, 0.0).sum() / n
    acc = ((jnp.argmax(logits, axis=-1) == labels) & valid).sum() / n
    return ce, {"seg/ce": ce, "seg/pixel_acc": acc, "seg/valid_frac": valid.mean()}


def transplant_backbone(source: Mapping, target: Mapping) -> tuple[dict, dict]:
    """Copy every backbone parameter of `target` (a DeFusionSeg 'backbone' tree of arrays or shapes) from `source`
    (a whole DeFusionPP tree: pretraining workdir, converted folder or official checkpoint).

    Returns (backbone tree, report). Pretraining parts that segmentation does not use (pixel heads,
    MFM decoder, multi-modal LP heads) are dropped and listed; a backbone parameter absent from
    `source`, or with another shape, is an error naming the first few."""
    src = flatten(source)
    dst = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(target)).items()}  # arrays or shapes
    problem = shape_mismatch({k: v.shape for k, v in src.items()}, {k: tuple(v.shape) for k, v in dst.items()},
                             extra_ok=True)
    if problem:
        raise ValueError(f"the checkpoint does not hold the backbone config.model.backbone describes: {problem}")
    out = unflatten({k: np.asarray(src[k], dtype=v.dtype) for k, v in dst.items()})
    modules = lambda keys: sorted({k.split("/")[0] for k in keys})  # noqa: E731
    dropped = [k for k in src if k not in dst]
    report = {"loaded": len(dst), "loaded_modules": modules(dst), "dropped": len(dropped),
              "dropped_modules": modules(dropped),
              "loaded_values": int(sum(int(np.prod(v.shape)) for v in dst.values()))}
    return out, report


def check_same_settings(source: DeFusionPP, backbone_cfg: Mapping) -> None:
    """Raise ValueError when the checkpoint's network (`load_model(path).module`) and the backbone
    `config.model.backbone` describes differ in settings no parameter shape shows (head counts,
    LayerNorm eps, position embedding): its weights would load into another function."""
    from defusion_jax.models.defusion import OFFICIAL_ENCODER, build_model
    from defusion_jax.models.vit import as_heads, vit_from_config

    def settings(m: DeFusionPP) -> dict:
        enc = vit_from_config(dict(OFFICIAL_ENCODER if m.vit is None else m.vit))
        return {"heads": m.heads, "eps": m.eps, "vit.heads": as_heads(enc.heads, enc.depth), "vit.eps": enc.eps,
                "vit.posemb": enc.posemb}

    have, want = settings(source), settings(build_model(dict(backbone_cfg)))
    diff = [f"{k} {have[k]} (checkpoint) vs {want[k]} (config)" for k in have if have[k] != want[k]]
    if diff:
        raise ValueError(f"the checkpoint's network differs from config.model.backbone in {'; '.join(diff)}; set "
                         "config.model.backbone as the checkpoint's model.json has it")


def load_backbone(path: str, backbone_cfg: Mapping, backbone_shape: Mapping) -> tuple[dict, dict]:
    """config.init for a model built on the DeFusion++ backbone (segmentation, detection): the
    backbone parameters (`transplant_backbone` into `backbone_shape`, a tree of arrays or shapes) of
    a pretraining workdir, converted folder or official checkpoint whose network has the settings
    `backbone_cfg` describes (`check_same_settings`), and the transplant's report, also logged."""
    from defusion_jax.api import load_model

    loaded = load_model(path)
    check_same_settings(loaded.module, backbone_cfg)
    try:
        backbone, report = transplant_backbone(loaded.params, backbone_shape)
    except ValueError as e:
        raise CheckpointError(str(e)) from None  # main: one line, exit 2 (the trainer prefixes config.init=PATH)
    logging.info("config.init=%s: loaded %d backbone parameters (%s values) into %s; dropped %d pretraining "
                 "parameters of %s", path, report["loaded"], f"{report['loaded_values']:,}",
                 ", ".join(report["loaded_modules"]), report["dropped"], ", ".join(report["dropped_modules"]))
    return backbone, {"source": str(path), **report}


class SegmentTask(Task):
    console_keys = ("seg/ce", "seg/pixel_acc")

    def __init__(self, config, mesh):
        super().__init__(config, mesh)
        self.modality = str(config.modality)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {self.modality!r}")
        self.num_classes = int(config.num_classes)
        self.class_names = tuple(config.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.ignore_index = int(config.ignore_index)
        self.crop = tuple(int(s) for s in config.crop_size)
        self.dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        m = backbone_model_config(config)
        m["num_classes"] = self.num_classes
        self._model_cfg = m
        self.model: DeFusionSeg = build_seg_model({**m, "dtype": self.dtype})
        self.init_report: dict | None = None
        self._eval_src = None
        if not (config.get("init") or config.get("resume") or as_dict(config.data.get("synthetic"))):
            logging.warning("no --config.init: the backbone starts from random weights, not from DeFusion++ "
                            "pretraining (the paper fine-tunes the pretrained backbone)")

    # ---- model -------------------------------------------------------------------------------
    def init_params(self, rng):
        # Parameter shapes do not depend on the image size (fixed sin-cos tables, convolutions),
        # so initialise at the smallest size the pyramid takes.
        x = jnp.zeros((1, 32, 32, 3), jnp.float32)
        return self.model.init({"params": rng}, x, x)["params"]

    def _jitted(self, name: str, build):
        """One jitted function per (name, model config, dtype, mesh) in this process, so that tasks
        built again from the same config (re-evaluation, tests) reuse the compiled code."""
        key = (name, json.dumps(self._model_cfg, sort_keys=True, default=str), str(self.dtype), self.mesh)
        if key not in _JIT_CACHE:
            _JIT_CACHE[key] = build()
        return _JIT_CACHE[key]

    def init_head(self, rng):
        """Pyramid and UPerHead parameters only (no backbone forward to compile)."""
        dim = self.model.backbone_config.get("dim", DeFusionPP.dim)
        model = self.model
        fn = self._jitted("init_head", lambda: jax.jit(lambda k: model.init(
            {"params": k}, jnp.zeros((1, 2, 2, dim), jnp.float32), method=DeFusionSeg.head_logits)["params"]))
        return fn(rng)

    def model_config(self) -> dict:
        cfg = json.loads(json.dumps(self._model_cfg, default=list))
        if cfg["backbone"].get("vit"):
            cfg["backbone"]["vit"].pop("remat", None)
        return {"segmentation": cfg, "modality": self.modality, "class_names": list(self.class_names)}

    def load_init_params(self, path: str, params_shape):
        """Backbone from a pretraining workdir / converted folder / official checkpoint
        (`load_backbone`); the pyramid and head as a from-scratch run of this config initialises them."""
        backbone, self.init_report = load_backbone(path, self._model_cfg["backbone"], params_shape["backbone"])
        params = {**jax.device_get(self.init_head(trainer_keys(self.config)[0])), "backbone": backbone}
        return check_same_structure(params, params_shape, path)

    def _views(self, batch):
        a, b = MODALITIES[self.modality]
        return batch[a].astype(jnp.float32), batch[b].astype(jnp.float32)

    # ---- data --------------------------------------------------------------------------------
    def eval_source(self):
        if self._eval_src is None:
            self._eval_src = msrs_seg.build_seg_source(self.config.data, str(self.config.eval.split))
        return self._eval_src

    def make_train_data(self, process_index: int, process_count: int):
        d, a = self.config.data, self.config.augment
        src = msrs_seg.build_seg_source(d, "train")
        ev = self.eval_source()  # a missing test split fails now, not after training
        logging.info("segmentation data: %d training pairs, %d %s pairs for evaluation", len(src), len(ev),
                     self.config.eval.split)
        transform = functools.partial(msrs_seg.train_transform, source=src, crop=self.crop,
                                      scale=tuple(float(s) for s in a.scale), flip=bool(a.flip))
        return pipeline.make_stream(src, global_batch=int(self.config.batch_size), process_index=process_index,
                                    process_count=process_count, seed=int(self.config.seed),
                                    num_threads=int(d.num_threads), prefetch=int(d.prefetch), transform=transform)

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, params, frozen, batch, rng, step):
        x1, x2 = self._views(batch)
        logits = self.model.apply({"params": params}, x1, x2, deterministic=False, rngs={"dropout": rng})
        return cross_entropy_ignore(logits, batch["label"], self.ignore_index)

    # ---- pictures ----------------------------------------------------------------------------
    def panel(self, params, frozen, batch, rng):
        x1, x2 = self._views(batch)
        pred = jnp.argmax(self.model.apply({"params": params}, x1, x2), axis=-1)
        lut = jnp.asarray(msrs_seg.colorize(np.arange(256)), jnp.float32) / 255.0
        paint = lambda c: lut.at[c].get(**sh.like_batch(c, c.ndim + 1))  # noqa: E731
        return {"ir": batch["ir"].astype(jnp.float32), "vi": batch["vi"].astype(jnp.float32),
                "label": paint(batch["label"].astype(jnp.int32)), "prediction": paint(pred)}

    # ---- evaluation --------------------------------------------------------------------------
    @property
    def _predict(self):
        model = self.model

        def f(params, x1, x2):
            return jnp.argmax(model.apply({"params": params}, x1, x2), axis=-1).astype(jnp.uint8)

        return self._jitted("predict", lambda: jax.jit(f, out_shardings=sh.replicated(self.mesh)))

    def run_eval(self, params, limit: int = 0, keep: int = 0):
        """Confusion matrix over the evaluation split at full resolution, and the first `keep`
        (name, ir, vi, label, prediction) examples for overlays. Every process runs it."""
        src = self.eval_source()
        ndev = math.prod(self.mesh.shape[a] for a in sh.batch_axes(self.mesh))
        bs = int(self.config.eval.batch_size)
        bs = -(-bs // ndev) * ndev
        mult = 32 if 0.5 in tuple(self.model.pyramid_scales) else self.model.backbone_config.get("patch", 16)
        cm = np.zeros((self.num_classes, self.num_classes), np.int64)
        kept, n_img = [], 0
        for names, batch in msrs_seg.iter_eval_batches(src, bs, limit):
            n, h, w = batch["label"].shape
            ph, pw = -h % mult, -w % mult  # pad to the pyramid's multiple, crop the prediction back
            x = {k: np.pad(batch[k], ((0, bs - n), (0, ph), (0, pw), (0, 0)), mode="edge") for k in ("ir", "vi")}
            x1, x2 = self._views(x)
            g = sh.global_batch([np.asarray(a)[sh.process_rows(bs)] for a in (x1, x2)], self.mesh)
            with jax.set_mesh(self.mesh):
                pred = np.asarray(jax.device_get(self._predict(params, *g)))[:n, :h, :w]
            cm += seg_metrics.confusion_matrix(pred, batch["label"], self.num_classes, self.ignore_index)
            for i in range(min(n, keep - len(kept))):
                kept.append((names[i], batch["ir"][i], batch["vi"][i], batch["label"][i], pred[i]))
            n_img += n
        return cm, kept, n_img

    def evaluate(self, params, frozen, step: int) -> Mapping[str, float]:
        cm, _, n = self.run_eval(params, limit=int(self.config.eval.get("max_images", 0)))
        s = seg_metrics.scores(cm)
        return {"mIoU": s["mIoU"], "mAcc": s["mAcc"], "aAcc": s["aAcc"], "images": n}

    def final_report(self, params, frozen, workdir: str) -> None:
        t0 = time.perf_counter()
        cm, kept, n = self.run_eval(params, keep=int(self.config.eval.get("overlays", 6)))
        if jax.process_index() == 0:
            paths = write_report(Path(workdir) / REPORT_DIR, cm, kept, n_images=n, class_names=self.class_names,
                                 modality=self.modality, split=str(self.config.eval.split),
                                 synthetic=bool(as_dict(self.config.data.get("synthetic"))),
                                 init_report=self.init_report, step=int(self.config.total_steps))
            s = seg_metrics.scores(cm)
            logging.info("segmentation report (%d images, %.1fs): mIoU %.2f, mAcc %.2f, aAcc %.2f -> %s", n,
                         time.perf_counter() - t0, 100 * s["mIoU"], 100 * s["mAcc"], 100 * s["aAcc"], paths["table_md"])


def write_report(out: Path, cm: np.ndarray, kept, *, n_images: int, class_names, modality: str, split: str,
                 synthetic: bool, init_report: Mapping | None = None, step: int | None = None) -> dict:
    """Table 5 markdown and CSV, per-class CSV, metrics.json and overlay PNGs under `out`."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    s = seg_metrics.scores(cm)
    name = f"{ROW_NAMES[modality]} (this run)"
    rows = [(name, s)]
    if not synthetic and len(class_names) == 9:
        rows += [(f"{k} (paper)", seg_metrics.from_percent_row(v, 9)) for k, v in PAPER_TABLE5.items()]
    data = "synthetic scenes" if synthetic else "MSRS"
    head = (f"# Semantic segmentation, {data} {split} split ({n_images} images, full resolution)\n\n"
            f"Modality: {modality} (views {MODALITIES[modality][0]}, {MODALITIES[modality][1]}); step {step}; "
            f"aAcc {100 * s['aAcc']:.2f}. IoU / Acc per class, mIoU / mAcc in percent; n/a = class absent from "
            "the ground truth (Acc) and never predicted (IoU), left out of the means.\n\n")
    paths = {"table_md": out / "segmentation_table.md", "table_csv": out / "segmentation_table.csv",
             "per_class": out / "per_class.csv", "metrics": out / "metrics.json"}
    paths["table_md"].write_text(head + seg_metrics.table5_markdown(rows, class_names))
    paths["table_csv"].write_text(seg_metrics.table5_csv(rows, class_names))
    paths["per_class"].write_text(seg_metrics.per_class_csv(s, class_names))
    nan = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    metrics = {"mIoU": nan(s["mIoU"]), "mAcc": nan(s["mAcc"]), "aAcc": nan(s["aAcc"]), "images": n_images,
               "pixels": s["pixels"], "split": split, "modality": modality, "data": data, "step": step,
               "classes": list(class_names), "iou": [nan(float(v)) for v in s["iou"]],
               "acc": [nan(float(v)) for v in s["acc"]], "confusion_matrix": np.asarray(cm).tolist(),
               "init": dict(init_report) if init_report else None}
    paths["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    ov = out / "overlays"
    ov.mkdir(exist_ok=True)
    for nm, ir, vi, label, pred in kept:
        sep = np.full((vi.shape[0], 4, 3), 255, np.uint8)
        tiles = [(np.clip(vi, 0, 1) * 255).round().astype(np.uint8), (np.clip(ir, 0, 1) * 255).round().astype(np.uint8),
                 msrs_seg.overlay(vi, label), msrs_seg.overlay(vi, pred)]
        row = np.concatenate([t for tile in tiles for t in (tile, sep)][:-1], axis=1)
        Image.fromarray(row).save(ov / f"{nm}.png")
    paths["overlays"] = ov
    return paths


TASK = SegmentTask


# ---- re-evaluation of a finished workdir ---------------------------------------------------------
def evaluate_workdir(workdir: str, split: str | None = None) -> dict:
    """Rebuild the task from WORKDIR/config.json, load the latest checkpoint's parameters and write the
    report (to WORKDIR/report, or WORKDIR/report_<split> for another split)."""
    def use_split(config):
        if split:
            config.eval.split = split

    task, params, config, meta = restore_for_eval(workdir, "segment", use_split)
    cm, kept, n = task.run_eval(params, keep=int(config.eval.get("overlays", 6)))
    out = Path(workdir) / (REPORT_DIR if not split else f"{REPORT_DIR}_{split}")
    paths = write_report(out, cm, kept, n_images=n, class_names=task.class_names, modality=task.modality,
                         split=str(config.eval.split), synthetic=bool(as_dict(config.data.get("synthetic"))),
                         init_report=task.init_report, step=meta.get("step"))
    return {"scores": seg_metrics.scores(cm), "paths": paths}


def _summary(r) -> list[str]:
    s = r["scores"]
    return [f"mIoU {100 * s['mIoU']:.2f}  mAcc {100 * s['mAcc']:.2f}  aAcc {100 * s['aAcc']:.2f}  -> "
            f"{r['paths']['table_md']}"]


def main(argv=None) -> int:
    return workdir_eval_main(argv, "python -m defusion_jax.tasks.segment", __doc__.split("\n")[0], evaluate_workdir,
                             _summary)


if __name__ == "__main__":
    sys.exit(main())

"""The detector: DeFusion++ fused features -> simple feature pyramid -> RPN -> RoIAlign -> box head.

    IR x1, visible x2 -> DeFusionPP.features (encoder H -> CA decomposition -> MFM encoder) = f_x
      -> (B, H/16, W/16, D) map -> ViTDet simple feature pyramid (P2..P5) + max-pool P6 for the RPN
      -> RPN (shared 3x3 conv head over all levels, anchors of one size per level, 3 ratios)
      -> proposals: per-level pre-NMS top-k, NMS 0.7 per level, post-NMS top-k overall
      -> multi-level RoIAlign 7x7 -> box head (convs + FCs) -> K+1 classes, class-specific deltas
      -> inference: per-class scores > threshold, class-aware NMS 0.5, top detections

This is ViTDet's Faster R-CNN ("ROIHead" of Table 4, ref. [69] of the paper) with detectron2's
defaults where the paper says nothing. Every count is static (config), so one jitted program
trains and predicts any batch. `modality` 'ir' / 'vi' feeds that single image as both views of the
same network: the single-modality rows (VIS, IR) of Table 4 on our backbone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax.detection import losses as L
from defusion_jax.detection.anchors import grid_anchors, select_indices
from defusion_jax.detection.boxes import clip, decode, nonempty
from defusion_jax.detection.nms import nms, nms_mask
from defusion_jax.detection.roi_align import multilevel_roi_align
from defusion_jax.models.defusion import build_model
from defusion_jax.models.seg_head import SimpleFeaturePyramid
from defusion_jax.sharding import like_batch, reshape_batch, vmap_batch

MODALITIES = ("fused", "ir", "vi")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Every detection hyper-parameter (detectron2 / ViTDet names and defaults in comments)."""

    num_classes: int = 6
    pyramid_dim: int = 256  # FPN.OUT_CHANNELS
    pyramid_scales: tuple = (4.0, 2.0, 1.0, 0.5)  # P2..P5 from the stride-16 map
    top_block: bool = True  # P6 = max-pool(P5), RPN only (LastLevelMaxPool)
    anchor_sizes: tuple = (32, 64, 128, 256, 512)  # one size per level, finest first
    aspect_ratios: tuple = (0.5, 1.0, 2.0)
    rpn_convs: int = 2  # ViTDet: rpn head conv_dims [-1, -1]
    rpn_iou_thresholds: tuple = (0.3, 0.7)
    rpn_batch_size: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_nms_threshold: float = 0.7
    nms_method: str = "fixed_point"  # or 'loop' (nms.nms_mask): same result, different speed
    rpn_pre_nms_topk_train: int = 2000  # per level
    rpn_post_nms_topk_train: int = 1000  # per image
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_test: int = 1000
    roi_batch_size: int = 512
    roi_pos_fraction: float = 0.25
    roi_iou_threshold: float = 0.5
    pooler_resolution: int = 7
    sampling_ratio: int = 2  # detectron2 uses 0 (adaptive): data-dependent, not static
    box_head_convs: tuple = (256, 256, 256, 256)  # ViTDet 4conv1fc with LayerNorm
    box_head_fcs: tuple = (1024,)
    bbox_reg_weights: tuple = (10.0, 10.0, 5.0, 5.0)
    box_loss_beta: float = 0.0  # smooth-L1 beta; 0 = L1 (detectron2 default)
    score_threshold: float = 0.05
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    test_topk_candidates: int = 1000  # (proposal, class) pairs entering the final NMS

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> "HeadConfig":
        m = dict(m or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(m) - names
        if unknown:
            raise ValueError(f"unknown detection head config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in m.items()})

    def level_strides(self, patch: int = 16) -> list[float]:
        strides = [patch / s for s in self.pyramid_scales]
        if self.top_block:
            strides.append(strides[-1] * 2)
        return strides


def _channel_ln(name, eps=1e-6, dtype=jnp.float32):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)


class RPNHead(nn.Module):
    """Shared over levels: `convs` 3x3 conv + ReLU, then 1x1 objectness (A) and deltas (4A)."""

    num_anchors: int
    convs: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        init = nn.initializers.normal(0.01)  # detectron2 StandardRPNHead
        for i in range(self.convs):
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", kernel_init=init, dtype=self.dtype, name=f"conv{i}")(x))
        logits = nn.Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="objectness")(x)
        deltas = nn.Conv(4 * self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="deltas")(x)
        b, h, w, _ = x.shape
        return (reshape_batch(logits, (b, h * w * self.num_anchors)).astype(jnp.float32),
                reshape_batch(deltas, (b, h * w * self.num_anchors, 4)).astype(jnp.float32))


class BoxHead(nn.Module):
    """ViTDet's FastRCNNConvFCHead (3x3 convs with LayerNorm, then FCs) + FastRCNNOutputLayers."""

    num_classes: int
    convs: Sequence[int] = (256, 256, 256, 256)
    fcs: Sequence[int] = (1024,)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, c in enumerate(self.convs):
            x = nn.Conv(c, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
            x = nn.relu(_channel_ln(f"conv{i}_norm", dtype=self.dtype)(x))
        x = x.reshape(x.shape[0], -1)
        for i, c in enumerate(self.fcs):
            x = nn.relu(nn.Dense(c, dtype=self.dtype, name=f"fc{i}")(x))
        logits = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01), dtype=self.dtype,
                          name="cls_score")(x)
        deltas = nn.Dense(4 * self.num_classes, kernel_init=nn.initializers.normal(0.001), dtype=self.dtype,
                          name="bbox_pred")(x)
        return logits.astype(jnp.float32), deltas.reshape(-1, self.num_classes, 4).astype(jnp.float32)


class DeFusionDetector(nn.Module):
    """Faster R-CNN on DeFusion++ fused features. Parameters: `backbone` (the DeFusionPP sub-tree
    `features` uses, names as in pretraining), `pyramid`, `rpn_head`, `box_head`."""

    backbone_config: Mapping[str, Any] = None
    head: HeadConfig = HeadConfig()
    modality: str = "fused"
    direction: str = "q_view2"
    dtype: Any = jnp.float32

    def setup(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        h = self.head
        levels = len(h.pyramid_scales) + int(h.top_block)
        if len(h.anchor_sizes) != levels:
            raise ValueError(f"{len(h.anchor_sizes)} anchor sizes for {levels} pyramid levels")
        self.backbone = build_model({**dict(self.backbone_config or {}), "dtype": self.dtype})
        self.pyramid = SimpleFeaturePyramid(h.pyramid_dim, tuple(h.pyramid_scales), dtype=self.dtype)
        self.rpn_head = RPNHead(len(h.aspect_ratios), h.rpn_convs, self.dtype)
        self.box_head = BoxHead(h.num_classes, tuple(h.box_head_convs), tuple(h.box_head_fcs), self.dtype)

    # ---- features -------------------------------------------------------------------------------
    def pyramid_features(self, ir, vi, deterministic: bool = True):
        """[P2, ..., P5(, P6)] NHWC maps, finest first, from the fused features f_x."""
        x1, x2 = {"fused": (ir, vi), "ir": (ir, ir), "vi": (vi, vi)}[self.modality]
        b, hh, ww, _ = x1.shape
        p = self.backbone.patch
        f = self.backbone.features(x1, x2, self.direction, deterministic)
        fmap = f[:, 1:].reshape(b, hh // p, ww // p, f.shape[-1])
        feats = list(self.pyramid(fmap))
        if self.head.top_block:
            feats.append(nn.max_pool(feats[-1], (1, 1), strides=(2, 2), padding="VALID"))
        return feats

    def anchors(self, feats) -> list[np.ndarray]:
        strides = self.head.level_strides(self.backbone.patch)
        return [grid_anchors(f.shape[1], f.shape[2], s, (size,), self.head.aspect_ratios)
                for f, s, size in zip(feats, strides, self.head.anchor_sizes)]

    def rpn(self, feats):
        outs = [self.rpn_head(f) for f in feats]
        return [o[0] for o in outs], [o[1] for o in outs]

    # ---- proposals ------------------------------------------------------------------------------
    def proposals(self, logits, deltas, anchors, image_hw, train: bool):
        """Per image and level top-k -> decode, clip -> NMS per level -> top-k overall.

        logits/deltas: per level (B, N_l) / (B, N_l, 4). Returns boxes (B, P, 4), valid (B, P).
        """
        h = self.head
        pre = h.rpn_pre_nms_topk_train if train else h.rpn_pre_nms_topk_test
        post = h.rpn_post_nms_topk_train if train else h.rpn_post_nms_topk_test
        k = max(min(pre, a.shape[0]) for a in anchors)
        lv_boxes, lv_scores, lv_valid = [], [], []
        for lg, dl, an in zip(logits, deltas, anchors):
            kl = min(pre, an.shape[0])
            top, idx = jax.lax.top_k(jax.lax.stop_gradient(lg), kl)
            d = jnp.take_along_axis(jax.lax.stop_gradient(dl), idx[..., None], axis=1)
            boxes = clip(decode(d, jnp.asarray(an).at[idx].get(**like_batch(idx, idx.ndim + 1))), *image_hw)
            ok = nonempty(boxes) & jnp.isfinite(top) & jnp.all(jnp.isfinite(boxes), axis=-1)
            pad = k - kl  # levels padded to a common k so NMS can run over all of them at once
            lv_boxes.append(jnp.pad(boxes, ((0, 0), (0, pad), (0, 0))))
            lv_scores.append(jnp.pad(top, ((0, 0), (0, pad)), constant_values=-jnp.inf))
            lv_valid.append(jnp.pad(ok, ((0, 0), (0, pad))))
        boxes, scores, valid = (jnp.stack(v, axis=1) for v in (lv_boxes, lv_scores, lv_valid))  # (B, L, k, ...)
        level_nms = lambda b, s, v: nms_mask(b, s, v, h.rpn_nms_threshold, h.nms_method)  # noqa: E731
        keep = vmap_batch(jax.vmap(level_nms))(boxes, scores, valid)
        b_, l_ = boxes.shape[:2]
        flat_boxes = boxes.reshape(b_, l_ * k, 4)
        idx, ok = vmap_batch(lambda m, s: select_indices(m, s, min(post, l_ * k)))(
            keep.reshape(b_, -1), scores.reshape(b_, -1))
        return jnp.take_along_axis(flat_boxes, idx[..., None], axis=1), ok

    def roi_features(self, feats, boxes):
        """(B, R, 4) boxes -> (B, R, s, s, C) from the pyramid levels without P6 (ViTDet pooler)."""
        h = self.head
        levels = feats[:len(h.pyramid_scales)]
        strides = h.level_strides(self.backbone.patch)[:len(levels)]
        s = h.pooler_resolution
        return vmap_batch(lambda fs, b: multilevel_roi_align(fs, b, strides, (s, s), h.sampling_ratio))(levels, boxes)

    def box_predictions(self, feats, boxes):
        b, r = boxes.shape[:2]
        pooled = self.roi_features(feats, boxes)
        logits, deltas = self.box_head(pooled.reshape(b * r, *pooled.shape[2:]))
        return logits.reshape(b, r, -1), deltas.reshape(b, r, self.head.num_classes, 4)

    # ---- training -------------------------------------------------------------------------------
    def __call__(self, ir, vi, gt_boxes, gt_classes, gt_valid, deterministic: bool = False):
        """Training losses (dict of scalars) for a batch with padded ground truth (B, G, ...).

        Needs the 'sample' rng (anchor / RoI sampling) and, unless deterministic, 'dropout'.
        """
        h = self.head
        image_hw = ir.shape[1:3]
        feats = self.pyramid_features(ir, vi, deterministic)
        logits, deltas = self.rpn(feats)
        anchors = self.anchors(feats)
        bsz = ir.shape[0]
        k_rpn, k_roi = jax.random.split(self.make_rng("sample"))

        all_anchors = jnp.asarray(np.concatenate(anchors, axis=0))
        all_logits = jnp.concatenate(logits, axis=1)
        all_deltas = jnp.concatenate(deltas, axis=1)

        def rpn_one(key, lg, dl, gb, gv):
            pos, neg, tgt = L.rpn_targets(key, all_anchors, gb, gv, batch_size=h.rpn_batch_size,
                                          pos_fraction=h.rpn_pos_fraction, iou_thresholds=h.rpn_iou_thresholds)
            return L.rpn_losses(lg, dl, pos, neg, tgt, h.box_loss_beta) + (jnp.sum(pos),)

        obj, box, npos = vmap_batch(rpn_one)(jax.random.split(k_rpn, bsz), all_logits, all_deltas, gt_boxes, gt_valid)
        norm = float(h.rpn_batch_size * bsz)

        props, props_ok = self.proposals(logits, deltas, anchors, image_hw, train=True)
        tg = vmap_batch(lambda key, p, pv, gb, gc, gv: L.roi_targets(
            key, p, pv, gb, gc, gv, num_samples=h.roi_batch_size, pos_fraction=h.roi_pos_fraction,
            iou_threshold=h.roi_iou_threshold, weights=h.bbox_reg_weights))(
            jax.random.split(k_roi, bsz), props, props_ok, gt_boxes, gt_classes, gt_valid)
        cls_logits, box_deltas = self.box_predictions(feats, jax.lax.stop_gradient(tg["boxes"]))
        cls_loss, box_loss = vmap_batch(lambda a, b, c, d, e: L.roi_losses(a, b, c, d, e, h.box_loss_beta))(
            cls_logits, box_deltas, tg["labels"], tg["targets"], tg["valid"])
        fg = (tg["labels"] > 0) & tg["valid"]
        pred = jnp.argmax(cls_logits, axis=-1)
        return {
            "loss_rpn_cls": jnp.sum(obj) / norm,
            "loss_rpn_loc": jnp.sum(box) / norm,
            "loss_cls": jnp.mean(cls_loss),
            "loss_box_reg": jnp.mean(box_loss),
            "rpn/num_pos_anchors": jnp.mean(npos.astype(jnp.float32)),
            "roi/num_fg": jnp.mean(jnp.sum(fg, axis=1).astype(jnp.float32)),
            "roi/cls_accuracy": jnp.sum((pred == tg["labels"]) & tg["valid"]) / jnp.maximum(jnp.sum(tg["valid"]), 1),
            "roi/fg_cls_accuracy": jnp.sum((pred == tg["labels"]) & fg) / jnp.maximum(jnp.sum(fg), 1),
        }

    # ---- inference ------------------------------------------------------------------------------
    def predict(self, ir, vi):
        """Detections in input-pixel coordinates: boxes (B, D, 4), scores (B, D), classes (B, D)
        in 0..K-1, valid (B, D); D = detections_per_image, best first."""
        h = self.head
        image_hw = ir.shape[1:3]
        feats = self.pyramid_features(ir, vi, deterministic=True)
        logits, deltas = self.rpn(feats)
        props, props_ok = self.proposals(logits, deltas, self.anchors(feats), image_hw, train=False)
        cls_logits, box_deltas = self.box_predictions(feats, props)
        probs = jax.nn.softmax(cls_logits, axis=-1)[..., 1:]  # (B, P, K)
        k = h.num_classes
        boxes = clip(decode(box_deltas, props[:, :, None, :], h.bbox_reg_weights), *image_hw)  # (B, P, K, 4)

        def one(bx, pr, pv):
            p = pr.shape[0]
            bx = bx.reshape(p * k, 4)
            sc = pr.reshape(p * k)
            cls = jnp.tile(jnp.arange(k, dtype=jnp.int32), p)
            ok = jnp.repeat(pv, k) & (sc > h.score_threshold) & nonempty(bx)
            idx, ok2 = select_indices(ok, sc, min(h.test_topk_candidates, p * k))
            bx, sc, cls = bx[idx], sc[idx], cls[idx]
            keep, kv = nms(bx, sc, ok2, h.nms_threshold, min(h.detections_per_image, idx.shape[0]), groups=cls,
                           method=h.nms_method)
            return bx[keep], jnp.where(kv, sc[keep], 0.0), cls[keep], kv

        boxes, scores, classes, valid = vmap_batch(one)(boxes, probs, props_ok)
        d = h.detections_per_image - boxes.shape[1]
        if d > 0:  # fewer candidates than detections_per_image: pad
            boxes = jnp.pad(boxes, ((0, 0), (0, d), (0, 0)))
            scores, classes, valid = (jnp.pad(v, ((0, 0), (0, d))) for v in (scores, classes, valid))
        return {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid}

    def initialize_heads(self, fmap):
        """Create only the pyramid and head parameters, from a stand-in (B, h, w, D) feature map
        (with `init`, the same values as a whole-model init with the same rng: Flax derives each
        module's rng from its name path)."""
        feats = list(self.pyramid(fmap))
        if self.head.top_block:
            feats.append(nn.max_pool(feats[-1], (1, 1), strides=(2, 2), padding="VALID"))
        self.rpn(feats)
        b = fmap.shape[0]
        self.box_predictions(feats, jnp.tile(jnp.asarray([[[0.0, 0.0, 16.0, 16.0]]]), (b, 1, 1)))
        return feats

    def initialize(self, ir, vi):
        feats = self.pyramid_features(ir, vi)
        self.rpn(feats)
        b = ir.shape[0]
        self.box_predictions(feats, jnp.tile(jnp.asarray([[[0.0, 0.0, 16.0, 16.0]]]), (b, 1, 1)))
        return feats


def build_detector(cfg: Mapping[str, Any]) -> DeFusionDetector:
    """DeFusionDetector from {'backbone': DeFusionPP config, 'head': HeadConfig fields, 'modality',
    'direction', 'dtype'}; unknown keys fail loudly."""
    cfg = dict(cfg)
    unknown = set(cfg) - {"backbone", "head", "modality", "direction", "dtype"}
    if unknown:
        raise ValueError(f"unknown detector config keys: {sorted(unknown)}")
    dtype = cfg.get("dtype", jnp.float32)
    return DeFusionDetector(backbone_config=dict(cfg.get("backbone") or {}),
                            head=HeadConfig.from_mapping(cfg.get("head")), modality=cfg.get("modality", "fused"),
                            direction=cfg.get("direction", "q_view2"),
                            dtype=jnp.dtype(dtype) if isinstance(dtype, str) else dtype)


def init_detector(model: DeFusionDetector, rng, image_size: Sequence[int], batch: int = 1):
    x = jnp.zeros((batch, *image_size, 3), jnp.float32)
    return model.init({"params": rng}, x, x, method=DeFusionDetector.initialize)["params"]

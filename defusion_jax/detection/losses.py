"""Faster R-CNN training targets and losses (RPN and RoI box head), per image, static shapes.

Normalisation follows detectron2 (the ViTDet code base): RPN objectness and box losses are sums
over the sampled anchors divided by (anchors sampled per image x images); the RoI classification
loss is the mean cross-entropy over the sampled RoIs and the RoI box loss is summed over the
foreground RoIs and divided by the number of sampled RoIs. Box losses are smooth-L1 with
`beta` (detectron2's default beta = 0 is plain L1).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from defusion_jax.detection import anchors as A
from defusion_jax.detection.boxes import encode, pairwise_iou


def smooth_l1(x, beta: float = 0.0):
    """Elementwise smooth-L1 (Huber / beta); beta = 0 is |x|."""
    ax = jnp.abs(x)
    if beta <= 0:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def safe_boxes(boxes, valid):
    """Padding rows replaced by a unit box, so log-size deltas stay finite (they are masked out)."""
    return jnp.where(jnp.asarray(valid, bool)[..., None], jnp.asarray(boxes, jnp.float32),
                     jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32))


def rpn_targets(rng, anchors, gt_boxes, gt_valid, *, batch_size: int, pos_fraction: float,
                iou_thresholds: Sequence[float] = (0.3, 0.7)):
    """Anchor labels for one image: (pos (N,), neg (N,) sampled masks, box targets (N, 4) deltas).

    Matching: IoU >= 0.7 positive, < 0.3 negative, the best anchors of each box positive too
    (Faster R-CNN Sec. 3.1.2); then `batch_size` anchors with at most `pos_fraction` positives.
    """
    low, high = iou_thresholds
    gt_boxes = safe_boxes(gt_boxes, gt_valid)
    matched, labels = A.match_boxes(gt_boxes, gt_valid, anchors, high, low, allow_low_quality=True)
    pos, neg = A.sample_balanced(rng, labels, batch_size, pos_fraction)
    targets = encode(jnp.asarray(gt_boxes)[matched], anchors)
    return pos, neg, jnp.where(pos[:, None], targets, 0.0)


def rpn_losses(logits, deltas, pos, neg, targets, beta: float = 0.0):
    """Summed objectness BCE over sampled anchors and summed box loss over positives (one image)."""
    sampled = pos | neg
    bce = optax.sigmoid_binary_cross_entropy(logits, pos.astype(logits.dtype))
    obj = jnp.sum(jnp.where(sampled, bce, 0.0))
    box = jnp.sum(jnp.where(pos[:, None], smooth_l1(deltas - targets, beta), 0.0))
    return obj, box


def roi_targets(rng, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, *, num_samples: int,
                pos_fraction: float, iou_threshold: float = 0.5,
                weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0), append_gt: bool = True):
    """Sample `num_samples` RoIs for the box head from proposals (+ the ground truth boxes).

    Returns dict: boxes (R, 4), labels (R,) int32 (0 = background, 1..K = class + 1),
    targets (R, 4) deltas to the matched box, valid (R,) (False for padding when there are fewer
    usable candidates than `num_samples`).
    """
    gt_valid = jnp.asarray(gt_valid, bool)
    gt_boxes = safe_boxes(gt_boxes, gt_valid)
    if append_gt:
        cand = jnp.concatenate([proposals, gt_boxes], axis=0)
        cand_valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
    else:
        cand, cand_valid = proposals, proposal_valid
    matched, labels = A.match(pairwise_iou(gt_boxes, cand), gt_valid, iou_threshold)
    k1, k2 = jax.random.split(rng)
    pos, neg = A.sample_balanced(k1, labels, num_samples, pos_fraction, valid=cand_valid)
    # Foreground first, then background, random order within each; padding last.
    priority = jnp.where(pos, 2.0, jnp.where(neg, 1.0, 0.0)) + jax.random.uniform(k2, labels.shape)
    idx, ok = A.select_indices(pos | neg, priority, num_samples)
    boxes = cand[idx]
    fg = pos[idx] & ok
    cls = jnp.asarray(gt_classes, jnp.int32)[matched[idx]] + 1
    targets = encode(gt_boxes[matched[idx]], safe_boxes(boxes, ok), weights)
    return {"boxes": boxes, "labels": jnp.where(fg, cls, 0).astype(jnp.int32),
            "targets": jnp.where(fg[:, None], targets, 0.0), "valid": ok}


def roi_losses(class_logits, box_deltas, labels, targets, valid, beta: float = 0.0):
    """(classification loss mean over valid RoIs, box loss sum over foreground / valid count).

    class_logits (R, K + 1) with background at index 0; box_deltas (R, K, 4) class-specific.
    """
    n = jnp.maximum(jnp.sum(valid), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, labels)
    cls_loss = jnp.sum(jnp.where(valid, ce, 0.0)) / n
    fg = valid & (labels > 0)
    picked = jnp.take_along_axis(box_deltas, jnp.maximum(labels - 1, 0)[:, None, None], axis=1)[:, 0]
    box = jnp.sum(jnp.where(fg[:, None], smooth_l1(picked - targets, beta), 0.0)) / n
    return cls_loss, box

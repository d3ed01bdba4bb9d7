"""Anchors, anchor/proposal matching and balanced sampling, all with static shapes.

`grid_anchors` follows detectron2's `DefaultAnchorGenerator` (cell anchors centred on 0, shifted
by `stride * (x + offset)`), ordered (row, column, cell anchor) so that an RPN conv output of shape
(H, W, A) reshaped to (H * W * A,) lines up with it.

`match` is detectron2's `Matcher` (Faster R-CNN's assignment rule): every prediction takes its
highest-IoU ground-truth box; IoU < low -> background (0), low <= IoU < high -> ignored (-1),
IoU >= high -> foreground (1); with `allow_low_quality` every ground-truth box also claims the
predictions of maximal IoU with it (ties included), so no object is left without a positive.
Padded ground truth (valid = False) never matches anything.

`sample_balanced` draws a fixed-size subset with at most `pos_fraction` foreground (Faster R-CNN's
256-anchor / 512-RoI minibatches); selections are masks, so the shapes never depend on the data.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from defusion_jax.detection.boxes import pairwise_iou

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """(len(sizes) * len(ratios), 4) anchors centred on 0; ratio = height / width, area = size^2."""
    out = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = np.sqrt(size * size / ratio)
            h = ratio * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return np.asarray(out, np.float32)


def grid_anchors(height: int, width: int, stride: float, sizes: Sequence[float],
                 aspect_ratios: Sequence[float], offset: float = 0.0) -> np.ndarray:
    """All anchors of one feature level, (height * width * A, 4), row-major then cell anchor."""
    cells = cell_anchors(sizes, aspect_ratios)
    xs = (np.arange(width, dtype=np.float32) + offset) * stride
    ys = (np.arange(height, dtype=np.float32) + offset) * stride
    sy, sx = np.meshgrid(ys, xs, indexing="ij")
    shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
    return (shifts + cells[None]).reshape(-1, 4).astype(np.float32)


def match(iou, gt_valid, high: float, low: float | None = None, allow_low_quality: bool = False):
    """Assign predictions to ground truth from an IoU matrix (G, N) (ground truth x predictions).

    Returns (matched_gt (N,) int32, labels (N,) int32 in {1, 0, -1}). `low` defaults to `high`
    (no ignore band). Without any valid ground truth every prediction is background.
    """
    low = high if low is None else low
    iou = jnp.where(jnp.asarray(gt_valid)[:, None], jnp.asarray(iou, jnp.float32), -1.0)
    best = jnp.max(iou, axis=0)
    matched = jnp.argmax(iou, axis=0).astype(jnp.int32)
    labels = jnp.where(best >= high, FOREGROUND, jnp.where(best >= low, IGNORE, BACKGROUND))
    if allow_low_quality:
        per_gt = jnp.max(iou, axis=1, keepdims=True)
        # A box that overlaps nothing has no "best" prediction: without the > 0 guard every
        # prediction would tie at IoU 0 and all would turn positive.
        best_for_some_gt = jnp.any((iou == per_gt) & (per_gt > 0), axis=0)
        labels = jnp.where(best_for_some_gt, FOREGROUND, labels)
    return matched, labels.astype(jnp.int32)


def match_boxes(gt_boxes, gt_valid, boxes, high: float, low: float | None = None,
                allow_low_quality: bool = False):
    """`match` on the IoU of `boxes` (N, 4) with `gt_boxes` (G, 4)."""
    return match(pairwise_iou(gt_boxes, boxes), gt_valid, high, low, allow_low_quality)


def _rank(priority):
    """0 for the largest entry, 1 for the next, ... (ties broken by position)."""
    order = jnp.argsort(-priority, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def sample_balanced(rng, labels, num_samples: int, pos_fraction: float, valid=None):
    """Random foreground/background subset of fixed maximum size: (pos_mask, neg_mask) (N,) bool.

    At most int(num_samples * pos_fraction) foreground; background fills the rest of
    `num_samples` as far as it goes. `valid` (N,) excludes entries (padding) from both.
    """
    labels = jnp.asarray(labels)
    valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
    r = jax.random.uniform(rng, labels.shape)
    pos = (labels == FOREGROUND) & valid
    neg = (labels == BACKGROUND) & valid
    max_pos = int(num_samples * pos_fraction)
    pos_sel = pos & (_rank(jnp.where(pos, r, -1.0)) < max_pos)
    n_neg = num_samples - jnp.sum(pos_sel)
    neg_sel = neg & (_rank(jnp.where(neg, r, -1.0)) < n_neg)
    return pos_sel, neg_sel


def select_indices(mask, priority, k: int):
    """Indices of up to `k` entries where `mask` holds (highest priority first): (idx (k,), ok (k,))."""
    score = jnp.where(mask, priority, -jnp.inf)
    if k > score.shape[-1]:  # fewer entries than slots: the rest is padding
        score = jnp.pad(score, (0, k - score.shape[-1]), constant_values=-jnp.inf)
    top, idx = jax.lax.top_k(score, k)
    idx = jnp.minimum(idx, mask.shape[-1] - 1)
    return idx.astype(jnp.int32), jnp.isfinite(top)

"""Axis-aligned boxes (x1, y1, x2, y2) in continuous pixel coordinates: areas, IoU, delta coding.

Conventions are detectron2's (the ViTDet code base): width = x2 - x1 with no "+1", box centre =
x1 + width / 2, and the Faster R-CNN parameterisation of Ren et al. (paper ref. [69], Eq. 2):

    dx = wx (gx - ax) / aw,   dy = wy (gy - ay) / ah,   dw = ww log(gw / aw),   dh = wh log(gh / ah)

with per-stage weights (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the RoI box head. Every
function works on any leading batch shape and on numpy or jax arrays (it returns jax arrays).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# detectron2's clamp on dw/dh before exp(): boxes at most 1000/16 times larger than their anchor.
SCALE_CLAMP = math.log(1000.0 / 16)


def area(boxes):
    """(..., 4) -> (...); degenerate or inverted boxes have area 0."""
    b = jnp.asarray(boxes)
    return jnp.clip(b[..., 2] - b[..., 0], 0) * jnp.clip(b[..., 3] - b[..., 1], 0)


def pairwise_iou(a, b):
    """IoU of every box in `a` (..., N, 4) with every box in `b` (..., M, 4) -> (..., N, M).

    Pairs whose union is empty (two zero-area boxes) get IoU 0, not NaN.
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def _centre_size(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(targets, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """Deltas (..., 4) that turn `anchors` into `targets` (Faster R-CNN Eq. 2, detectron2 weights).

    Anchors must have positive width and height; targets too (log of the size ratio).
    """
    t, a = jnp.asarray(targets, jnp.float32), jnp.asarray(anchors, jnp.float32)
    wx, wy, ww, wh = weights
    tx, ty, tw, th = _centre_size(t)
    ax, ay, aw, ah = _centre_size(a)
    return jnp.stack([wx * (tx - ax) / aw, wy * (ty - ay) / ah,
                      ww * jnp.log(tw / aw), wh * jnp.log(th / ah)], axis=-1)


def decode(deltas, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), scale_clamp: float = SCALE_CLAMP):
    """Inverse of `encode`: apply deltas (..., 4) to anchors (..., 4) -> boxes (..., 4).

    dw, dh are clamped to `scale_clamp` before exp (detectron2), so a wild prediction cannot
    overflow; the clamp is why decode(encode(b)) == b only for boxes < 62.5x their anchor.
    """
    d, a = jnp.asarray(deltas, jnp.float32), jnp.asarray(anchors, jnp.float32)
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(a)
    cx = d[..., 0] / wx * aw + ax
    cy = d[..., 1] / wy * ah + ay
    w = jnp.exp(jnp.minimum(d[..., 2] / ww, scale_clamp)) * aw
    h = jnp.exp(jnp.minimum(d[..., 3] / wh, scale_clamp)) * ah
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def clip(boxes, height, width):
    """Clip (..., 4) boxes to the image [0, width] x [0, height]."""
    b = jnp.asarray(boxes, jnp.float32)
    return jnp.stack([jnp.clip(b[..., 0], 0, width), jnp.clip(b[..., 1], 0, height),
                      jnp.clip(b[..., 2], 0, width), jnp.clip(b[..., 3], 0, height)], axis=-1)


def nonempty(boxes, min_size: float = 0.0):
    """(...,) bool: width and height both > min_size (detectron2 `Boxes.nonempty`)."""
    b = jnp.asarray(boxes)
    return ((b[..., 2] - b[..., 0]) > min_size) & ((b[..., 3] - b[..., 1]) > min_size)

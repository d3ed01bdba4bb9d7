"""RoIAlign (Mask R-CNN), torchvision's `roi_align(..., aligned=True)` semantics, static shapes.

For every RoI and output bin, `sampling_ratio` x `sampling_ratio` points are bilinearly sampled
and averaged. With aligned=True the box is shifted by half a pixel (continuous coordinate x maps
to feature position x * scale - 0.5), so a box exactly covering feature cells samples their
centres. Points further than one cell outside the map contribute 0; points in the last half cell
clamp to the border (torchvision's `bilinear_interpolate`). The sampling ratio is fixed: torchvision's
adaptive default (ceil(roi_size / output_size)) would make the shapes depend on the data.

Both the bilinear weights and the out-of-map rule factor into a row part and a column part, so
each RoI needs four gathers of (rows x columns) points. The multi-level version puts all pyramid
levels into one flat table and gives every RoI its own level's size, offset and scale: one gather
per corner for all levels, nothing computed on levels a RoI does not use.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from defusion_jax.detection.boxes import area


def _axis_samples(start, length, bins: int, ratio: int, limit):
    """Per-RoI sample rows (or columns): indices (R, bins*ratio) low/high and their weights."""
    step = (length / bins)[:, None]
    k = jnp.arange(bins * ratio)
    pos = start[:, None] + (k // ratio) * step + ((k % ratio) + 0.5) * step / ratio
    limit = jnp.asarray(limit)[:, None]
    inside = (pos >= -1.0) & (pos <= limit)
    pos = jnp.maximum(pos, 0.0)
    low = jnp.floor(pos).astype(jnp.int32)
    edge = low >= limit - 1
    low = jnp.where(edge, limit - 1, low).astype(jnp.int32)
    high = jnp.where(edge, low, low + 1)
    frac = jnp.where(edge, 0.0, pos - low)
    return low, high, (1.0 - frac) * inside, frac * inside


def _roi_align_flat(flat, boxes, heights, widths, offsets, scales, output_size, sampling_ratio: int,
                    aligned: bool):
    """flat (N, C) features of one or more row-major maps; per-RoI map size/offset/scale (R,)."""
    ph, pw = output_size
    b = jnp.asarray(boxes, jnp.float32) * scales[:, None]
    if aligned:
        b = b - 0.5
    rw, rh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if not aligned:  # legacy Mask R-CNN: RoIs at least one cell
        rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
    y0, y1, wy0, wy1 = _axis_samples(b[:, 1], rh, ph, sampling_ratio, heights)
    x0, x1, wx0, wx1 = _axis_samples(b[:, 0], rw, pw, sampling_ratio, widths)
    out = 0.0
    for ys, wy in ((y0, wy0), (y1, wy1)):
        for xs, wx in ((x0, wx0), (x1, wx1)):
            idx = offsets[:, None, None] + ys[:, :, None] * widths[:, None, None] + xs[:, None, :]
            w = (wy[:, :, None] * wx[:, None, :])[..., None]
            out = out + w * flat[idx]
    r, c = out.shape[0], out.shape[-1]
    out = out.reshape(r, ph, sampling_ratio, pw, sampling_ratio, c)
    return out.mean(axis=(2, 4))


def roi_align(features, boxes, output_size: Sequence[int], spatial_scale: float, sampling_ratio: int = 2,
              aligned: bool = True):
    """RoIAlign on one map: features (H, W, C), boxes (R, 4) image coords -> (R, oh, ow, C)."""
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (the adaptive mode has data-dependent shapes)")
    h, w, c = features.shape
    r = jnp.asarray(boxes).shape[0]
    full = lambda v, dt: jnp.full((r,), v, dt)  # noqa: E731
    return _roi_align_flat(features.reshape(h * w, c), boxes, full(h, jnp.int32), full(w, jnp.int32),
                           full(0, jnp.int32), full(spatial_scale, jnp.float32), tuple(output_size),
                           sampling_ratio, aligned)


def assign_levels(boxes, num_levels: int, min_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4):
    """FPN's RoI-to-level rule (Lin et al., Eq. 1, detectron2 `assign_boxes_to_levels`): index
    0..num_levels-1 of floor(canonical_level + log2(sqrt(area) / canonical_size)), clamped."""
    size = jnp.sqrt(area(boxes))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    return (jnp.clip(level, min_level, min_level + num_levels - 1) - min_level).astype(jnp.int32)


def multilevel_roi_align(features: Sequence, boxes, strides: Sequence[float], output_size: Sequence[int],
                         sampling_ratio: int = 2, aligned: bool = True, canonical_size: float = 224.0,
                         canonical_level: int = 4):
    """RoIAlign over pyramid levels: features [(H_l, W_l, C)], strides [s_l] (powers of 2, finest
    first), boxes (R, 4) -> (R, oh, ow, C), each RoI pooled from its `assign_levels` level."""
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (the adaptive mode has data-dependent shapes)")
    import math

    min_level = int(round(math.log2(strides[0])))
    level = assign_levels(boxes, len(features), min_level, canonical_size, canonical_level)
    hs = jnp.asarray([f.shape[0] for f in features], jnp.int32)
    ws = jnp.asarray([f.shape[1] for f in features], jnp.int32)
    offs = jnp.asarray([0] + [f.shape[0] * f.shape[1] for f in features][:-1], jnp.int32).cumsum()
    scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)
    flat = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in features], axis=0)
    return _roi_align_flat(flat, boxes, hs[level], ws[level], offs[level], scales[level], tuple(output_size),
                           sampling_ratio, aligned)

"""Greedy non-maximum suppression with static shapes (a fixed-length masked loop).

A box is kept if it is valid and no higher-scored *kept* box overlaps it with IoU > threshold
(torchvision's `nms` criterion: strictly greater). The IoU matrix is computed once, N x N; callers
keep N bounded by a pre-NMS top-k. `nms_mask` has two exact implementations of that rule: a
fixed-length masked loop over the sorted boxes, and a fixed-point iteration (default, far fewer
sequential steps). `batched` NMS (per class, or per pyramid level) uses torchvision's coordinate
offset trick: boxes of different groups are moved apart so they can never overlap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from defusion_jax.detection.anchors import select_indices
from defusion_jax.detection.boxes import pairwise_iou


def nms_mask(boxes, scores, valid, iou_threshold: float, method: str = "fixed_point"):
    """(N,) bool: which of `boxes` (N, 4) greedy NMS keeps. Ties in score keep the lower index.

    Two exact implementations of the same greedy rule, over boxes sorted by score:
    - 'loop': `fori_loop` over the N boxes, each deciding keep / suppress in turn (N steps);
    - 'fixed_point' (default): iterate keep <- valid & not (any earlier kept box overlaps), starting
      from keep = valid, until nothing changes. The greedy result is the only fixed point (box i's
      decision depends only on boxes before it), and after t rounds the first t boxes are final, so it
      ends in at most N + 1 rounds; in practice in a few, each one matrix-vector product, which is
      much faster than N sequential steps on any accelerator.
    """
    scores = jnp.where(valid, scores, -jnp.inf)
    order = jnp.argsort(-scores, stable=True)
    b = jnp.asarray(boxes, jnp.float32)[order]
    ok = jnp.asarray(valid, bool)[order]
    n = b.shape[0]
    later = jnp.arange(n)
    overlap = (pairwise_iou(b, b) > iou_threshold) & (later[None, :] > later[:, None])  # i may suppress j > i
    if method == "loop":
        def body(i, state):
            keep, suppressed = state
            k = ok[i] & ~suppressed[i]
            return keep.at[i].set(k), suppressed | (k & overlap[i])

        keep_sorted, _ = jax.lax.fori_loop(0, n, body, (jnp.zeros(n, bool), jnp.zeros(n, bool)))
    elif method == "fixed_point":
        weights = overlap.astype(jnp.float32)

        def step(keep):
            return ok & ~((keep.astype(jnp.float32) @ weights) > 0)

        def cond(state):
            i, keep, prev = state
            return (i <= n) & jnp.any(keep != prev)

        def body(state):
            i, keep, _ = state
            return i + 1, step(keep), keep

        _, keep_sorted, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), step(ok), ok))
    else:
        raise ValueError(f"method must be 'fixed_point' or 'loop', got {method!r}")
    return jnp.zeros(n, bool).at[order].set(keep_sorted)


def offset_by_group(boxes, groups):
    """Shift every group's boxes into its own region (torchvision `batched_nms`)."""
    b = jnp.asarray(boxes, jnp.float32)
    span = jnp.max(jnp.abs(b)) + 1.0
    return b + (jnp.asarray(groups, jnp.float32) * 2.0 * span)[..., None]


def nms(boxes, scores, valid, iou_threshold: float, max_output: int, groups=None, method: str = "fixed_point"):
    """Greedy NMS -> (indices (max_output,) int32, valid (max_output,) bool), best score first.

    With `groups` (N,) int, boxes only suppress boxes of their own group (class-aware NMS).
    Padding entries of the output have valid False (their indices point at arbitrary boxes).
    """
    b = jnp.asarray(boxes, jnp.float32)
    if groups is not None:
        b = offset_by_group(b, groups)
    keep = nms_mask(b, scores, valid, iou_threshold, method)
    return select_indices(keep, jnp.asarray(scores, jnp.float32), max_output)

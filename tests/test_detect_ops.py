"""Detection building blocks against hand-computed cases and direct references: boxes and IoU,
delta coding, anchors, matching, balanced sampling, NMS, RoIAlign, training targets and losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from defusion_jax.detection import anchors as A
from defusion_jax.detection import boxes as B
from defusion_jax.detection import losses as L
from defusion_jax.detection import nms as N
from defusion_jax.detection import roi_align as R
from defusion_jax.detection.roi_align import assign_levels

# Jitted once per shape: eager op-by-op dispatch of these loops is far slower on a busy CPU.
nms_mask = jax.jit(N.nms_mask, static_argnums=(3, 4))
nms = jax.jit(N.nms, static_argnums=(3, 4))
roi_align = jax.jit(R.roi_align, static_argnums=(2, 3, 4, 5))
multilevel_roi_align = jax.jit(R.multilevel_roi_align, static_argnums=(2, 3, 4))


# ---- boxes ---------------------------------------------------------------------------------------
def test_pairwise_iou_by_hand():
    a = np.array([[0, 0, 2, 2], [0, 0, 0, 0]], np.float32)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 3, 3], [0, 0, 0, 0]], np.float32)
    iou = np.asarray(B.pairwise_iou(a, b))
    np.testing.assert_allclose(iou[0], [1 / 7, 1.0, 0.0, 0.0], atol=1e-7)
    np.testing.assert_array_equal(iou[1], [0, 0, 0, 0])  # empty union -> 0, not NaN
    assert B.area(np.array([[3, 3, 1, 1]])).item() == 0  # inverted box has no area


def test_encode_by_hand_and_decode_inverts():
    anchor = np.array([0, 0, 10, 20], np.float32)  # centre (5, 10), size 10 x 20
    np.testing.assert_allclose(B.encode(np.array([2, 4, 12, 24.0]), anchor), [0.2, 0.2, 0, 0], atol=1e-7)
    np.testing.assert_allclose(B.encode(np.array([0, 0, 20, 10.0]), anchor),
                               [0.5, -0.25, math.log(2), math.log(0.5)], atol=1e-6)
    np.testing.assert_allclose(B.encode(np.array([2, 4, 12, 24.0]), anchor, (10, 10, 5, 5)), [2, 2, 0, 0], atol=1e-6)
    rng = np.random.default_rng(0)
    anchors = np.concatenate([rng.uniform(0, 50, (64, 2)), rng.uniform(60, 120, (64, 2))], 1).astype(np.float32)
    targets = anchors + rng.uniform(-8, 8, (64, 4)).astype(np.float32)
    for w in ((1, 1, 1, 1), (10, 10, 5, 5)):
        np.testing.assert_allclose(B.decode(B.encode(targets, anchors, w), anchors, w), targets, atol=1e-3)


def test_decode_clamps_the_size_change():
    out = np.asarray(B.decode(np.array([0, 0, 50.0, 0]), np.array([0, 0, 10, 10.0])))
    np.testing.assert_allclose(out[2] - out[0], 10 * 1000 / 16, rtol=1e-5)  # exp(log(62.5)) * 10
    assert np.isfinite(out).all()


def test_clip_and_nonempty():
    np.testing.assert_array_equal(B.clip(np.array([[-5, 3, 200, 90.0]]), 80, 100), [[0, 3, 100, 80]])
    np.testing.assert_array_equal(B.nonempty(np.array([[0, 0, 1, 1], [0, 0, 0, 5], [3, 0, 2, 4.0]])),
                                  [True, False, False])


# ---- anchors, matching, sampling -----------------------------------------------------------------
def test_cell_and_grid_anchors_by_hand():
    c = A.cell_anchors((32,), (0.5, 1.0, 2.0))
    s = math.sqrt(2) * 16  # ratio 0.5: w = sqrt(32^2 / 0.5) = 45.25, h = 22.63
    np.testing.assert_allclose(c, [[-s, -s / 2, s, s / 2], [-16, -16, 16, 16], [-s / 2, -s, s / 2, s]], rtol=1e-6)
    g = A.grid_anchors(2, 3, 8, (16,), (1.0,))
    assert g.shape == (6, 4)
    np.testing.assert_allclose(g[:4], [[-8, -8, 8, 8], [0, -8, 16, 8], [8, -8, 24, 8], [-8, 0, 8, 16]])
    g2 = A.grid_anchors(2, 3, 8, (16, 32), (0.5, 1.0))  # (row, column, cell) order
    np.testing.assert_allclose(g2.reshape(2, 3, 4, 4)[1, 2], A.cell_anchors((16, 32), (0.5, 1.0)) + [16, 8, 16, 8])


GT = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32)
GT_VALID = np.array([True, True, False])
PRED = np.array([[0, 0, 10, 10],  # IoU 1 with gt 0                 -> fg
                 [0, 0, 10, 5],  # 0.5 with gt 0                     -> ignored (0.3..0.7)
                 [0, 0, 10, 2],  # 0.2                               -> bg
                 [22, 22, 30, 30],  # 0.64 with gt 1, its best       -> ignored, fg with low quality
                 [50, 50, 60, 60]],  # only overlaps the padded row  -> bg
                np.float32)


def test_match_by_hand():
    m, lab = A.match_boxes(GT, GT_VALID, PRED, 0.7, 0.3)
    np.testing.assert_array_equal(lab, [1, -1, 0, -1, 0])
    assert int(m[0]) == 0 and int(m[3]) == 1
    _, lab = A.match_boxes(GT, GT_VALID, PRED, 0.7, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [1, -1, 0, 1, 0])
    _, lab = A.match_boxes(GT, GT_VALID, PRED, 0.5)  # RoI head rule: >= 0.5 fg, else bg
    np.testing.assert_array_equal(lab, [1, 1, 0, 1, 0])


def test_match_low_quality_ties_and_no_ground_truth():
    # Both first boxes have IoU 0.8 with gt 1: tied best, both positive. Nothing touches gt 0, so
    # it claims no prediction (without the IoU > 0 guard all would tie at 0 and turn positive).
    pred = np.array([[20, 20, 28, 30], [22, 20, 30, 30], [100, 100, 105, 105]], np.float32)
    _, lab = A.match_boxes(GT, GT_VALID, pred, 0.9, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [1, 1, 0])
    far = np.array([[100, 100, 110, 110], [200, 200, 210, 210]], np.float32)
    _, lab = A.match_boxes(GT, GT_VALID, far, 0.7, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [0, 0])
    _, lab = A.match_boxes(GT, np.zeros(3, bool), PRED, 0.7, 0.3, allow_low_quality=True)
    np.testing.assert_array_equal(lab, [0] * 5)


def test_sample_balanced_counts():
    labels = jnp.asarray([1] * 10 + [0] * 100 + [-1] * 20)
    pos, neg = A.sample_balanced(jax.random.key(0), labels, 16, 0.25)
    assert int(pos.sum()) == 4 and int(neg.sum()) == 12
    assert not bool((pos & (labels != 1)).any()) and not bool((neg & (labels != 0)).any())
    pos2, _ = A.sample_balanced(jax.random.key(1), labels, 16, 0.25)
    assert not np.array_equal(pos, pos2)  # random subsets
    few = jnp.asarray([1, 1, 0, 0, 0, 0, 0, -1])
    pos, neg = A.sample_balanced(jax.random.key(0), few, 16, 0.25)
    assert int(pos.sum()) == 2 and int(neg.sum()) == 5  # short of both: everything usable
    pos, neg = A.sample_balanced(jax.random.key(0), few, 16, 0.25, valid=jnp.arange(8) != 0)
    assert int(pos.sum()) == 1 and not bool(pos[0])


# ---- NMS -----------------------------------------------------------------------------------------
NMS_BOXES = np.array([[0, 0, 10, 10],  # A .90
                      [1, 1, 11, 11],  # B .80  IoU(A, B) = 81/119 = .681, IoU(D, B) = 85.5/119.5 = .7155
                      [20, 20, 30, 30],  # C .70
                      [0, 0, 10, 10.5],  # D .95  IoU(D, A) = 100/105 = .952
                      [0, 0, 10, 10]], np.float32)  # E .99 but invalid
NMS_SCORES = np.array([0.9, 0.8, 0.7, 0.95, 0.99], np.float32)
NMS_VALID = np.array([True, True, True, True, False])


@pytest.mark.parametrize("method", ["fixed_point", "loop"])
def test_nms_by_hand(method):
    keep = np.asarray(nms_mask(NMS_BOXES, NMS_SCORES, NMS_VALID, 0.5, method))
    np.testing.assert_array_equal(keep, [False, False, True, True, False])  # D, C
    # At 0.72 B survives D (.7155) and A, which D suppressed, no longer counts against it.
    keep = np.asarray(nms_mask(NMS_BOXES, NMS_SCORES, NMS_VALID, 0.72, method))
    np.testing.assert_array_equal(keep, [False, True, True, True, False])
    idx, ok = nms(NMS_BOXES, NMS_SCORES, NMS_VALID, 0.72, 4)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [3, 1, 2])  # best score first
    np.testing.assert_array_equal(ok, [True, True, True, False])


@pytest.mark.parametrize("method", ["fixed_point", "loop"])
def test_nms_chain_by_hand(method):
    # Neighbours overlap (IoU 7/13 > .5), every second one does not (4/16): greedy keeps 0, drops 1,
    # keeps 2 (its only overlapping predecessor was dropped), ... -> every even box. The decision
    # travels down the whole chain, the worst case for the fixed-point iteration.
    boxes = np.array([[3 * i, 0, 3 * i + 10, 10] for i in range(21)], np.float32)
    keep = np.asarray(nms_mask(boxes, np.linspace(1, 0.1, 21), np.ones(21, bool), 0.5, method))
    np.testing.assert_array_equal(np.flatnonzero(keep), np.arange(0, 21, 2))


def test_nms_class_aware():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    idx, ok = N.nms(boxes, np.array([0.9, 0.8, 0.7]), np.ones(3, bool), 0.5, 3, groups=np.array([0, 1, 0]))
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [0, 1])


def _iou_np(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _greedy_nms_reference(boxes, scores, thr):
    """The textbook loop: take the best remaining box, drop everything overlapping it > thr."""
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if _iou_np(boxes[i], boxes[j]) <= thr]
    return sorted(keep)


@pytest.mark.parametrize("seed,method", [(0, "fixed_point"), (1, "fixed_point"), (0, "loop")])
def test_nms_matches_numpy_and_torchvision(seed, method):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1).astype(np.float32)
    scores = rng.permutation(60).astype(np.float32) / 60  # distinct scores: no tie conventions
    keep = np.flatnonzero(np.asarray(nms_mask(boxes, scores, np.ones(60, bool), 0.4, method)))
    np.testing.assert_array_equal(keep, _greedy_nms_reference(boxes, scores, 0.4))
    torchvision = pytest.importorskip("torchvision")
    import torch

    tv = torchvision.ops.nms(torch.tensor(boxes), torch.tensor(scores), 0.4).numpy()
    np.testing.assert_array_equal(keep, np.sort(tv))


# ---- RoIAlign ------------------------------------------------------------------------------------
def roi_align_reference(feat, boxes, out_hw, scale, ratio, aligned=True):
    """Direct per-sample loops: torchvision's roi_align CPU kernel written out in numpy."""
    h, w, c = feat.shape
    ph, pw = out_hw
    out = np.zeros((len(boxes), ph, pw, c), np.float64)

    def bilinear(y, x):
        if y < -1.0 or y > h or x < -1.0 or x > w:
            return np.zeros(c)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= h - 1:
            y0 = y1 = h - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= w - 1:
            x0 = x1 = w - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * feat[y0, x0] + (1 - ly) * lx * feat[y0, x1]
                + ly * (1 - lx) * feat[y1, x0] + ly * lx * feat[y1, x1])

    off = 0.5 if aligned else 0.0
    for r, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        sx, sy = x1 * scale - off, y1 * scale - off
        rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        for i in range(ph):
            for j in range(pw):
                acc = np.zeros(c)
                for iy in range(ratio):
                    for ix in range(ratio):
                        acc += bilinear(sy + i * bh + (iy + 0.5) * bh / ratio, sx + j * bw + (ix + 0.5) * bw / ratio)
                out[r, i, j] = acc / (ratio * ratio)
    return out


ROI_BOXES = np.array([[0, 0, 16, 16], [3.3, 2.1, 40.7, 30.2], [-10, -5, 5, 50], [30, 20, 45, 37],
                      [12, 12, 12.5, 13], [40, 30, 60, 44]], np.float32)


def test_roi_align_by_hand():
    # f = 1 + x + 10 y is linear, so every in-map bin is the value at its centre.
    f = (1 + np.arange(4)[None, :] + 10 * np.arange(4)[:, None]).astype(np.float32)[..., None]
    out = np.asarray(roi_align(f, np.array([[1, 1, 3, 3]], np.float32), (2, 2), 1.0, 2))[0, ..., 0]
    np.testing.assert_allclose(out, [[12, 13], [22, 23]], atol=1e-5)  # centres (1,1), (1,2), (2,1), (2,2)
    # Box [-2, -2, 0, 0] -> samples at -2 (outside: 0) and -1 (clamped to the corner f(0, 0) = 1).
    out = np.asarray(roi_align(f, np.array([[-2, -2, 0, 0]], np.float32), (1, 1), 1.0, 2))
    np.testing.assert_allclose(out.ravel(), [0.25], atol=1e-6)


@pytest.mark.parametrize("aligned,ratio,scale", [(True, 2, 0.25), (True, 3, 0.5), (False, 2, 0.25)])
def test_roi_align_matches_bilinear_reference(aligned, ratio, scale):
    feat = np.random.default_rng(0).normal(size=(9, 11, 3)).astype(np.float32)
    got = np.asarray(roi_align(feat, ROI_BOXES, (3, 4), scale, ratio, aligned))
    np.testing.assert_allclose(got, roi_align_reference(feat, ROI_BOXES, (3, 4), scale, ratio, aligned), atol=1e-5)


def test_roi_align_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    import torch

    feat = np.random.default_rng(1).normal(size=(2, 9, 11)).astype(np.float32)  # C, H, W
    want = torchvision.ops.roi_align(torch.tensor(feat)[None], [torch.tensor(ROI_BOXES)], (3, 4), spatial_scale=0.25,
                                     sampling_ratio=2, aligned=True).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(roi_align(feat.transpose(1, 2, 0), ROI_BOXES, (3, 4), 0.25, 2, True))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_level_assignment_and_multilevel_roi_align():
    sizes = np.array([224, 112, 448, 10, 2000], np.float32)
    lv = np.asarray(assign_levels(np.stack([0 * sizes, 0 * sizes, sizes, sizes], 1), 4, 2))
    np.testing.assert_array_equal(lv, [2, 1, 3, 0, 3])  # P4, P3, P5, clamped to P2 / P5
    rng = np.random.default_rng(2)
    feats = [rng.normal(size=(512 // s, 480 // s, 2)).astype(np.float32) for s in (4, 8, 16, 32)]
    boxes = np.array([[0, 0, 30, 30], [5, 5, 155, 155], [10, 0, 250, 240], [3, 4, 463, 504]], np.float32)
    got = np.asarray(multilevel_roi_align(feats, boxes, (4, 8, 16, 32), (2, 2), 2))
    assert np.abs(got).max() > 0.1
    levels = np.asarray(assign_levels(boxes, 4, 2))
    assert sorted(set(levels.tolist())) == [0, 1, 2, 3]
    for r, lvl in enumerate(levels):
        want = roi_align_reference(feats[lvl], boxes[r:r + 1], (2, 2), 1 / (4 * 2**lvl), 2)
        np.testing.assert_allclose(got[r:r + 1], want, atol=1e-5)


# ---- targets and losses --------------------------------------------------------------------------
def test_roi_targets_label_and_encode_by_hand():
    props = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [60, 60, 70, 70], [0, 0, 5, 10]], np.float32)
    t = L.roi_targets(jax.random.key(0), props, np.ones(4, bool), GT, np.array([3, 1, 0]), GT_VALID,
                      num_samples=8, pos_fraction=0.5, append_gt=False)
    got = {tuple(np.asarray(b).round(3)): (int(c), np.asarray(d)) for b, c, d, v in
           zip(t["boxes"], t["labels"], t["targets"], t["valid"]) if v}
    assert set(got) == {tuple(map(float, p)) for p in props}  # 4 usable, 4 padding rows
    assert int(t["valid"].sum()) == 4
    assert got[(0.0, 0.0, 10.0, 10.0)][0] == 4 and got[(20.0, 20.0, 30.0, 30.0)][0] == 2  # class + 1
    assert got[(60.0, 60.0, 70.0, 70.0)][0] == 0 and got[(0.0, 0.0, 5.0, 10.0)][0] == 4  # IoU .5 -> fg
    # [0,0,5,10] -> [0,0,10,10]: dx = 10 * 2.5 / 5 = 5, dw = 5 * log 2; padded gt never matches.
    np.testing.assert_allclose(got[(0.0, 0.0, 5.0, 10.0)][1], [5, 0, 5 * math.log(2), 0], atol=1e-5)
    t = L.roi_targets(jax.random.key(0), props, np.ones(4, bool), GT, np.array([3, 1, 0]), GT_VALID,
                      num_samples=8, pos_fraction=0.5)
    # + the two valid ground-truth boxes: 5 foreground candidates, capped at 8 * 0.5, and 1 background
    assert int(t["valid"].sum()) == 5 and int((t["labels"] > 0).sum()) == 4


def test_roi_and_rpn_losses_by_hand():
    labels = jnp.asarray([2, 0, 1])
    logits = jnp.zeros((3, 3))
    deltas = jnp.zeros((3, 2, 4)).at[0, 1].set(jnp.asarray([1.0, -1, 0, 0])).at[2, 1].set(5.0)
    targets = jnp.zeros((3, 4))
    cls, box = L.roi_losses(logits, deltas, labels, targets, jnp.asarray([True, True, True]))
    np.testing.assert_allclose(cls, math.log(3), rtol=1e-6)
    np.testing.assert_allclose(box, 2 / 3, rtol=1e-6)  # |1| + |-1| on RoI 0's class-2 deltas / 3 RoIs
    obj, box = L.rpn_losses(jnp.zeros(4), jnp.ones((4, 4)), jnp.asarray([True, False, False, False]),
                            jnp.asarray([False, True, False, False]), jnp.zeros((4, 4)))
    np.testing.assert_allclose(obj, 2 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(box, 4.0)
    np.testing.assert_allclose(L.smooth_l1(jnp.asarray([0.5, 2.0]), 1.0), [0.125, 1.5])

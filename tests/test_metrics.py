"""Segmentation metrics against hand-computed cases and brute-force references."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_np.metrics import (DSB_THRESHOLDS, aggregate_instance_matches, boundary_f1,
                             boundary_map, boundary_scores, confusion_matrix, dice_per_class,
                             evaluate, iou_per_class, match_instances, overlap_table,
                             pixel_accuracy)


# -- brute-force references (plain Python loops) ----------------------------------------------------
def ref_confusion(pred, target, c, ignore_index=None):
    cm = [[0] * c for _ in range(c)]
    for p, t in zip(np.ravel(pred).tolist(), np.ravel(target).tolist()):
        if ignore_index is not None and t == ignore_index:
            continue
        cm[t][p] += 1
    return np.array(cm)


def ref_scores(pred, target, c, ignore_index=None):
    """(dice, iou) per class from TP/FP/FN counted pixel by pixel; None when undefined."""
    dice, iou = [], []
    for k in range(c):
        tp = fp = fn = 0
        for p, t in zip(np.ravel(pred).tolist(), np.ravel(target).tolist()):
            if ignore_index is not None and t == ignore_index:
                continue
            tp += p == k and t == k
            fp += p == k and t != k
            fn += p != k and t == k
        dice.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)
        iou.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return dice, iou


def ref_boundary(mask):
    """Boundary pixels of one 2-D mask: in the mask, with a 4-neighbour inside the image and outside
    the mask (neighbours beyond the edge do not count)."""
    h, w = mask.shape
    out = set()
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and not mask[yy, xx]:
                    out.add((y, x))
                    break
    return out


def ref_boundary_counts(pred_mask, true_mask, tol):
    """Matched and total boundary pixels by explicit Euclidean distances, summed over a batch."""
    mp = np_ = mt = nt = 0
    for pm, tm in zip(pred_mask, true_mask):
        bp, bt = ref_boundary(pm), ref_boundary(tm)

        def near(a, others):
            return any(math.hypot(a[0] - o[0], a[1] - o[1]) <= tol for o in others)

        mp += sum(near(a, bt) for a in bp)
        mt += sum(near(a, bp) for a in bt)
        np_ += len(bp)
        nt += len(bt)
    return mp, np_, mt, nt


def ref_f1(mp, np_, mt, nt):
    p = mp / np_ if np_ else 1.0
    r = mt / nt if nt else 1.0
    return 2 * p * r / (p + r) if p + r else 0.0


def nan_equal(a, b):
    a = np.array([np.nan if v is None else v for v in a], dtype=float)
    return np.allclose(np.asarray(b, float), a, equal_nan=True, rtol=0, atol=1e-12)


# -- confusion matrix and pixel metrics -------------------------------------------------------------
def test_confusion_matrix_by_hand():
    pred = np.array([0, 1, 1, 2, 2, 0])
    target = np.array([0, 1, 2, 2, 0, 0])
    cm = confusion_matrix(pred, target, 3)
    # rows: true class, columns: predicted class
    assert cm.tolist() == [[2, 0, 1],
                           [0, 1, 0],
                           [0, 1, 1]]
    assert cm.dtype == np.int64


def test_dice_iou_accuracy_by_hand():
    """Target: a 4x4 square in an 8x8 image; prediction: the square moved right by one pixel."""
    target = np.zeros((8, 8), dtype=np.int64)
    target[2:6, 2:6] = 1
    pred = np.roll(target, 1, axis=1)
    # foreground: TP = 12, FP = 4, FN = 4 -> dice 24/32, IoU 12/20; background: TP = 44, FP = FN = 4
    assert np.allclose(dice_per_class(pred, target, 2), [88 / 96, 24 / 32])
    assert np.allclose(iou_per_class(pred, target, 2), [44 / 52, 12 / 20])
    assert pixel_accuracy(pred, target) == 56 / 64
    r = evaluate(pred, target, 2)
    assert r["dice_foreground"] == 0.75 and r["iou_foreground"] == 0.6
    assert math.isclose(r["dice"], (88 / 96 + 0.75) / 2)
    assert math.isclose(r["iou"], (44 / 52 + 0.6) / 2)
    assert r["pixel_accuracy"] == 0.875
    assert r["confusion_matrix"] == [[44, 4], [4, 12]]
    fg = r["per_class"][1]
    assert fg == {"class": 1, "dice": 0.75, "iou": 0.6, "precision": 0.75, "recall": 0.75,
                  "support": 16, "predicted": 16}


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = np.array([[0, 0], [1, 1]])
    pred = np.array([[0, 1], [1, 1]])
    d = dice_per_class(pred, target, 4)
    assert np.isnan(d[2]) and np.isnan(d[3])
    # class 0: TP 1, FN 1 -> 2/3; class 1: TP 2, FP 1 -> 4/5
    assert np.allclose(d[:2], [2 / 3, 4 / 5])
    r = evaluate(pred, target, 4)
    assert math.isclose(r["dice"], (2 / 3 + 4 / 5) / 2)
    assert "dice_foreground" not in r
    assert math.isnan(r["per_class"][3]["dice"]) and r["per_class"][3]["support"] == 0


def test_class_only_predicted_counts_as_zero():
    target = np.zeros((3, 3), dtype=int)
    pred = target.copy()
    pred[0, 0] = 2
    d = dice_per_class(pred, target, 3)
    assert d[2] == 0.0 and np.isnan(d[1])
    assert math.isclose(evaluate(pred, target, 3)["dice"], (16 / 17 + 0.0) / 2)


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, (2, 5, 6))
    r = evaluate(t, t, 3)
    assert r["dice"] == r["iou"] == r["pixel_accuracy"] == 1.0


def test_ignore_index():
    target = np.array([0, 1, 255, 1, 255])
    pred = np.array([0, 0, 1, 1, 7])  # predictions at ignored pixels are not checked
    cm = confusion_matrix(pred, target, 2, ignore_index=255)
    assert cm.tolist() == [[1, 0], [1, 1]]
    assert pixel_accuracy(pred, target, ignore_index=255) == 2 / 3
    assert evaluate(pred, target, 2, ignore_index=255)["pixel_accuracy"] == 2 / 3
    assert math.isnan(pixel_accuracy(pred[[2, 4]], target[[2, 4]], ignore_index=255))


def test_scores_are_reduced_by_argmax():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 4, 5))
    target = rng.integers(0, 3, (2, 4, 5))
    labels = logits.argmax(axis=1)
    assert np.array_equal(confusion_matrix(logits, target, 3), confusion_matrix(labels, target, 3))
    assert evaluate(logits, target, 3) == evaluate(labels, target, 3)
    with pytest.raises(ValueError, match="channels"):
        confusion_matrix(logits, target, 4)


def test_bad_input():
    t = np.zeros((2, 3), dtype=int)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((3, 2), dtype=int), t, 2)
    with pytest.raises(ValueError, match="label 2"):
        confusion_matrix(t + 2, t, 2)
    with pytest.raises(ValueError, match="label -1"):
        confusion_matrix(t, t - 1, 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(t.astype(float), t, 2)
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(t, t.astype(float), 2)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ValueError, match="num_classes"):
            confusion_matrix(t, t, bad)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_against_brute_force(c, n, h, w, use_ignore, seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, c, (n, h, w))
    pred = rng.integers(0, c, (n, h, w))
    ignore = None
    if use_ignore:
        ignore = 99
        target = np.where(rng.random((n, h, w)) < 0.2, 99, target)
    assert np.array_equal(confusion_matrix(pred, target, c, ignore), ref_confusion(pred, target, c, ignore))
    dice, iou = ref_scores(pred, target, c, ignore)
    assert nan_equal(dice, dice_per_class(pred, target, c, ignore))
    assert nan_equal(iou, iou_per_class(pred, target, c, ignore))
    r = evaluate(pred, target, c, ignore)
    present = [d for d in dice if d is not None]
    if present:
        assert math.isclose(r["dice"], sum(present) / len(present), abs_tol=1e-12)
    valid = [(p, t) for p, t in zip(pred.ravel(), target.ravel()) if t != ignore]
    if valid:
        assert math.isclose(r["pixel_accuracy"], sum(p == t for p, t in valid) / len(valid))


# -- boundaries ---------------------------------------------------------------------------------------
def square(h=8, w=8, top=2, left=2, size=4):
    m = np.zeros((h, w), dtype=np.int64)
    m[top:top + size, left:left + size] = 1
    return m


def test_boundary_map_by_hand():
    b = boundary_map(square())
    want = np.zeros((8, 8), dtype=bool)
    want[2:6, 2:6] = True
    want[3:5, 3:5] = False  # the 2x2 interior
    assert np.array_equal(b, want)
    # the image edge is not a boundary: a full mask has none, an edge-touching square only inside
    assert not boundary_map(np.ones((4, 5))).any()
    m = np.zeros((4, 4), dtype=bool)
    m[:2, :2] = True
    assert np.argwhere(boundary_map(m)).tolist() == [[0, 1], [1, 0], [1, 1]]
    # batches: each image alone
    assert np.array_equal(boundary_map(np.stack([square(), square().T])), np.stack([b, b.T]))


def test_boundary_f1_identical_maps_is_one():
    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, (3, 12, 10))
    assert boundary_f1(t > 0, t > 0) == 1.0
    assert boundary_f1(t, t, tolerance=0, num_classes=3) == 1.0
    assert boundary_f1(square(), square(), tolerance=0) == 1.0


def test_boundary_f1_shift_by_hand():
    """Square moved right by one pixel: at tolerance 0 the top and bottom edges match on 3 of 4
    pixels each (6 of 12 boundary pixels on both sides): P = R = F1 = 1/2. At tolerance 1 every
    boundary pixel is within one pixel of the other boundary: F1 = 1."""
    t = square()
    p = np.roll(t, 1, axis=1)
    assert boundary_scores(p, t, tolerance=0) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert boundary_f1(p, t, tolerance=1) == 1.0
    assert boundary_f1(p, t, tolerance=0.99) == 0.5


@pytest.mark.parametrize("tol", [0, 1, 2, 3])
def test_boundary_f1_tolerance_matches_shift(tol):
    """Shifting by k pixels is fully forgiven exactly when tolerance >= k, and the score falls as the
    shift grows."""
    t = square(20, 20, 4, 4, 8)  # shifts stay below the size, so far edges never coincide
    scores = []
    for k in range(6):
        f = boundary_f1(np.roll(t, k, axis=1), t, tolerance=tol)
        assert (f == 1.0) == (k <= tol), (k, tol, f)
        scores.append(f)
    assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < scores[tol]


def test_tolerance_is_a_disk():
    """Euclidean tolerance: a diagonal move by (1, 1) is sqrt(2) ~ 1.41 away, so it is not fully
    forgiven at tolerance 1 (a square window would) but is at tolerance 1.5."""
    t = np.zeros((1, 7, 7), dtype=int)
    t[0, 3, 3] = 1  # a single pixel is its own boundary
    t = np.pad(t, ((0, 0), (1, 1), (1, 1)))
    p = np.roll(t, (1, 1), axis=(1, 2))
    assert boundary_f1(p, t, tolerance=1) == 0.0
    assert boundary_f1(p, t, tolerance=1.5) == 1.0
    p2 = np.roll(t, (2, 1), axis=(1, 2))  # distance sqrt(5) ~ 2.24
    assert boundary_f1(p2, t, tolerance=2) == 0.0
    assert boundary_f1(p2, t, tolerance=2.3) == 1.0


def test_empty_maps():
    z = np.zeros((2, 6, 6), dtype=int)
    s = np.stack([square(6, 6, 1, 1, 3)] * 2)
    assert boundary_f1(z, z) == 1.0
    assert boundary_f1(z, s) == 0.0 and boundary_f1(s, z) == 0.0
    r = boundary_scores(z, s)
    assert r["precision"] == 1.0 and r["recall"] == 0.0


def test_batch_is_pooled():
    t = np.stack([square(), square()])
    p = np.stack([square(), np.roll(square(), 1, axis=1)])
    # image 0: 12 of 12 matched on both sides; image 1: 6 of 12 -> pooled 18 / 24
    r = boundary_scores(p, t, tolerance=0)
    assert r["precision"] == r["recall"] == r["f1"] == 0.75


def test_multiclass_boundary_by_hand():
    t = np.zeros((8, 8), dtype=int)
    t[2:6, 2:6] = 1
    t[0, 0] = 2
    p = t.copy()
    p[2:6, 2:6] = 0
    p[2:6, 3:7] = 1  # class 1 moved right by one
    r = boundary_scores(p, t, tolerance=0, num_classes=3)
    # class 2: one pixel, identical -> 1; class 1: 1/2 as in the binary case; class 0 (background)
    # has the same boundary as class 1 seen from outside, moved by one pixel too
    assert r["per_class_f1"][2] == 1.0 and r["per_class_f1"][1] == 0.5
    assert 0 < r["per_class_f1"][0] < 1
    assert math.isclose(r["f1"], sum(r["per_class_f1"]) / 3)
    # a class without any boundary in either map is left out
    r4 = boundary_scores(p, t, tolerance=0, num_classes=4)
    assert math.isnan(r4["per_class_f1"][3]) and math.isclose(r4["f1"], r["f1"])


@given(st.integers(1, 2), st.integers(2, 7), st.integers(2, 7), st.sampled_from([0, 1, 1.5, 2, 3]),
       st.integers(0, 2**31 - 1))
def test_boundary_against_brute_force(n, h, w, tol, seed):
    rng = np.random.default_rng(seed)
    t = rng.random((n, h, w)) < rng.uniform(0.2, 0.8)
    p = rng.random((n, h, w)) < rng.uniform(0.2, 0.8)
    mp, np_, mt, nt = ref_boundary_counts(p, t, tol)
    r = boundary_scores(p, t, tolerance=tol)
    assert math.isclose(r["precision"], mp / np_ if np_ else 1.0)
    assert math.isclose(r["recall"], mt / nt if nt else 1.0)
    assert math.isclose(r["f1"], ref_f1(mp, np_, mt, nt))
    # per class with three labels: each class's mask scored alone, the mean over scored classes
    labels = rng.integers(0, 3, (n, h, w))
    plabels = rng.integers(0, 3, (n, h, w))
    rc = boundary_scores(plabels, labels, tolerance=tol, num_classes=3)
    f1s = []
    for c in range(3):
        counts = ref_boundary_counts(plabels == c, labels == c, tol)
        if counts[1] or counts[3]:
            f1s.append(ref_f1(*counts))
            assert math.isclose(rc["per_class_f1"][c], f1s[-1])
        else:
            assert math.isnan(rc["per_class_f1"][c])
    assert math.isclose(rc["f1"], sum(f1s) / len(f1s) if f1s else 1.0)


def test_dilation_radius_larger_than_the_image():
    t = np.zeros((3, 4), dtype=int)
    t[1, 1] = 1
    p = np.zeros((3, 4), dtype=int)
    p[1, 3] = 1
    assert boundary_f1(p, t, tolerance=10) == 1.0
    assert boundary_f1(p, t, tolerance=1) == 0.0


def test_boundary_bad_input():
    t = square()
    for bad in (-1, float("nan"), None, [1, 2]):
        with pytest.raises(ValueError, match="tolerance"):
            boundary_f1(t, t, tolerance=bad)
    with pytest.raises(ValueError, match="shape"):
        boundary_f1(t[:4], t)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        boundary_f1(np.zeros(5, int), np.zeros(5, int))
    with pytest.raises(ValueError, match="label"):
        boundary_f1(t + 1, t, num_classes=2)


def test_large_batch_is_vectorised_and_quick():
    """(N, H, W) batches go through whole-array operations (no Python loop over pixels/images)."""
    rng = np.random.default_rng(9)
    t = rng.integers(0, 4, (8, 128, 128))
    p = np.where(rng.random(t.shape) < 0.9, t, rng.integers(0, 4, t.shape))
    r = evaluate(p, t, 4)
    assert 0.85 < r["pixel_accuracy"] < 0.95
    assert 0 < boundary_f1(p, t, tolerance=2, num_classes=4) < 1


# -- instances -------------------------------------------------------------------------------------
def ref_instance_scores(t, p, thresholds=DSB_THRESHOLDS):
    """Object by object with Python loops: every IoU, matches above each threshold."""
    tids = [k for k in np.unique(t) if k]
    pids = [k for k in np.unique(p) if k]
    iou = {}
    for a in tids:
        for b in pids:
            inter = np.count_nonzero((t == a) & (p == b))
            if inter:
                iou[a, b] = inter / np.count_nonzero((t == a) | (p == b))
    tp = [sum(v > th for v in iou.values()) for th in thresholds]
    n = len(tids) + len(pids)
    ap = [k / (n - k) if n - k else 1.0 for k in tp]
    return tp, float(np.mean(ap))


def test_instances_no_match():
    t = np.zeros((6, 6), int)
    t[0:2, 0:2] = 1
    p = np.zeros((6, 6), int)
    p[4:6, 4:6] = 3
    r = match_instances(t, p)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 1)
    assert r["precision"] == r["recall"] == r["f1"] == r["ap_dsb"] == r["pq"] == 0.0
    assert r["splits"] == r["merges"] == 0
    # nothing predicted at all
    r = match_instances(t, np.zeros_like(t))
    assert r["recall"] == 0.0 and r["precision"] == 1.0 and r["f1"] == 0.0
    # nothing on either side: no error to count
    r = match_instances(np.zeros((3, 3), int), np.zeros((3, 3), np.uint16))
    assert r["f1"] == r["ap_dsb"] == r["pq"] == 1.0 and r["n_true"] == 0


def test_instances_one_split():
    # a 4x8 true cell cut into two 4x4 halves: IoU 0.5 each, not > 0.5, so no match
    t = np.zeros((6, 10), int)
    t[1:5, 1:9] = 40
    p = np.zeros((6, 10), int)
    p[1:5, 1:5] = 1
    p[1:5, 5:9] = 2
    r = match_instances(t, p)
    assert r["splits"] == 1 and r["merges"] == 0
    assert (r["tp"], r["fp"], r["fn"]) == (0, 2, 1)
    # a larger piece (24 of 32 pixels) matches with IoU 0.75
    p[1:5, 1:7] = 1
    p[1:5, 7:9] = 2
    r = match_instances(t, p)
    assert r["splits"] == 1 and r["tp"] == 1 and r["sq"] == pytest.approx(0.75)
    # precision 1/2, recall 1/1, f1 = 2/3; PQ = 0.75 * 2/3
    assert r["precision"] == 0.5 and r["recall"] == 1.0 and r["f1"] == pytest.approx(2 / 3)
    assert r["rq"] == pytest.approx(2 / 3) and r["pq"] == pytest.approx(0.5)


def test_instances_one_merge():
    t = np.zeros((6, 10), int)
    t[1:5, 1:5] = 3
    t[1:5, 5:9] = 65535                    # two touching cells ...
    p = np.where(t > 0, 9, 0)               # ... predicted as one
    r = match_instances(t, p)
    assert r["merges"] == 1 and r["splits"] == 0 and r["tp"] == 0
    assert r["n_true"] == 2 and r["n_pred"] == 1


def test_instances_dsb_formula_on_a_known_case():
    # true: three 10x10 squares. pred: one exact, one shifted by 2 columns (IoU 80/120 = 2/3),
    # one missed, and one false positive.
    t = np.zeros((40, 40), int)
    p = np.zeros((40, 40), int)
    t[0:10, 0:10] = 1
    p[0:10, 0:10] = 5
    t[15:25, 0:10] = 2
    p[15:25, 2:12] = 6
    t[0:10, 20:30] = 3
    p[30:35, 30:35] = 7
    r = match_instances(t, p)
    iou2 = 80 / 120
    # TP(t) = 2 for t < 2/3 (0.5, 0.55, 0.6, 0.65), then 1 (0.7 .. 0.95): n_true = 3, n_pred = 3
    ap = (4 * (2 / (2 + 1 + 1)) + 6 * (1 / (1 + 2 + 2))) / 10
    assert r["tp_per_threshold"] == [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert r["ap_dsb"] == pytest.approx(ap)
    assert r["sq"] == pytest.approx((1 + iou2) / 2)
    assert r["f1"] == pytest.approx(2 / 3) and r["pq"] == pytest.approx((1 + iou2) / 2 * 2 / 3)
    assert ref_instance_scores(t, p) == (r["tp_per_threshold"], pytest.approx(r["ap_dsb"]))
    # a custom set of thresholds
    assert match_instances(t, p, thresholds=[0.5])["ap_dsb"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0.5"):
        match_instances(t, p, thresholds=[0.3])


@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 2 ** 31 - 1))
@settings(max_examples=60, deadline=None)
def test_instances_fuzzed_against_loops(h, w, seed):
    rng = np.random.default_rng(seed)
    choices = [0, 1, 2, 17, 65535]
    t = rng.choice(choices, size=(h, w)).astype(np.uint16)
    p = rng.choice(choices[:3] + [40000], size=(h, w))
    r = match_instances(t, p)
    tp, ap = ref_instance_scores(t, p)
    assert r["tp_per_threshold"] == tp and r["ap_dsb"] == pytest.approx(ap)
    assert r["n_true"] == len(np.unique(t[t > 0])) and r["n_pred"] == len(np.unique(p[p > 0]))
    # against itself: perfect
    s = match_instances(t, t)
    assert s["f1"] == s["ap_dsb"] == s["pq"] == 1.0 and s["splits"] == s["merges"] == 0
    # the overlap table sums to the pixels in both foregrounds
    _, _, pairs = overlap_table(t, p)
    assert pairs[:, 2].sum() == np.count_nonzero((t > 0) & (p > 0))


def test_instances_aggregate_pools_counts():
    t = np.zeros((6, 10), int)
    t[1:5, 1:5] = 1
    t[1:5, 5:9] = 2
    p1 = t.copy()                            # perfect
    p2 = np.where(t > 0, 1, 0)               # a merge
    r1, r2 = match_instances(t, p1), match_instances(t, p2)
    agg = aggregate_instance_matches([r1, r2])
    assert agg["n_true"] == 4 and agg["n_pred"] == 3 and agg["tp"] == 2 and agg["merges"] == 1
    assert agg["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert agg["ap_dsb_image_mean"] == pytest.approx((1.0 + 0.0) / 2) and agg["images"] == 2
    assert agg["ap_dsb"] == pytest.approx(2 / (2 + 1 + 2))
    with pytest.raises(ValueError):
        aggregate_instance_matches([])
    with pytest.raises(ValueError, match="thresholds"):
        aggregate_instance_matches([r1, match_instances(t, p1, thresholds=[0.5])])


def test_instances_bad_input():
    with pytest.raises(ValueError, match="shape"):
        match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="negative"):
        match_instances(np.array([[-1, 0]]), np.zeros((1, 2), int))
    with pytest.raises(TypeError, match="integer"):
        match_instances(np.array([["a"]]), np.zeros((1, 1), int))


def test_instances_5000_objects_on_2048_well_under_a_second():
    import time
    # a grid of 4,900 squares, prediction shifted by one pixel
    t = np.zeros((2048, 2048), np.int32)
    ys, xs = np.meshgrid(np.arange(70), np.arange(70), indexing="ij")
    ids = (ys * 70 + xs + 1).astype(np.int32)
    block = np.kron(ids, np.ones((29, 29), np.int32))
    t[:block.shape[0], :block.shape[1]] = np.where((np.arange(29 * 70) % 29 < 26)[:, None]
                                                   & (np.arange(29 * 70) % 29 < 26)[None], block, 0)
    p = np.roll(t, 1, axis=1) * 3
    elapsed = []
    for _ in range(2):                       # the first call also pays for fresh memory pages
        t0 = time.perf_counter()
        r = match_instances(t, p)
        elapsed.append(time.perf_counter() - t0)
    assert r["n_true"] == 4900 and r["tp"] == 4900
    assert r["sq"] == pytest.approx(25 / 27)
    assert min(elapsed) < 1.0

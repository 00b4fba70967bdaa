"""Segmentation metrics on NumPy arrays: confusion matrix, Dice, IoU, pixel accuracy, boundary F1.

Conventions used throughout
---------------------------
* ``pred`` and ``target`` hold integer class labels of the same shape, usually ``(N, H, W)`` (any
  shape works for the pixel-counting metrics; ``boundary_f1`` needs ``(..., H, W)``). ``pred`` may
  also be class scores (logits or probabilities) of shape ``(N, C, H, W)`` next to a ``(N, H, W)``
  target: it is then reduced with ``argmax`` over axis 1.
* Every count is pooled over the whole batch (all images' pixels together), not averaged per image.
* ``ignore_index``: target pixels with that value are left out of every count.
* Confusion matrix ``cm[t, p]``: rows are the true class, columns the predicted class.
* For class c: TP = cm[c, c], FP = column sum - TP, FN = row sum - TP.
  Dice_c = 2 TP / (2 TP + FP + FN), IoU_c = TP / (TP + FP + FN). A class that appears neither in the
  target nor in the prediction has 0/0: its score is NaN and it is left out of the means. The mean
  Dice / IoU is therefore the mean over the classes *present* (in the target or the prediction), so a
  class predicted where it does not exist still counts, with score 0.
* For two classes the background class is easy and inflates the mean, so ``evaluate`` also reports
  the foreground (class 1) Dice and IoU.

Instance metrics (``match_instances``) compare two label images (0 background, one id per
object) object by object; see that function and docs/instances.md.
"""
import numpy as np

__all__ = ["confusion_matrix", "dice_per_class", "iou_per_class", "pixel_accuracy", "evaluate",
           "score_images",
           "boundary_map", "boundary_scores", "boundary_f1", "DSB_THRESHOLDS", "overlap_table",
           "match_instances", "aggregate_instance_matches"]


# -- input handling --------------------------------------------------------------------------------
def _labels(pred, target, num_classes=None):
    """(pred, target) as integer arrays of one shape; scores (N, C, H, W) are reduced by argmax."""
    pred = np.asarray(pred)
    target = np.asarray(target)
    if target.dtype.kind not in "iub":
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")
    if pred.dtype.kind == "f" and pred.ndim == target.ndim + 1 and pred.ndim >= 2:
        if num_classes is not None and pred.shape[1] != num_classes:
            raise ValueError(f"pred scores have {pred.shape[1]} channels, expected num_classes={num_classes}")
        pred = pred.argmax(axis=1)
    elif pred.dtype.kind not in "iub":
        raise TypeError(f"pred must hold integer class labels (same shape as target) or class scores "
                        f"(N, C, H, W); got dtype {pred.dtype} and shape {pred.shape}")
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {pred.shape} but target has shape {target.shape}")
    return pred.astype(np.int64, copy=False), target.astype(np.int64, copy=False)


def _check_num_classes(num_classes):
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _check_range(name, labels, num_classes):
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"{name} holds label {int(bad)}, outside [0, {num_classes})")


# -- pixel counting --------------------------------------------------------------------------------
def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """(num_classes, num_classes) int64 counts; ``cm[t, p]`` = pixels of true class t predicted p.

    Target pixels equal to ``ignore_index`` are skipped (their prediction is not checked); any other
    label outside ``[0, num_classes)`` is a ValueError.
    """
    num_classes = _check_num_classes(num_classes)
    pred, target = _labels(pred, target, num_classes)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    else:
        pred, target = pred.reshape(-1), target.reshape(-1)
    _check_range("target", target, num_classes)
    _check_range("pred", pred, num_classes)
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _per_class_counts(cm):
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return tp, fp, fn


def _ratio(num, den):
    """num / den elementwise, NaN where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def dice_per_class(pred, target, num_classes, ignore_index=None):
    """Dice of every class, shape (num_classes,) float64; NaN for a class absent from both maps."""
    tp, fp, fn = _per_class_counts(confusion_matrix(pred, target, num_classes, ignore_index))
    return _ratio(2 * tp, 2 * tp + fp + fn)


def iou_per_class(pred, target, num_classes, ignore_index=None):
    """Intersection over union (Jaccard) of every class, shape (num_classes,); NaN when absent."""
    tp, fp, fn = _per_class_counts(confusion_matrix(pred, target, num_classes, ignore_index))
    return _ratio(tp, tp + fp + fn)


def pixel_accuracy(pred, target, ignore_index=None):
    """Fraction of (non-ignored) pixels whose predicted label equals the target; NaN if none."""
    pred, target = _labels(pred, target)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.size == 0:
        return float("nan")
    return float(np.count_nonzero(pred == target) / target.size)


def _nanmean(values):
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def evaluate(pred, target, num_classes, ignore_index=None):
    """Every pixel metric at once, as plain Python numbers (JSON-friendly).

    Returns a dict: 'dice' and 'iou' (means over the classes present, see the module docstring),
    'pixel_accuracy', 'per_class' (a list, one dict per class: 'class', 'dice', 'iou', 'precision',
    'recall', 'support' = true pixels, 'predicted' = predicted pixels), 'confusion_matrix' (nested
    lists, rows = true class), and for num_classes == 2 also 'dice_foreground' and 'iou_foreground'
    (class 1). Undefined scores are NaN.
    """
    cm = confusion_matrix(pred, target, num_classes, ignore_index)
    tp, fp, fn = _per_class_counts(cm)
    dice = _ratio(2 * tp, 2 * tp + fp + fn)
    iou = _ratio(tp, tp + fp + fn)
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    total = cm.sum()
    out = {
        "dice": _nanmean(dice),
        "iou": _nanmean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "per_class": [
            {"class": c, "dice": float(dice[c]), "iou": float(iou[c]), "precision": float(precision[c]),
             "recall": float(recall[c]), "support": int(cm[c].sum()), "predicted": int(cm[:, c].sum())}
            for c in range(cm.shape[0])
        ],
        "confusion_matrix": cm.tolist(),
    }
    if cm.shape[0] == 2:
        out["dice_foreground"] = float(dice[1])
        out["iou_foreground"] = float(iou[1])
    return out


# -- boundaries ------------------------------------------------------------------------------------
def boundary_map(mask):
    """Inner boundary of a binary mask (..., H, W): the mask's pixels with at least one 4-neighbour
    (up, down, left, right) outside the mask. Beyond the image edge counts as 'same as the pixel'
    (edge replication), so a mask that fills the whole image has no boundary, and an object touching
    the edge has none along the edge."""
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim < 2:
        raise ValueError(f"boundary_map needs an array (..., H, W), got shape {m.shape}")
    pad = [(0, 0)] * (m.ndim - 2) + [(1, 1), (1, 1)]
    p = np.pad(m, pad, mode="edge")
    eroded = (p[..., 1:-1, 1:-1] & p[..., :-2, 1:-1] & p[..., 2:, 1:-1]
              & p[..., 1:-1, :-2] & p[..., 1:-1, 2:])
    return m & ~eroded


def _dilate_disk(mask, radius):
    """Binary dilation of (..., H, W) by a disk: out[y, x] is True when some True pixel (y', x')
    satisfies (y - y')^2 + (x - x')^2 <= radius^2 (Euclidean distance). Built row by row: the disk is
    a stack of horizontal runs of half-width floor(sqrt(r^2 - dy^2)) for dy = -r..r; each run is a
    sliding-window OR done with a cumulative sum along W, then shifted by dy."""
    r = int(np.floor(radius))
    if r <= 0:
        return mask.copy()
    h, w = mask.shape[-2:]
    # running count along W, with a zero column in front: window sum = c[x + k + 1] - c[x - k]
    c = np.concatenate([np.zeros(mask.shape[:-1] + (1,), np.int32),
                        np.cumsum(mask, axis=-1, dtype=np.int32)], axis=-1)
    runs = {}
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        if abs(dy) >= h:
            continue
        k = int(np.floor(np.sqrt(max(radius * radius - dy * dy, 0.0)) + 1e-9))
        if k not in runs:
            x = np.arange(w)
            hi = np.minimum(x + k + 1, w)
            lo = np.maximum(x - k, 0)
            runs[k] = (c[..., hi] - c[..., lo]) > 0
        row = runs[k]
        # out[y] |= row[y - dy]
        if dy >= 0:
            out[..., dy:, :] |= row[..., :h - dy, :]
        else:
            out[..., :h + dy, :] |= row[..., -dy:, :]
    return out


def _boundary_counts(pred_mask, true_mask, tolerance):
    """(matched predicted, all predicted, matched true, all true) boundary pixels, pooled over the batch."""
    bp = boundary_map(pred_mask)
    bt = boundary_map(true_mask)
    near_true = _dilate_disk(bt, tolerance)
    near_pred = _dilate_disk(bp, tolerance)
    return (np.count_nonzero(bp & near_true), np.count_nonzero(bp),
            np.count_nonzero(bt & near_pred), np.count_nonzero(bt))


def _prf(matched_p, n_p, matched_t, n_t):
    precision = matched_p / n_p if n_p else 1.0  # nothing predicted: no false boundary claimed
    recall = matched_t / n_t if n_t else 1.0     # nothing to find: nothing missed
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def boundary_scores(pred, target, tolerance=2, num_classes=None):
    """Boundary precision, recall and F1 (the BF score) with a distance tolerance in pixels.

    A predicted boundary pixel is correct when a true boundary pixel lies within ``tolerance`` pixels
    (Euclidean distance, i.e. a disk-shaped dilation; ``tolerance=0`` asks for the same pixel).
    Precision = correct predicted boundary pixels / predicted boundary pixels; recall likewise from
    the true side; F1 = 2PR / (P + R). Boundaries are the inner boundaries of ``boundary_map``. Counts
    are pooled over the batch (..., H, W).

    num_classes=None: binary maps (nonzero = foreground). With no boundary pixels on a side, that
    side's precision (or recall) is 1, so two maps without any boundary score 1, and a map without
    boundaries against one with boundaries scores 0.
    num_classes=C: the boundary of each class's mask (label == c) is scored alone; classes without
    boundary pixels in either map get NaN and are left out of the mean (1.0 if every class is).

    Returns a dict: 'precision', 'recall', 'f1' (means over the scored classes when per class) and,
    per class, 'per_class_precision', 'per_class_recall', 'per_class_f1' (lists).
    """
    if tolerance is None or np.ndim(tolerance) != 0 or not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a non-negative number of pixels, got {tolerance!r}")
    if num_classes is None:
        p = np.asarray(pred)
        t = np.asarray(target)
        if p.dtype.kind == "f" and p.ndim == t.ndim + 1:
            p, t = _labels(p, t)
        if p.shape != t.shape:
            raise ValueError(f"pred has shape {p.shape} but target has shape {t.shape}")
        if p.ndim < 2:
            raise ValueError(f"boundary_f1 needs maps of shape (..., H, W), got {p.shape}")
        precision, recall, f1 = _prf(*_boundary_counts(p != 0, t != 0, tolerance))
        return {"precision": precision, "recall": recall, "f1": f1}
    num_classes = _check_num_classes(num_classes)
    p, t = _labels(pred, target, num_classes)
    if p.ndim < 2:
        raise ValueError(f"boundary_f1 needs maps of shape (..., H, W), got {p.shape}")
    _check_range("target", t, num_classes)
    _check_range("pred", p, num_classes)
    per = np.full((3, num_classes), np.nan)
    for c in range(num_classes):
        counts = _boundary_counts(p == c, t == c, tolerance)
        if counts[1] or counts[3]:
            per[:, c] = _prf(*counts)
    scored = ~np.isnan(per[2])
    means = per[:, scored].mean(axis=1) if scored.any() else np.ones(3)
    return {"precision": float(means[0]), "recall": float(means[1]), "f1": float(means[2]),
            "per_class_precision": per[0].tolist(), "per_class_recall": per[1].tolist(),
            "per_class_f1": per[2].tolist()}


def boundary_f1(pred, target, tolerance=2, num_classes=None):
    """The boundary F1 score of ``boundary_scores`` (a float in [0, 1])."""
    return boundary_scores(pred, target, tolerance, num_classes)["f1"]


# -- instances -------------------------------------------------------------------------------------
DSB_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.5, 1.0, 0.05), 2))  # 0.5 .. 0.95


def score_images(preds, masks, num_classes):
    """Scores of a set of images of any sizes: the pixel metrics of ``evaluate`` pooled over every
    pixel of every image, boundary F1 (2 px tolerance) averaged over images (over the slices of a
    volume (D, H, W) first), and num_images.
    preds, masks: lists of (H, W) label images, pair by pair of one size."""
    p = np.concatenate([np.asarray(a).ravel() for a in preds])
    t = np.concatenate([np.asarray(a).ravel() for a in masks])
    ev = evaluate(p, t, num_classes)
    def bf1(a, b):            # 2-D boundary F1; for a volume, the mean over its slices along D
        if np.ndim(a) == 3:
            return float(np.mean([bf1(sa, sb) for sa, sb in zip(a, b)]))
        return boundary_scores(a, b, tolerance=2,
                               num_classes=None if num_classes == 2 else num_classes)["f1"]
    bfs = [bf1(a, b) for a, b in zip(preds, masks)]
    ev["boundary_f1"] = float(np.mean(bfs)) if bfs else float("nan")
    ev["num_images"] = len(preds)
    return ev


def _instance_ids(labels, name):
    """Flat int64 ids renumbered 1..n (0 stays background), and n. Ids need not be consecutive."""
    lab = np.asarray(labels)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(np.mod(lab, 1) == 0):
            raise ValueError(f"{name} must hold whole-number object ids")
    elif lab.dtype.kind not in "iub":
        raise TypeError(f"{name} must be an integer label image, got dtype {lab.dtype}")
    flat = lab.reshape(-1)
    if flat.dtype.kind != "i" and flat.dtype.kind != "u":
        flat = flat.astype(np.int64)
    if flat.size == 0:
        return flat.astype(np.int64), 0
    if flat.min() < 0:
        raise ValueError(f"{name} holds a negative id ({int(flat.min())})")
    top = int(flat.max())
    if top <= 4 * flat.size + 65536:                # a look-up table: no sort needed
        present = np.zeros(top + 1, bool)
        present[flat] = True
        present[0] = False
        lut = (np.cumsum(present) * present).astype(np.int32 if top < 2 ** 31 else np.int64)
        return lut[flat], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1) + (0 if ids[0] == 0 else 1)
    return inverse.astype(np.int64), int(len(ids) - (ids[0] == 0))


def overlap_table(true_labels, pred_labels):
    """The sparse overlap table of two label images of one shape (any number of dimensions).

    Returns (area_true (n_true,), area_pred (n_pred,), pairs) where pairs is (K, 3) int64: rows
    (i, j, |T_i & P_j|) for every true object i and predicted object j that share pixels (ids
    renumbered 0..n-1 in the order of the original ids). Only the pixels in both foregrounds are
    looked at; the joint id i * (n_pred + 1) + j of consecutive pixels is first run-length
    compressed (objects are contiguous along rows), then one np.unique + bincount over the runs
    gives the table: O(pixels) plus a sort of the runs, never an n_true x n_pred matrix."""
    t, n_true = _instance_ids(true_labels, "true_labels")
    p, n_pred = _instance_ids(pred_labels, "pred_labels")
    if t.shape != p.shape:
        raise ValueError(f"true_labels has {t.size} pixels but pred_labels has {p.size}: "
                         f"shapes {np.shape(true_labels)} and {np.shape(pred_labels)} differ")
    if np.shape(true_labels) != np.shape(pred_labels):
        raise ValueError(f"true_labels {np.shape(true_labels)} and pred_labels "
                         f"{np.shape(pred_labels)} differ in shape")
    area_true = np.bincount(t, minlength=n_true + 1)[1:]                 # pixels per object
    area_pred = np.bincount(p, minlength=n_pred + 1)[1:]
    both = (t > 0) & (p > 0)
    key = t[both].astype(np.int64) * (n_pred + 1) + p[both]
    if key.size == 0:
        return area_true, area_pred, np.zeros((0, 3), np.int64)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    lengths = np.diff(np.r_[starts, key.size])
    joint, inverse = np.unique(key[starts], return_inverse=True)
    inter = np.bincount(inverse.reshape(-1), weights=lengths).astype(np.int64)
    pairs = np.stack([joint // (n_pred + 1) - 1, joint % (n_pred + 1) - 1, inter], axis=1)
    return area_true, area_pred, pairs


def _check_thresholds(thresholds):
    th = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if th.size == 0 or np.any(~np.isfinite(th)) or th.min() < 0.5 or th.max() >= 1.0:
        raise ValueError(f"IoU thresholds must lie in [0.5, 1): above 0.5 an object has at most "
                         f"one partner, so matching is unambiguous; got {thresholds!r}")
    return th


def _safe(num, den, empty):
    return float(num / den) if den else float(empty)


def _instance_scores(c):
    """The scores from summed counts c (see match_instances), as plain Python numbers."""
    tp, n_true, n_pred = c["tp"], c["n_true"], c["n_pred"]
    fp, fn = n_pred - tp, n_true - tp
    nothing = n_true == 0 and n_pred == 0                 # no object on either side: no error
    ap = [_safe(k, n_true + n_pred - k, 1.0) for k in c["tp_per_threshold"]]
    sq = _safe(c["iou_sum"], tp, 1.0 if nothing else 0.0)
    rq = _safe(tp, tp + 0.5 * fp + 0.5 * fn, 1.0)
    return {
        "precision": _safe(tp, n_pred, 1.0), "recall": _safe(tp, n_true, 1.0),
        "f1": _safe(2 * tp, 2 * tp + fp + fn, 1.0), "ap_dsb": float(np.mean(ap)),
        "pq": sq * rq, "sq": sq, "rq": rq, "splits": int(c["splits"]), "merges": int(c["merges"]),
        "n_true": int(n_true), "n_pred": int(n_pred), "tp": int(tp), "fp": int(fp), "fn": int(fn),
        "iou_sum": float(c["iou_sum"]), "thresholds": list(c["thresholds"]),
        "tp_per_threshold": [int(k) for k in c["tp_per_threshold"]], "ap_per_threshold": ap,
    }


def match_instances(true_labels, pred_labels, thresholds=DSB_THRESHOLDS):
    """Instance scores of a predicted label image against the true one (0 = background, any
    other value one object; ids need not be consecutive nor agree between the two images).

    Matching: true object T and predicted object P match at threshold t when
    IoU(T, P) = |T & P| / |T | P| > t. For t >= 0.5 an object has at most one such partner
    (two partners would each need more than half of its area), so no assignment problem arises.
    At t = 0.5:  TP = matched pairs, FP = n_pred - TP, FN = n_true - TP and
        precision = TP / n_pred, recall = TP / n_true, f1 = 2 TP / (2 TP + FP + FN);
        panoptic quality: sq = mean IoU of the matched pairs, rq = TP / (TP + FP/2 + FN/2) (= f1),
        pq = sq * rq (Kirillov et al. 2019).
    ap_dsb: the 2018 Data Science Bowl score, the mean over `thresholds` (default 0.5, 0.55, ...,
        0.95) of TP(t) / (TP(t) + FP(t) + FN(t)).
    splits: true objects that at least two predicted objects lie in, each with at least half of
        its own area: |T & P| >= |P| / 2 for two or more P (one cell cut in pieces).
    merges: predicted objects that at least two true objects lie in, each with at least half of
        its own area: |T & P| >= |T| / 2 for two or more T (touching cells fused).
    With no object on either side every score is 1 (nothing to find, nothing claimed); a ratio
    whose denominator is 0 otherwise is 1 for precision/recall when that side is empty and 0 for
    sq without a match.

    Returns a dict of plain numbers: precision, recall, f1, ap_dsb, pq, sq, rq, splits, merges,
    and the counts behind them (n_true, n_pred, tp, fp, fn at 0.5, iou_sum of the matched pairs,
    thresholds, tp_per_threshold, ap_per_threshold) for aggregate_instance_matches.
    Any number of dimensions (a volume's objects are 3-D); for a batch of images call it per
    image and aggregate: ids are per image."""
    th = _check_thresholds(thresholds)
    area_true, area_pred, pairs = overlap_table(true_labels, pred_labels)
    i, j, inter = pairs[:, 0], pairs[:, 1], pairs[:, 2]
    iou = inter / (area_true[i] + area_pred[j] - inter).astype(np.float64)
    matched = iou > 0.5
    pieces = np.bincount(i[2 * inter >= area_pred[j]], minlength=len(area_true))
    fused = np.bincount(j[2 * inter >= area_true[i]], minlength=len(area_pred))
    counts = {"n_true": len(area_true), "n_pred": len(area_pred), "tp": int(matched.sum()),
              "iou_sum": float(iou[matched].sum()), "splits": int(np.count_nonzero(pieces >= 2)),
              "merges": int(np.count_nonzero(fused >= 2)), "thresholds": th.tolist(),
              "tp_per_threshold": [int(np.count_nonzero(iou > t)) for t in th]}
    return _instance_scores(counts)


def aggregate_instance_matches(results):
    """Scores over several images from their match_instances results: the counts (n_true,
    n_pred, tp, iou_sum, splits, merges, tp per threshold) are summed over the images and the
    scores computed once from the sums (pooled, as evaluate pools pixels). Also gives
    'ap_dsb_image_mean', the mean of the per-image ap_dsb (the Data Science Bowl's leaderboard
    averaged per image), and 'images'."""
    results = list(results)
    if not results:
        raise ValueError("aggregate_instance_matches needs at least one match_instances result")
    th = results[0]["thresholds"]
    if any(r["thresholds"] != th for r in results):
        raise ValueError("the results were computed at different IoU thresholds")
    total = {k: sum(r[k] for r in results)
             for k in ("n_true", "n_pred", "tp", "iou_sum", "splits", "merges")}
    total["thresholds"] = th
    total["tp_per_threshold"] = np.sum([r["tp_per_threshold"] for r in results], axis=0)
    out = _instance_scores(total)
    out["ap_dsb_image_mean"] = float(np.mean([r["ap_dsb"] for r in results]))
    out["images"] = len(results)
    return out

"""From three-class probabilities back to instances: round trips, the watershed's three
implementations against each other, hole filling and small-object removal."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_np.data import instance_targets, touching_cells
from unet_np.metrics import match_instances
from unet_np.cli.common import SEEDING
from unet_np.postprocess import (fill_holes, flood, labels_from_probabilities, remove_small)

try:
    import numba  # noqa: F401
    METHODS = ["python", "numpy", "numba"]
except ImportError:
    METHODS = ["python", "numpy"]


def perfect(targets):
    """One-hot probabilities (3, H, W) of a target image."""
    return np.eye(3, dtype=np.float32)[targets].transpose(2, 0, 1)


@pytest.mark.parametrize("border", [1, 2])
def test_round_trip_touching_cells(border):
    # targets -> perfect probabilities -> the same instances
    _, _, inst = touching_cells(6, 64, seed=3, gap=False)
    for lab in inst:
        p = perfect(instance_targets(lab, border))
        out = labels_from_probabilities(p, min_size=0)
        # the command's seeding (interior 0.4, unsure specks dropped) changes nothing here
        np.testing.assert_array_equal(labels_from_probabilities(p, min_size=0, **SEEDING), out)
        # the cells come back as they were, but for a background pixel enclosed by one cell
        np.testing.assert_array_equal(out > 0, fill_holes(lab) > 0)
        r = match_instances(lab, out)
        assert r["n_pred"] == r["n_true"] and r["f1"] == 1.0
        assert r["splits"] == 0 and r["merges"] == 0
        assert r["sq"] > 0.85     # the border bands are shared out nearly as they were (small cells)


def test_round_trip_with_a_gap_is_exact():
    # cells separated by background: every cell pixel is reached by its own seed only
    _, _, inst = touching_cells(3, 64, seed=4)
    for lab in inst:
        out = labels_from_probabilities(perfect(instance_targets(lab, 2)), min_size=0)
        r = match_instances(lab, out)
        # ids renumbered in seed order: compare through the one-to-one matching
        assert r["tp"] == r["n_true"] == r["n_pred"]
        assert r["tp_per_threshold"][-1] == r["n_true"] or r["sq"] > 0.99


def test_two_touching_squares_split_along_their_edge():
    lab = np.zeros((10, 16), np.int64)
    lab[2:8, 2:8] = 5
    lab[2:8, 8:14] = 2
    out = labels_from_probabilities(perfect(instance_targets(lab, 2)), min_size=0)
    assert out.dtype == np.int32
    # renumbered 1..2 in row-major order of the seeds: the left square first
    expect = np.where(lab == 5, 1, np.where(lab == 2, 2, 0))
    np.testing.assert_array_equal(out, expect)


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 6), st.integers(0, 2 ** 31 - 1))
@settings(max_examples=40, deadline=None)
def test_flood_implementations_agree(h, w, levels, seed):
    rng = np.random.default_rng(seed)
    seeds = np.where(rng.random((h, w)) < 0.15, rng.integers(1, 5, (h, w)), 0)
    level = rng.integers(0, levels, (h, w))
    allowed = rng.random((h, w)) < 0.8
    outs = [flood(seeds, level, allowed, levels, method=m) for m in METHODS]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    # seeds are kept, nothing outside the allowed pixels is flooded
    np.testing.assert_array_equal(outs[0][seeds > 0], seeds[seeds > 0])
    assert np.all(outs[0][(seeds == 0) & ~allowed] == 0)


def test_flood_low_pixels_first():
    # a valley: seed 1 on the left, seed 2 on the right, the low path belongs to seed 2
    seeds = np.array([[1, 0, 0, 0, 2]])
    level = np.array([[0, 3, 0, 0, 0]])
    for m in METHODS:
        out = flood(seeds, level, np.ones((1, 5), bool), 4, method=m)
        np.testing.assert_array_equal(out, [[1, 1, 2, 2, 2]])
    # a tie in the same ring goes to the smaller id
    out = flood(np.array([[2, 0, 1]]), np.zeros((1, 3), int), np.ones((1, 3), bool), 1)
    np.testing.assert_array_equal(out, [[2, 1, 1]])
    with pytest.raises(ValueError, match="method"):
        flood(seeds, level, np.ones((1, 5), bool), 4, method="fast")


def test_fill_holes_and_remove_small():
    lab = np.zeros((9, 9), np.int64)
    lab[1:8, 1:8] = 3
    lab[4, 4] = 0                         # a hole inside object 3
    lab[0, 0] = 0
    filled = fill_holes(lab)
    assert filled[4, 4] == 3
    # background between two objects (or at the edge) is not a hole
    two = np.zeros((5, 7), np.int64)
    two[:, :3] = 1
    two[:, 4:] = 2
    np.testing.assert_array_equal(fill_holes(two), two)
    ring = np.zeros((7, 7), np.int64)
    ring[1:6, 1:6] = 1
    ring[2:5, 2:5] = 0
    ring[3, 3] = 2                        # the gap around object 2 touches two objects
    np.testing.assert_array_equal(fill_holes(ring), ring)
    small = np.array([[7, 7, 0, 9], [7, 7, 0, 0], [0, 0, 0, 65535]])
    np.testing.assert_array_equal(remove_small(small, 2), np.where(small == 7, 1, 0))
    np.testing.assert_array_equal(remove_small(small, 0), [[1, 1, 0, 2], [1, 1, 0, 0], [0, 0, 0, 3]])


def test_unseeded_cells_and_min_size():
    probs = np.zeros((3, 6, 12), np.float32)
    probs[0] = 1.0
    probs[:, 1:5, 1:5] = np.array([0, 0, 1.0])[:, None, None]   # a cell predicted all border
    probs[:, 1:5, 7:11] = np.array([0, 1.0, 0])[:, None, None]  # a normal cell
    out = labels_from_probabilities(probs, min_size=0)
    assert out.max() == 2 and len(np.unique(out[1:5, 1:5])) == 1
    assert labels_from_probabilities(probs, min_size=0, keep_unseeded=False).max() == 1
    assert labels_from_probabilities(probs, min_size=17).max() == 0
    out16 = labels_from_probabilities(probs, min_size=16, dtype=np.uint16)
    assert out16.dtype == np.uint16 and out16.max() == 2


def test_uncertain_speck_does_not_split_a_cell():
    # one cell: a sure interior on the left, a speck of unsure interior on the right, border-like
    # pixels between them (still cell pixels)
    probs = np.zeros((3, 8, 16), np.float32)
    probs[0] = 1.0
    probs[:, 1:7, 1:15] = np.array([0.1, 0.2, 0.7])[:, None, None]
    probs[:, 2:6, 2:6] = np.array([0.05, 0.9, 0.05])[:, None, None]
    probs[:, 3, 11:13] = np.array([0.1, 0.6, 0.3])[:, None]    # two pixels, p 0.6
    out = labels_from_probabilities(probs, min_size=0, min_seed_size=3)
    assert out.max() == 1 and np.all(out[1:7, 1:15] == 1)
    # every seed kept (the default): the speck splits the cell
    assert labels_from_probabilities(probs, min_size=0).max() == 2
    assert labels_from_probabilities(probs, min_size=0, min_seed_size=1).max() == 2
    # a speck of min_seed_size pixels is a seed
    assert labels_from_probabilities(probs, min_size=0, min_seed_size=2).max() == 2
    # so is a small one the network is sure of
    sure = probs.copy()
    sure[:, 3, 12] = np.array([0.02, 0.95, 0.03])
    assert labels_from_probabilities(sure, min_size=0, min_seed_size=3).max() == 2
    assert labels_from_probabilities(sure, min_size=0, min_seed_size=3,
                                     sure_interior=0.96).max() == 1


def test_one_pixel_interior_of_a_small_cell_is_kept_when_sure():
    # a 3 x 3 cell against a 6 x 6 one: with border 1 its interior is its centre pixel alone
    lab = np.zeros((10, 13), np.int64)
    lab[2:8, 2:8] = 1
    lab[3:6, 8:11] = 2
    t = instance_targets(lab, 1)
    assert np.sum((t == 1) & (lab == 2)) == 1
    p = perfect(t)
    for kw in ({}, SEEDING):
        out = labels_from_probabilities(p, min_size=0, **kw)
        r = match_instances(lab, out)
        assert r["n_pred"] == 2 and r["f1"] == 1.0
    # the same pixel at p_interior 0.8: an unsure one-pixel seed, dropped; the big cell takes it
    p[:, 4, 9] = [0.1, 0.8, 0.1]
    assert labels_from_probabilities(p, min_size=0, **SEEDING).max() == 1
    assert labels_from_probabilities(p, min_size=0, **dict(SEEDING, sure_interior=0.8)).max() == 2
    assert labels_from_probabilities(p, min_size=0).max() == 2


def test_bad_probabilities():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        labels_from_probabilities(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="softmax"):
        labels_from_probabilities(np.full((3, 4, 4), 5.0))
    with pytest.raises(ValueError, match="floating"):
        labels_from_probabilities(np.zeros((3, 4, 4), int))
    with pytest.raises(ValueError, match="thresholds"):
        labels_from_probabilities(np.zeros((3, 4, 4)), interior_threshold=1.5)
    with pytest.raises(ValueError, match="min_seed_size"):
        labels_from_probabilities(np.zeros((3, 4, 4)), min_seed_size=-1)
    with pytest.raises(ValueError, match="sure_interior"):
        labels_from_probabilities(np.zeros((3, 4, 4)), sure_interior=1.5)
    # a batch of one is taken
    assert labels_from_probabilities(np.zeros((1, 3, 4, 4))).shape == (4, 4)

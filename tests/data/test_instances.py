"""Three-class instance targets, the instance weight map and the instance-mask detector."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_np.data import (instance_mask_problem, instance_targets, instance_weight_map,
                          label_components, shapes, touching_cells, weight_map)


def brute_targets(lab, border):
    """An object pixel is border when a pixel of another id (or background) lies within
    Euclidean distance `border`, pixels beyond the edge ignored (before the one-seed fixes)."""
    h, w = lab.shape
    out = np.zeros((h, w), np.int64)
    for y in range(h):
        for x in range(w):
            if lab[y, x] == 0:
                continue
            out[y, x] = 1
            for yy in range(max(0, y - border), min(h, y + border + 1)):
                for xx in range(max(0, x - border), min(w, x + border + 1)):
                    if (yy - y) ** 2 + (xx - x) ** 2 <= border ** 2 and lab[yy, xx] != lab[y, x]:
                        out[y, x] = 2
    return out


def test_two_touching_squares_by_hand():
    lab = np.zeros((8, 12), np.int64)
    lab[1:7, 1:6] = 4
    lab[1:7, 6:11] = 9                  # touches object 4 along a column: no background between
    t1 = instance_targets(lab, border=1)
    # border=1: the outline of each object, including the shared edge (columns 5 and 6)
    expect = np.zeros((8, 12), np.int64)
    expect[1:7, 1:11] = 2
    expect[2:6, 2:5] = 1
    expect[2:6, 7:10] = 1
    np.testing.assert_array_equal(t1, expect)
    t2 = instance_targets(lab, border=2)
    assert set(np.unique(t2[lab == 4])) == {1, 2}
    # the two interiors are 2 * border columns apart
    cols = np.flatnonzero((t2 == 1).any(axis=0))
    assert cols.tolist() == [3, 8]


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2 ** 31 - 1))
@settings(max_examples=40, deadline=None)
def test_targets_fuzzed_label_images(h, w, border, seed):
    # non-contiguous ids, up to 65535, objects of any shape
    rng = np.random.default_rng(seed)
    ids = rng.choice([0, 0, 1, 7, 300, 65535], size=(h, w))
    t = instance_targets(ids, border)
    assert t.shape == (h, w) and t.dtype == np.int64
    np.testing.assert_array_equal(t == 0, ids == 0)
    ref = brute_targets(ids, border)
    # only the one-seed fixes may differ from the band definition, and only border -> interior
    # (a thin object's deepest pixels) or interior -> border (an extra interior piece)
    assert np.all((t == ref) | ((ref > 0) & (t > 0)))
    for k in np.unique(ids[ids > 0]):
        inner = label_components((t == 1) & (ids == k), connectivity=4)
        assert inner.max() >= 1          # every object has a seed ...
    # ... and one seed per object: interior pieces of the same id never come in two
    comp = label_components(t == 1, connectivity=4)
    for k in np.unique(ids[ids > 0]):
        pieces = np.unique(comp[(ids == k) & (t == 1)])
        objects = label_components(ids == k, connectivity=4).max()
        assert len(pieces) <= objects


def test_targets_background_only_and_stack():
    z = np.zeros((5, 6), np.uint16)
    np.testing.assert_array_equal(instance_targets(z), 0)
    full = np.full((4, 4), 65535, np.uint16)
    t = instance_targets(full)
    # the image edge is not a border: a whole-image object is all interior
    np.testing.assert_array_equal(t, 1)
    _, _, inst = touching_cells(2, 40, seed=1, gap=False)
    stack = instance_targets(inst)
    assert stack.shape == inst.shape
    np.testing.assert_array_equal(stack[1], instance_targets(inst[1]))


def test_targets_bad_input():
    with pytest.raises(ValueError, match="negative"):
        instance_targets(np.array([[0, -1], [2, 2]]))
    with pytest.raises(ValueError, match="border"):
        instance_targets(np.zeros((3, 3), int), border=0)
    with pytest.raises(ValueError, match="whole-number"):
        instance_targets(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="label image"):
        instance_targets(np.zeros(4, int))


def test_thin_object_keeps_a_seed():
    lab = np.zeros((5, 9), np.int64)
    lab[2, 1:8] = 3                      # one pixel thick: all border under the band rule
    t = instance_targets(lab, border=2)
    assert (t == 1).sum() >= 1 and set(np.unique(t[lab == 3])) <= {1, 2}


def test_instance_weight_map_touching_border_is_heavy():
    lab = np.zeros((12, 20), np.int64)
    lab[2:10, 2:10] = 1
    lab[2:10, 10:18] = 2
    t = instance_targets(lab, 2)
    w = instance_weight_map(lab, class_balance=False)
    # on the shared edge d1 = 0 and d2 = 1: 1 + 10 exp(-1/50)
    np.testing.assert_allclose(w[5, 9], 1 + 10 * np.exp(-1 / 50), rtol=1e-6)
    assert np.all(w[t == 1] == 1.0)
    # far from both objects the border term has vanished
    far = np.zeros((40, 60), np.int64)
    far[:12, :20] = lab
    assert instance_weight_map(far, class_balance=False)[39, 59] == pytest.approx(1.0)
    # class balance over the three classes: mean weight 1 without the border term
    wb = instance_weight_map(lab, w0=0.0)
    np.testing.assert_allclose(wb.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        instance_weight_map(lab), weight_map(lab, labels=t, border_on=t != 1), rtol=1e-6)


def test_detector_flags_instance_labels():
    _, masks, inst = touching_cells(4, 64, seed=2, gap=False)
    msg = instance_mask_problem(inst)
    assert msg is not None and "--instances" in msg and "--classes" in msg
    # 16-bit ids, non-contiguous, one image alone
    sparse = np.where(inst[0] > 0, inst[0] * 5000 + 7, 0).astype(np.uint16)
    assert instance_mask_problem([sparse]) is not None


def test_detector_leaves_semantic_masks_alone():
    _, masks, _ = touching_cells(4, 64, seed=2)
    assert instance_mask_problem(masks) is None                        # binary
    assert instance_mask_problem(masks.astype(np.uint8) * 255) is None  # binary 0/255
    assert instance_mask_problem(shapes(6, 64, seed=1)[1]) is None    # 3 classes, many pieces
    assert instance_mask_problem([np.zeros((8, 8), int)] * 3) is None  # empty
    # five organs, one region each, the same five classes in every image
    organs = []
    for s in range(4):
        m = np.zeros((40, 40), int)
        for k in range(1, 6):
            m[2 + 7 * (k - 1):7 * k, 5 + s:20 + s] = k
        organs.append(m)
    assert instance_mask_problem(organs) is None
    with pytest.raises(ValueError, match="2-D"):
        instance_mask_problem([np.zeros((2, 3, 4), int)])

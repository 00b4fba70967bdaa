import numpy as np
import pytest

from unet_np.data.synthetic import shapes, touching_cells, write_folder
from unet_np.data.weightmap import label_components, weight_map


def test_touching_cells_shapes_and_determinism():
    imgs, masks, inst = touching_cells(3, size=(48, 64), seed=7)
    assert imgs.shape == (3, 1, 48, 64) and imgs.dtype == np.float32
    assert masks.shape == (3, 48, 64) and masks.dtype == np.int64
    assert inst.shape == (3, 48, 64) and inst.dtype == np.int32
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0
    np.testing.assert_array_equal(masks, inst > 0)
    again = touching_cells(3, size=(48, 64), seed=7)
    for a, b in zip((imgs, masks, inst), again):
        np.testing.assert_array_equal(a, b)
    # image i does not depend on n
    np.testing.assert_array_equal(touching_cells(1, size=(48, 64), seed=7)[0][0], imgs[0])
    assert not np.array_equal(touching_cells(1, size=(48, 64), seed=8)[0][0], imgs[0])


def test_cells_touch_and_are_separated_by_background():
    imgs, masks, inst = touching_cells(4, size=96, seed=0)
    touching_pairs = 0
    for i in range(4):
        ids = np.unique(inst[i])
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))  # numbered 1..K
        pad = np.pad(inst[i], 1)
        h, w = inst[i].shape
        nbrs = [pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        # no two different cells are 8-neighbours: a line of background always separates them
        for nb in nbrs:
            assert not np.any((inst[i] > 0) & (nb > 0) & (nb != inst[i]))
        # ... and that line is one pixel wide in places: background pixels between two cells
        stack = np.stack(nbrs)
        lo = np.where(stack > 0, stack, np.iinfo(np.int32).max).min(axis=0)
        between = (inst[i] == 0) & (stack.max(axis=0) > lo) & (lo > 0)
        touching_pairs += int(between.sum())
        # the mask alone gives back the instances (8-connected components)
        assert label_components(masks[i], connectivity=8).max() == inst[i].max()
        # where cells touch, the weight map is high
        if between.any():
            assert weight_map(inst[i])[between].mean() > 5.0
    assert touching_pairs > 20
    # cells are brighter than background on average, despite the illumination field
    assert imgs[:, 0][masks == 1].mean() > imgs[:, 0][masks == 0].mean() + 0.2


def test_shapes_needs_outline_to_tell_classes():
    imgs, masks = shapes(6, size=64, seed=1)
    assert imgs.shape == (6, 1, 64, 64) and masks.dtype == np.int64
    assert set(np.unique(masks)) == {0, 1, 2}
    # interiors of discs and squares have the same intensity distribution
    a, b = imgs[:, 0][masks == 1], imgs[:, 0][masks == 2]
    assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02
    again = shapes(6, size=64, seed=1)
    np.testing.assert_array_equal(again[0], imgs)


def test_write_folder_round_trip(tmp_path):
    pytest.importorskip("PIL")
    from unet_np.data import load_folder
    imgs, masks, _ = touching_cells(2, size=32, seed=3)
    idir, mdir = write_folder(tmp_path / "cells", imgs, masks, mask_suffix="_mask")
    assert sorted(p.name for p in mdir.iterdir()) == ["img_0000_mask.png", "img_0001_mask.png"]
    ds = load_folder(idir, mdir, normalize=None)
    assert ds.mask_convention == "binary255" and ds.num_classes == 2
    for x, m, xi, mi in zip(ds.images, ds.masks, imgs, masks):
        np.testing.assert_array_equal(m, mi)
        np.testing.assert_allclose(x, xi, atol=0.5 / 255 + 1e-6)
    simgs, smasks = shapes(2, size=32, seed=0)
    idir, mdir = write_folder(tmp_path / "shapes", simgs, smasks)
    ds = load_folder(idir, mdir)
    assert ds.mask_convention == "labels" and ds.num_classes == 3
    with pytest.raises(ValueError):
        write_folder(tmp_path / "bad", imgs[0], masks)


def test_touching_cells_without_gap_are_instance_labels():
    # gap=False: cells stay in contact (no background line), each id one piece of >= 12 pixels
    imgs, masks, inst = touching_cells(4, size=96, seed=0, gap=False)
    with_gap = touching_cells(4, size=96, seed=0)
    contacts = 0
    for i in range(4):
        lab = inst[i]
        ids = np.unique(lab)
        assert np.array_equal(ids, np.arange(len(ids)))
        assert label_components(lab, 4, by_value=True).max() == lab.max()
        assert np.bincount(lab.ravel())[1:].min() >= 12
        contacts += int(np.count_nonzero((lab[:, 1:] > 0) & (lab[:, :-1] > 0)
                                         & (lab[:, 1:] != lab[:, :-1])))
    assert contacts > 20
    np.testing.assert_array_equal(masks, inst > 0)
    # the default (with a gap) is unchanged by the option's existence
    assert len(with_gap) == 3 and with_gap[2].dtype == np.int32

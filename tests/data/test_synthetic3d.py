"""Synthetic touching spheres (volumes) and writing volumes as .npy files."""
import os

import numpy as np
import pytest

from unet_np.data.synthetic import touching_spheres, write_volumes
from unet_np.data.weightmap import label_components, weight_map


def _neighbours(vol):
    """The 26 neighbours' values of every voxel, as a (26, D, H, W) stack (0 outside)."""
    d, h, w = vol.shape
    pad = np.pad(vol, 1)
    return np.stack([pad[z:z + d, y:y + h, x:x + w] for z, y, x in np.ndindex(3, 3, 3)
                     if (z, y, x) != (1, 1, 1)])


def test_touching_spheres_shapes_and_determinism():
    imgs, masks, inst = touching_spheres(3, size=(12, 20, 16), seed=7)
    assert imgs.shape == (3, 1, 12, 20, 16) and imgs.dtype == np.float32
    assert masks.shape == (3, 12, 20, 16) and masks.dtype == np.int64
    assert inst.shape == (3, 12, 20, 16) and inst.dtype == np.int32
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0
    np.testing.assert_array_equal(masks, inst > 0)
    again = touching_spheres(3, size=(12, 20, 16), seed=7)
    for a, b in zip((imgs, masks, inst), again):
        np.testing.assert_array_equal(a, b)
    # volume i does not depend on n; another seed gives another volume
    np.testing.assert_array_equal(touching_spheres(1, size=(12, 20, 16), seed=7)[2][0], inst[0])
    assert not np.array_equal(touching_spheres(1, size=(12, 20, 16), seed=8)[2][0], inst[0])
    with pytest.raises(ValueError, match="positive size"):
        touching_spheres(1, size=(0, 4, 4))


def test_spheres_touch_and_are_separated_by_background():
    imgs, masks, inst = touching_spheres(3, size=24, seed=0)
    between_total = 0
    for i in range(3):
        ids = np.unique(inst[i])
        assert ids[0] == 0 and np.array_equal(ids, np.arange(len(ids)))    # numbered 1..K
        assert len(ids) >= 4
        nbrs = _neighbours(inst[i])
        # no two different spheres are 26-neighbours: a layer of background always separates them
        assert not np.any((inst[i] > 0) & (nbrs > 0) & (nbrs != inst[i]))
        # the mask alone gives back the instances, even with the widest connectivity
        assert label_components(masks[i], connectivity=26).max() == inst[i].max()
        # background voxels with two different spheres among their neighbours: the thin layers
        lo = np.where(nbrs > 0, nbrs, np.iinfo(np.int32).max).min(axis=0)
        between = (inst[i] == 0) & (nbrs.max(axis=0) > lo) & (lo > 0)
        between_total += int(between.sum())
        if between.any():                  # where spheres touch, the 3-D weight map is high
            assert weight_map(inst[i], spatial_dims=3)[between].mean() > 5.0
    assert between_total > 20
    # spheres are brighter than background on average, despite the illumination field
    assert imgs[:, 0][masks == 1].mean() > imgs[:, 0][masks == 0].mean() + 0.2


def test_spheres_without_gap_stay_in_contact():
    _, masks, inst = touching_spheres(2, size=20, seed=3, gap=False)
    touching = 0
    for i in range(2):
        nbrs = _neighbours(inst[i])
        touching += int(np.sum((inst[i] > 0) & (nbrs > 0) & (nbrs != inst[i])))
        # each id is one 6-connected piece
        pieces = label_components(inst[i], by_value=True)
        assert pieces.max() == inst[i].max()
    assert touching > 0


def test_write_volumes_round_trip(tmp_path):
    imgs, masks, inst = touching_spheres(2, size=(6, 8, 10), seed=1)
    idir, mdir = write_volumes(tmp_path / "set", imgs, masks)
    assert sorted(os.listdir(idir)) == sorted(os.listdir(mdir)) == ["vol_0000.npy", "vol_0001.npy"]
    for i, name in enumerate(["vol_0000.npy", "vol_0001.npy"]):
        x = np.load(idir / name, allow_pickle=False)
        m = np.load(mdir / name, allow_pickle=False)
        assert x.shape == (1, 6, 8, 10) and x.dtype == np.float32
        assert m.shape == (6, 8, 10) and m.dtype == np.uint8
        np.testing.assert_array_equal(x, imgs[i])
        np.testing.assert_array_equal(m, masks[i])
    # instance ids beyond 255 keep their values; named files; nothing half-written is left
    big = inst[:1].astype(np.int64) * 300
    write_volumes(tmp_path / "ids", imgs[:1], big, names=["a"])
    m = np.load(tmp_path / "ids" / "masks" / "a.npy")
    assert m.dtype == np.uint16
    np.testing.assert_array_equal(m, big[0])
    assert not [f for f in os.listdir(tmp_path / "ids" / "masks") if f.startswith(".")]


def test_write_volumes_bad_input(tmp_path):
    imgs, masks, _ = touching_spheres(1, size=(4, 6, 6), seed=0)
    with pytest.raises(ValueError, match=r"\(N, C, D, H, W\)"):
        write_volumes(tmp_path, imgs[:, 0], masks)
    with pytest.raises(ValueError, match="same D, H, W"):
        write_volumes(tmp_path, imgs, masks[:, :3])
    with pytest.raises(ValueError, match="non-negative integer"):
        write_volumes(tmp_path, imgs, masks - 1)
    with pytest.raises(ValueError, match="names"):
        write_volumes(tmp_path, imgs, masks, names=["a", "b"])

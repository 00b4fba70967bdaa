"""The weight map's tools in 3-D: the exact distance transform against scipy, connected components
against scipy.ndimage.label and a flood fill, and the paper's weight map from 3-D objects against
the formula evaluated on whole-volume distances."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unet_np.data.weightmap import (edt, edt_squared, label_components, weight_map,
                                    weight_map_from_mask)

ndimage = pytest.importorskip("scipy.ndimage")


def _random_volume(shape, p, seed):
    return np.random.default_rng(seed).random(shape) < p


def test_edt_3d_equals_scipy():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(30):
        shape = tuple(int(v) for v in rng.integers(1, 14, size=3))
        f = rng.random(shape) < rng.uniform(0.001, 0.3)
        if not f.any():
            f[tuple(int(rng.integers(n)) for n in shape)] = True
        ours = edt(f, spatial_dims=3)
        ref = ndimage.distance_transform_edt(~f)    # scipy: the distance to the nearest zero
        worst = max(worst, float(np.max(np.abs(ours - ref))))
    assert worst < 1e-12, worst         # measured: 0 (both exact, sums of integer squares)


@settings(max_examples=25, deadline=None)
@given(st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)), st.floats(0.0, 0.4),
       st.integers(0, 2 ** 31 - 1))
def test_edt_3d_drawn_shapes(shape, p, seed):
    f = _random_volume(shape, p, seed)
    ours = edt(f, spatial_dims=3)
    if not f.any():
        assert np.all(np.isinf(ours))
        return
    # both are the square root of the same integer: equal to the last bit
    np.testing.assert_array_equal(ours, ndimage.distance_transform_edt(~f))


def test_edt_3d_anisotropic_spacing_and_batch():
    rng = np.random.default_rng(1)
    f = rng.random((2, 6, 11, 8)) < 0.03
    f[:, 0, 0, 0] = True
    spacing = (4.0, 1.0, 0.5)            # thin-slice: slices four pixels apart
    d = edt(f, spatial_dims=3, spacing=spacing)
    assert d.shape == f.shape
    for i in range(2):                   # the leading axis is a batch of volumes
        ref = ndimage.distance_transform_edt(~f[i], sampling=spacing)
        np.testing.assert_allclose(d[i], ref, rtol=1e-14, atol=0)
    # one point: the squared distance written out
    g = np.zeros((5, 6, 7), bool)
    g[1, 4, 2] = True
    zz, yy, xx = np.mgrid[0:5, 0:6, 0:7]
    np.testing.assert_array_equal(edt_squared(g, 3), (zz - 1) ** 2 + (yy - 4) ** 2 + (xx - 2) ** 2)
    # 2-D stays 2-D: a (D, H, W) array without spatial_dims=3 is a stack of images
    np.testing.assert_array_equal(edt(g)[1], edt(g[1]))
    assert np.isinf(edt(g)[0]).all()


def test_edt_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        edt(np.ones((3, 3, 3)), spatial_dims=4)
    with pytest.raises(ValueError, match=r"\(\.\.\., D, H, W\)"):
        edt(np.ones((3, 3)), spatial_dims=3)
    with pytest.raises(ValueError, match="spacing"):
        edt(np.ones((3, 3, 3)), spatial_dims=3, spacing=(1, 1))


_STRUCTURE = {6: 1, 18: 2, 26: 3}     # scipy's generate_binary_structure(3, rank)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_components_3d_equal_scipy(connectivity):
    structure = ndimage.generate_binary_structure(3, _STRUCTURE[connectivity])
    rng = np.random.default_rng(connectivity)
    for _ in range(12):
        shape = tuple(int(v) for v in rng.integers(1, 12, size=3))
        m = rng.random(shape) < rng.uniform(0.1, 0.55)
        ref, count = ndimage.label(m, structure)
        ours = label_components(m, connectivity)
        # scipy numbers components in the raster order of their first voxel, as we do
        np.testing.assert_array_equal(ours, ref)
        assert ours.dtype == np.int32 and ours.max() == count


def test_components_3d_every_neighbour_offset():
    """The centre voxel and one of its 26 neighbours: one component exactly when the connectivity
    counts that neighbour (6: differs in one coordinate, 18: in at most two, 26: any)."""
    for off in np.ndindex(3, 3, 3):
        if off == (1, 1, 1):
            continue
        v = np.zeros((3, 3, 3), int)
        v[1, 1, 1] = v[off] = 1
        differ = sum(o != 1 for o in off)
        for conn, most in ((6, 1), (18, 2), (26, 3)):
            assert label_components(v, conn).max() == (1 if differ <= most else 2), (off, conn)
    assert label_components(v).max() == 2          # default 6 in 3-D; v's last pair is a vertex


def test_components_3d_by_hand():
    # no joining across the wrap of a row or a slice: the last row of a slice and the first of the
    # next, the last voxel of a row and the first of the next row
    w = np.zeros((2, 3, 4), int)
    w[0, 2, :] = 1                            # rows 2 and 3 of the (D*H, W) row list
    w[1, 0, :] = 1
    assert label_components(w, 26).max() == 2
    u = np.zeros((1, 2, 4), int)
    u[0, 0, 3] = u[0, 1, 0] = 1               # a row's end and the next row's start
    assert label_components(u, 26).max() == 2
    # by_value: touching ids stay apart
    ids = np.zeros((2, 2, 4), int)
    ids[:, :, :2], ids[:, :, 2:] = 3, 7
    lab = label_components(ids, by_value=True)
    assert lab.max() == 2 and len(np.unique(lab[ids == 3])) == 1


def test_components_bad_arguments():
    with pytest.raises(ValueError, match=r"one of \(6, 18, 26\)"):
        label_components(np.ones((2, 2, 2)), connectivity=8)
    with pytest.raises(ValueError, match=r"one of \(4, 8\)"):
        label_components(np.ones((2, 2)), connectivity=6)
    with pytest.raises(ValueError, match=r"\(D, H, W\)"):
        label_components(np.ones((2, 2, 2, 2)))


def _two_balls(shape=(12, 16, 20), gap=2):
    zz, yy, xx = np.mgrid[[slice(0, n) for n in shape]]
    inst = np.zeros(shape, np.int32)
    inst[(zz - 6) ** 2 + (yy - 8) ** 2 + (xx - 5) ** 2 <= 16] = 1
    inst[(zz - 6) ** 2 + (yy - 8) ** 2 + (xx - (10 + gap + 3)) ** 2 <= 16] = 2
    inst[(zz - 1) ** 2 + (yy - 1) ** 2 + (xx - 18) ** 2 <= 2] = 3
    return inst


def test_weight_map_3d_against_the_formula():
    """Border term from whole-volume distances to each 3-D object (scipy), d1 <= d2 the two
    smallest; our map takes them inside each object's grown bounding box only."""
    inst = _two_balls()
    w0, sigma = 10.0, 3.0
    dists = np.sort(np.stack([ndimage.distance_transform_edt(inst != k) for k in (1, 2, 3)]), axis=0)
    d1, d2 = dists[0], dists[1]
    ref = np.where(inst == 0, w0 * np.exp(-(d1 + d2) ** 2 / (2 * sigma ** 2)), 0.0) + 1.0
    ours = weight_map(inst, w0=w0, sigma=sigma, class_balance=False, spatial_dims=3)
    assert ours.shape == inst.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8)
    # the gap between the two balls is where the weight is high
    assert ours[6, 8, 10] > 1 + 0.75 * w0                 # d1 = d2 = 1 there: 1 + 10 exp(-4/18)
    # class balance on top, and the stack form (N, D, H, W)
    wb = weight_map(inst, w0=w0, sigma=sigma, spatial_dims=3)
    fg = (inst > 0).mean()
    np.testing.assert_allclose(wb[inst > 0], 1 / (2 * fg), rtol=1e-6)
    stack = weight_map(np.stack([inst, inst[::-1]]), w0=w0, sigma=sigma, spatial_dims=3)
    np.testing.assert_array_equal(stack[1], wb[::-1])


def test_weight_map_3d_is_not_slice_by_slice():
    """In 3-D the objects are 3-D: a slice that cuts only one ball still gets the border term from
    the other ball in a neighbouring slice, which a stack of 2-D maps would miss."""
    inst = np.zeros((3, 8, 8), np.int32)
    inst[0, 2:6, 0:3] = 1
    inst[2, 2:6, 5:8] = 2
    vol = weight_map(inst, class_balance=False, spatial_dims=3)
    stack = weight_map(inst, class_balance=False)        # read as three images
    assert vol[1, 4, 4] > 2.0 and stack[1, 4, 4] == 1.0


def test_weight_map_from_mask_3d():
    inst = _two_balls()
    m = (inst > 0).astype(np.int64)
    np.testing.assert_array_equal(weight_map_from_mask(m),
                                  weight_map(label_components(m), labels=m, spatial_dims=3))
    with pytest.raises(ValueError, match=r"spatial_dims=3\) needs instance labels \(D, H, W\)"):
        weight_map(np.zeros((2, 2, 3, 3, 3), int), spatial_dims=3)

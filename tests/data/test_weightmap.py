import numpy as np
import pytest
from hypothesis import given, strategies as st

from unet_np.data.weightmap import (class_weights, edt, edt_squared, label_components,
                                    weight_map, weight_map_from_mask)


def brute_edt(features):
    """Distance to the nearest True pixel by trying every one of them."""
    h, w = features.shape
    pts = np.argwhere(features)
    if len(pts) == 0:
        return np.full((h, w), np.inf)
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    return np.sqrt(d2.min(axis=-1))


def brute_components(mask, connectivity, by_value=False):
    """Flood fill, one component at a time (by_value: neighbours join only with equal values)."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=np.int64)
    nbrs = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        nbrs += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    k = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not out[y, x]:
                k += 1
                out[y, x] = k
                stack = [(y, x)]
                while stack:
                    cy, cx = stack.pop()
                    for dy, dx in nbrs:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not out[ny, nx] \
                                and (not by_value or mask[ny, nx] == mask[cy, cx]):
                            out[ny, nx] = k
                            stack.append((ny, nx))
    return out


masks_st = st.tuples(st.integers(1, 14), st.integers(1, 14), st.floats(0.0, 0.6),
                     st.integers(0, 2 ** 31 - 1))


def _random_mask(h, w, p, seed):
    return np.random.default_rng(seed).random((h, w)) < p


@given(masks_st)
def test_edt_matches_brute_force(args):
    f = _random_mask(*args)
    np.testing.assert_allclose(edt(f), brute_edt(f), rtol=0, atol=1e-12)


def test_edt_fixed_cases():
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(1, 25, size=2)
        f = rng.random((h, w)) < rng.uniform(0.0, 0.3)
        np.testing.assert_allclose(edt(f), brute_edt(f), rtol=0, atol=1e-12)
    # a single point: exact distances, squared version integer-valued
    f = np.zeros((7, 9), bool)
    f[2, 3] = True
    yy, xx = np.mgrid[0:7, 0:9]
    np.testing.assert_array_equal(edt_squared(f), (yy - 2) ** 2 + (xx - 3) ** 2)


def test_edt_batch_and_empty():
    rng = np.random.default_rng(1)
    f = rng.random((3, 2, 10, 12)) < 0.1
    f[1, 1] = False
    d = edt(f)
    assert d.shape == f.shape and d.dtype == np.float64
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(d[i, j], brute_edt(f[i, j]), atol=1e-12)
    assert np.all(np.isinf(d[1, 1]))
    with pytest.raises(ValueError):
        edt(np.zeros(5, bool))


def test_edt_against_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(2)
    f = rng.random((64, 80)) < 0.02
    np.testing.assert_allclose(edt(f), ndimage.distance_transform_edt(~f), atol=1e-10)


@given(masks_st, st.sampled_from([4, 8]))
def test_label_components_matches_flood_fill(args, conn):
    m = _random_mask(*args)
    ours = label_components(m, conn)
    ref = brute_components(m, conn)
    # same numbering too: both number components by their first pixel in row-major order
    np.testing.assert_array_equal(ours, ref)
    assert ours.dtype == np.int32


@given(masks_st, st.sampled_from([4, 8]), st.integers(1, 4))
def test_label_components_by_value_matches_flood_fill(args, conn, n_values):
    # label images: neighbouring pixels of different ids are different components
    h, w, p, seed = args
    rng = np.random.default_rng(seed)
    m = np.where(rng.random((h, w)) < p, 0, rng.integers(1, n_values + 1, size=(h, w)))
    m = m * 16381  # ids far apart, up to 65524
    np.testing.assert_array_equal(label_components(m, conn, by_value=True),
                                  brute_components(m, conn, by_value=True))


def test_label_components_large_image_is_fast():
    # run-based: a 1024 x 1024 random mask (about 50,000 components) in well under a second
    import time
    m = np.random.default_rng(0).random((1024, 1024)) < 0.4
    t0 = time.perf_counter()
    lab = label_components(m)
    assert time.perf_counter() - t0 < 3.0
    assert lab.max() > 10000 and np.array_equal(lab > 0, m)


def test_label_components_long_snake():
    # a serpentine path: one component however long the chain of neighbours
    m = np.zeros((41, 41), bool)
    m[::2, :] = True
    m[1::4, -1] = True
    m[3::4, 0] = True
    assert label_components(m).max() == 1
    with pytest.raises(ValueError):
        label_components(m, connectivity=6)


def test_weight_map_two_walls_by_hand():
    # Two objects: columns 0-1 and columns 7-10 on 3 rows; background gap = columns 2..6.
    # Between two parallel walls d1 + d2 = 6 on every gap pixel (e.g. col 4: 3 + 3, col 2: 1 + 5).
    inst = np.zeros((3, 11), dtype=np.int64)
    inst[:, 0:2] = 1
    inst[:, 7:11] = 2
    w0, sigma = 10.0, 5.0
    border = w0 * np.exp(-(6.0 ** 2) / (2 * sigma ** 2))
    w = weight_map(inst, w0=w0, sigma=sigma, class_balance=False)
    assert w.dtype == np.float32 and w.shape == inst.shape
    np.testing.assert_allclose(w[:, 2:7], 1.0 + border, rtol=1e-6)
    np.testing.assert_allclose(w[inst > 0], 1.0, rtol=1e-6)
    # class balance: 18 object pixels, 15 background, 33 in all -> 33/(2*15) and 33/(2*18)
    wb = weight_map(inst, w0=w0, sigma=sigma, class_balance=True)
    np.testing.assert_allclose(wb[:, 2:7], 33 / 30 + border, rtol=1e-6)
    np.testing.assert_allclose(wb[inst > 0], 33 / 36, rtol=1e-6)


def test_weight_map_diagonal_by_hand():
    inst = np.zeros((5, 5), dtype=np.int32)
    inst[0, 0] = 1
    inst[0, 4] = 2
    w = weight_map(inst, w0=10.0, sigma=5.0, class_balance=False)
    # pixel (3, 2): sqrt(13) from each object, (2 sqrt 13)^2 = 52
    assert w[3, 2] == pytest.approx(1.0 + 10.0 * np.exp(-52.0 / 50.0), rel=1e-6)
    # pixel (0, 1): 1 and 3 -> (1 + 3)^2 = 16
    assert w[0, 1] == pytest.approx(1.0 + 10.0 * np.exp(-16.0 / 50.0), rel=1e-6)


def test_weight_map_edge_cases():
    one = np.zeros((6, 6), int)
    one[2:4, 2:4] = 7
    np.testing.assert_allclose(weight_map(one, class_balance=False), 1.0)  # no second object
    np.testing.assert_allclose(weight_map(np.zeros((4, 4), int)), 1.0)
    # w0 = 0 leaves class weights only; their mean is 1
    two = one.copy()
    two[0, 0] = 3
    wc = weight_map(two, w0=0.0)
    np.testing.assert_allclose(wc.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(class_weights(two > 0), wc, rtol=1e-6)
    stack = weight_map(np.stack([one, two]))
    assert stack.shape == (2, 6, 6)
    with pytest.raises(ValueError):
        weight_map(two, sigma=0)
    with pytest.raises(ValueError):
        weight_map(np.zeros(3, int))


def test_weight_map_border_on():
    # two objects touching without a gap: the border term goes where border_on says
    inst = np.zeros((3, 6), dtype=np.int64)
    inst[:, 0:3] = 1
    inst[:, 3:6] = 2
    plain = weight_map(inst, class_balance=False)
    np.testing.assert_allclose(plain, 1.0)  # no background, so no border term
    on = np.zeros((3, 6), bool)
    on[:, 2:4] = True
    w = weight_map(inst, class_balance=False, border_on=on)
    # column 2: d1 = 0 (its own object), d2 = 1 -> 1 + 10 exp(-1/50)
    np.testing.assert_allclose(w[:, 2:4], 1.0 + 10.0 * np.exp(-1.0 / 50.0), rtol=1e-6)
    np.testing.assert_allclose(w[:, [0, 1, 4, 5]], 1.0)
    with pytest.raises(ValueError, match="border_on"):
        weight_map(inst, border_on=on[:, :5])


def test_weight_map_from_mask_uses_components():
    m = np.zeros((3, 11), int)
    m[:, 0:2] = 1
    m[:, 7:11] = 1
    inst = label_components(m)
    np.testing.assert_allclose(weight_map_from_mask(m), weight_map(inst, labels=m))
    assert weight_map_from_mask(m)[1, 4] > 5.0


def test_weight_map_windows_match_full_transforms():
    # weight_map computes each object's distances only near it; compare with full-image transforms
    from unet_np.data.synthetic import touching_cells
    from unet_np.data.weightmap import border_reach
    _, masks, inst = touching_cells(2, size=(70, 90), seed=5)
    for w0, sigma in ((10.0, 5.0), (3.0, 2.0), (10.0, 12.0)):
        for i in range(2):
            ids = np.unique(inst[i])[1:]
            d = np.sort(edt(inst[i][None] == ids[:, None, None]), axis=0)
            full = w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma ** 2)) * (inst[i] == 0)
            ours = weight_map(inst[i], w0=w0, sigma=sigma, class_balance=False)
            np.testing.assert_allclose(ours, 1.0 + full, rtol=0, atol=1e-6)
    assert border_reach(10.0, 5.0) == pytest.approx(5.0 * np.sqrt(2 * np.log(1e10)))
    assert border_reach(0.0, 5.0) == 0.0

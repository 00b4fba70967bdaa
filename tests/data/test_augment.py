import numpy as np
import pytest
from hypothesis import given, strategies as st

from unet_np.data.augment import compose, displacement_field, elastic, flip_rotate, warp
from unet_np.data.synthetic import touching_cells


def _sample(h=32, w=32, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.random((2, h, w)).astype(np.float32)
    mask = rng.integers(0, 4, size=(h, w))
    weight = rng.random((h, w)).astype(np.float32)
    return img, mask, weight


def test_flip_rotate_is_a_symmetry_applied_to_all():
    img, mask, weight = _sample(8, 8)
    seen = set()
    for seed in range(60):
        x, m, w = flip_rotate(img, mask, weight, rng=seed)
        # the same transform for all three: the channel built from the mask follows it
        found = False
        for k in range(4):
            for flip in (False, True):
                def f(a):
                    a = np.rot90(a, k, axes=(-2, -1))
                    return a[..., ::-1] if flip else a
                if (np.array_equal(x, f(img)) and np.array_equal(m, f(mask))
                        and np.array_equal(w, f(weight))):
                    found = True
                    seen.add((k, flip))
        assert found
    assert len(seen) == 8


def test_flip_rotate_keeps_non_square_shape():
    img, mask, weight = _sample(6, 10)
    for seed in range(20):
        x, m, w = flip_rotate(img, mask, None, rng=seed)
        assert x.shape == img.shape and m.shape == mask.shape and w is None


def test_elastic_sigma_zero_is_identity():
    img, mask, weight = _sample(17, 23)
    x, m, w = elastic(img, mask, weight, rng=3, sigma=0.0)
    np.testing.assert_array_equal(x, img)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_array_equal(w, weight)
    # a zero field through warp is exact too (bilinear weights 1 and 0 on the grid)
    x, m, w = warp(img, mask, weight, np.zeros((2, 17, 23)))
    np.testing.assert_array_equal(x, img)
    np.testing.assert_array_equal(m, mask)


def test_elastic_deterministic_and_moves_pixels():
    img, mask, weight = _sample()
    a = elastic(img, mask, weight, rng=np.random.default_rng(5))
    b = elastic(img, mask, weight, rng=np.random.default_rng(5))
    c = elastic(img, mask, weight, rng=np.random.default_rng(6))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], img)
    assert a[0].dtype == np.float32 and a[1].dtype == mask.dtype and a[2].dtype == np.float32


def test_displacement_field_is_smooth_with_given_scale():
    f = displacement_field((64, 64), rng=0, grid=3, sigma=10.0)
    assert f.shape == (2, 64, 64)
    # interpolating: at the grid points (corners, centre) the field has the drawn vectors,
    # whose spread over many draws is sigma
    corners = np.concatenate([displacement_field((9, 9), rng=s, sigma=10.0)[:, ::4, ::4].ravel()
                              for s in range(200)])
    assert 9.0 < corners.std() < 11.0
    # smooth: neighbouring pixels differ by far less than sigma
    assert np.abs(np.diff(f, axis=-1)).max() < 2.0
    assert np.abs(np.diff(f, axis=-2)).max() < 2.0


def test_image_and_mask_stay_aligned():
    _, masks, inst = touching_cells(2, 64, seed=4)
    for i in range(2):
        m = masks[i]
        img = m[None].astype(np.float32)
        stacked = np.stack([m, inst[i]])
        x, mm, _ = elastic(img, stacked, None, rng=i, sigma=8.0)
        agree = (x[0] > 0.5) == (mm[0] == 1)
        assert agree.mean() > 0.98
        # the instance labels moved with the class labels
        assert np.array_equal(mm[1] > 0, mm[0] == 1)


sizes = st.tuples(st.integers(1, 33), st.integers(1, 33))


@given(sizes, st.integers(1, 5), st.floats(0.0, 20.0), st.integers(0, 10 ** 6))
def test_elastic_label_set_never_grows(hw, grid, sigma, seed):
    h, w = hw
    rng = np.random.default_rng(seed)
    img = rng.random((1, h, w)).astype(np.float32)
    mask = rng.choice(np.array([0, 3, 7]), size=(h, w))
    weight = rng.random((h, w)).astype(np.float32)
    x, m, wt = elastic(img, mask, weight, rng=seed, grid=grid, sigma=sigma)
    assert x.shape == img.shape and m.shape == mask.shape and wt.shape == weight.shape
    assert set(np.unique(m)) <= set(np.unique(mask))
    # bilinear with mirrored sampling never leaves the range of the input
    assert x.min() >= img.min() - 1e-6 and x.max() <= img.max() + 1e-6
    assert np.all(np.isfinite(wt))


def test_compose_and_bad_shapes():
    img, mask, weight = _sample(16, 16)
    aug = compose(flip_rotate, elastic)
    a = aug(img, mask, weight, 1)
    b = aug(img, mask, weight, 1)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError):
        elastic(img[0], mask)
    with pytest.raises(ValueError):
        elastic(img, mask[:5])
    with pytest.raises(ValueError):
        flip_rotate(img, mask, weight[:3])
    with pytest.raises(ValueError):
        elastic(img, mask, sigma=-1.0)

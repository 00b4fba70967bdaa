"""Augmentation of volumes (unet_np.data.augment3d, reached through augment.flip_rotate / elastic):
the cube's 48 symmetries, shape-keeping ones otherwise, in-plane ones on request; the 3-D elastic
field; image, labels and weights moved alike; every random draw from the generator passed in."""
import itertools

import numpy as np
import pytest

from unet_np.data.augment import compose, elastic, flip_rotate
from unet_np.data.augment3d import (allowed_axis_orders, displacement_field3d, elastic3d,
                                    flip_rotate3d, warp3d)


def _sample(shape, seed=0, channels=2):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((channels,) + shape)
    mask = rng.integers(0, 5, size=shape)
    weight = rng.random(shape)
    return image, mask, weight


def _signed_permutations(a):
    """All 48 signed permutations of the three axes of a (D, H, W) cube, as arrays."""
    out = []
    for order in itertools.permutations(range(3)):
        for mirror in itertools.product((False, True), repeat=3):
            b = np.transpose(a, order)
            flip = tuple(i for i in range(3) if mirror[i])
            out.append(np.flip(b, flip) if flip else b)
    return out


def _outcomes(shape, draws, **kw):
    """The distinct results of flip_rotate on a volume of unique values, and how often each came."""
    vol = np.arange(np.prod(shape)).reshape(shape)
    rng = np.random.default_rng(0)
    seen = {}
    for _ in range(draws):
        img, m, w = flip_rotate(vol[None].astype(float), vol, vol.astype(float), rng, **kw)
        assert img.shape[1:] == m.shape == w.shape == shape
        # image, mask and weight moved alike
        np.testing.assert_array_equal(img[0], m)
        np.testing.assert_array_equal(w, m)
        key = m.tobytes()
        seen[key] = seen.get(key, 0) + 1
    return seen, vol


def test_cube_gets_all_48_symmetries_equally_often():
    seen, vol = _outcomes((3, 3, 3), 4800)
    group = {g.tobytes() for g in _signed_permutations(vol)}
    assert len(group) == 48 and set(seen) == group
    counts = np.array(list(seen.values()))
    # 100 expected each; a 5-sigma band of the binomial (sd about 9.9)
    assert counts.min() > 50 and counts.max() < 150, counts


@pytest.mark.parametrize("shape,kw,n", [
    ((2, 4, 4), {}, 16),              # H = W: the square's 8 in-plane symmetries x a mirror in D
    ((2, 3, 4), {}, 8),               # three lengths: mirrors only
    ((4, 4, 3), {}, 16),              # D = H: D and H may swap
    ((3, 3, 3), dict(in_plane=True), 16),   # thin slices: D never swaps, but may be mirrored
    ((4, 4, 3), dict(in_plane=True), 8),
])
def test_other_shapes_keep_their_shape(shape, kw, n):
    seen, vol = _outcomes(shape, 600, **kw)
    assert len(seen) == n
    for key in seen:                  # every outcome is a signed permutation of vol's axes
        out = np.frombuffer(key, dtype=vol.dtype).reshape(shape)
        assert sorted(out.ravel()) == list(range(vol.size))
    assert len(allowed_axis_orders(shape, kw.get("in_plane", False))) * 8 == n


def test_label_stacks_and_channels_follow():
    image, mask, weight = _sample((4, 4, 4), seed=1, channels=3)
    stack = np.stack([mask, mask * 2])                       # (K, D, H, W) labels
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    x, m, w = flip_rotate3d(image, stack, weight, rng_a)
    x1, m1, w1 = flip_rotate3d(image, mask, None, rng_b)      # same draws, same transform
    np.testing.assert_array_equal(m[0], m1)
    np.testing.assert_array_equal(m[1], 2 * m1)
    np.testing.assert_array_equal(x, x1)
    assert w1 is None and w.shape == (4, 4, 4)
    assert rng_a.bit_generator.state == rng_b.bit_generator.state


def test_seeded_and_every_draw_from_rng():
    image, mask, weight = _sample((4, 5, 6))
    a = elastic(image, mask, weight, rng=np.random.default_rng(3), sigma=2.0)
    b = elastic(image, mask, weight, rng=np.random.default_rng(3), sigma=2.0)
    c = elastic(image, mask, weight, rng=np.random.default_rng(4), sigma=2.0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    # the global generator plays no part
    np.random.seed(0)
    d = compose(flip_rotate, elastic)(image, mask, weight, rng=5)
    np.random.seed(1)
    e = compose(flip_rotate, elastic)(image, mask, weight, rng=5)
    for u, v in zip(d, e):
        np.testing.assert_array_equal(u, v)
    # the draws: flip_rotate3d takes one integer and three mirror bits; elastic3d one lattice
    rng, ref = np.random.default_rng(9), np.random.default_rng(9)
    flip_rotate3d(image, mask, weight, rng)
    elastic3d(image, mask, weight, rng, grid=(2, 3, 3), sigma=1.0)
    ref.integers(len(allowed_axis_orders((4, 5, 6))))
    ref.integers(2, size=3)
    ref.normal(0.0, 1.0, size=(3, 2, 3, 3))
    assert rng.bit_generator.state == ref.bit_generator.state


def test_field_passes_through_the_lattice():
    """The Catmull-Rom cubic interpolates: at the lattice points (the corners and evenly between)
    the field is the drawn vectors, scaled per axis by sigma."""
    sig = (0.0, 2.0, 3.0)
    f = displacement_field3d((5, 9, 7), np.random.default_rng(2), grid=(3, 5, 4), sigma=sig)
    coarse = np.random.default_rng(2).normal(0.0, 1.0, size=(3, 3, 5, 4))
    assert f.shape == (3, 5, 9, 7)
    for i, zi in enumerate((0, 2, 4)):
        for j, yi in enumerate((0, 2, 4, 6, 8)):
            for k, xi in enumerate((0, 2, 4, 6)):
                np.testing.assert_allclose(f[:, zi, yi, xi], coarse[:, i, j, k] * np.array(sig),
                                           rtol=1e-12, atol=1e-12)
    assert np.all(f[0] == 0)          # sigma_d = 0: voxels stay in their slice


def test_warp_samples_where_the_field_points():
    """Image channels holding the voxel coordinates come back as the (mirrored) sample points,
    exactly (trilinear interpolation reproduces linear functions); a mask of unique ids tells
    which voxel the nearest-neighbour sample took; the weight moves as the image does."""
    shape = (6, 7, 8)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    image = np.stack([zz, yy, xx])
    ids = np.arange(np.prod(shape)).reshape(shape)
    field = displacement_field3d(shape, np.random.default_rng(0), sigma=1.5)
    x, m, w = warp3d(image, ids, 2.0 * yy + 1.0, field)

    def mirror(c, n):
        c = np.abs(c)
        return np.where(c > n - 1, 2 * (n - 1) - c, c)
    pts = [mirror(g + d, n) for g, d, n in zip((zz, yy, xx), field, shape)]
    assert np.max(np.abs(field)) < 5                     # one reflection is enough here
    for a, p in zip(x, pts):
        np.testing.assert_allclose(a, p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, 2.0 * pts[1] + 1.0, rtol=0, atol=1e-12)
    near = [np.clip(np.rint(p), 0, n - 1).astype(int) for p, n in zip(pts, shape)]
    np.testing.assert_array_equal(m, ids[tuple(near)])
    assert m.dtype == ids.dtype


def test_elastic_moves_labels_without_inventing_values():
    image, mask, weight = _sample((6, 8, 8), seed=3)
    x, m, w = elastic(image.astype(np.float32), mask, weight.astype(np.float32),
                      rng=np.random.default_rng(1), sigma=3.0)
    assert x.dtype == np.float32 and w.dtype == np.float32 and m.dtype == mask.dtype
    assert set(np.unique(m)) <= set(np.unique(mask))
    assert not np.array_equal(m, mask)
    assert x.shape == image.shape and m.shape == mask.shape == w.shape
    same = elastic3d(image, mask, weight, rng=0, sigma=0.0)
    np.testing.assert_array_equal(same[1], mask)
    np.testing.assert_array_equal(same[0], image)


def test_bad_volume_samples():
    image, mask, weight = _sample((4, 4, 4))
    with pytest.raises(ValueError, match=r"mask .* \(D, H, W\)"):
        flip_rotate(image, mask[:, :3], weight, rng=0)
    with pytest.raises(ValueError, match=r"weight .* \(D, H, W\)"):
        elastic(image, mask, weight[:2], rng=0)
    with pytest.raises(ValueError, match="three"):
        elastic3d(image, mask, weight, rng=0, sigma=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        flip_rotate3d(image[0], mask, weight, rng=0)

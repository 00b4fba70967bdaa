"""Augmentations for volumes: the 3-D forms of augment.py's flips, rotations and elastic deformation.

Every function takes (image, mask, weight=None, rng=None) and returns (image, mask, weight), as in
2-D:
    image  (C, D, H, W) float        resampled with trilinear interpolation
    mask   (D, H, W) or (K, D, H, W) integer labels, resampled with nearest neighbour
    weight (D, H, W) float or None   loss weight map, trilinear
    rng    a numpy Generator or an int seed (None: fresh entropy); every random draw comes from it
augment.flip_rotate and augment.elastic hand a 4-D image to these functions, so the names 'basic'
and 'elastic' of Trainer.fit work on volumes too.

Flips and rotations (flip_rotate3d). The symmetries of a cube are the 48 signed permutations of its
axes: put the three axes in any order (6 ways) and mirror any of them (8 ways); the 24 with an even
number of mirrors-and-swaps are the rotations, the other 24 add a reflection. A segmentation is as
valid after any of them, so all 48 are drawn, equally likely, for a cube.
    Choice for other volumes: only transforms that keep the shape (so a batch can be stacked):
    every mirror (8), but a swap of two axes only when they have the same length. A (D, H, W)
    volume with H = W and D different gets the square's 8 symmetries in the H-W plane, times a
    mirror in D (16); one with three different lengths gets the 8 mirrors.
    in_plane=True never swaps D with H or W, even when their lengths match: for thin-slice volumes
    (CT, MRI, electron microscopy) whose slices are farther apart than their pixels, a swap would
    turn a slice into a different-looking volume. Mirrors are always allowed, D's too: a mirror
    keeps the spacing along every axis.

Elastic deformation (elastic3d): the U-Net paper's deformation with one more axis: random
displacement vectors (dz, dy, dx) on a coarse grid x grid x grid lattice, N(0, sigma^2) voxels, a
Catmull-Rom cubic along each axis to one displacement per voxel, samples outside the volume mirrored
back in. sigma may be given per axis, (sigma_d, sigma_h, sigma_w): sigma_d = 0 moves voxels within
their slice only (for thin-slice volumes); grid likewise.
"""
import itertools

import numpy as np

from .augment import as_generator, cubic_matrix, mirror_coordinates

__all__ = ["flip_rotate3d", "elastic3d", "displacement_field3d", "warp3d", "check_volume_sample",
           "allowed_axis_orders"]


def check_volume_sample(image, mask, weight):
    """Arrays of a volume sample, checked: image (C, D, H, W), mask (D, H, W) or (K, D, H, W),
    weight (D, H, W) or None."""
    x = np.asarray(image)
    m = np.asarray(mask)
    if x.ndim != 4:
        raise ValueError(f"a volume image must be (C, D, H, W), got shape {x.shape}")
    if m.ndim not in (3, 4) or m.shape[-3:] != x.shape[-3:]:
        raise ValueError(f"mask {m.shape} must be (D, H, W) or (K, D, H, W) with the image's "
                         f"D, H, W {x.shape[-3:]}")
    w = None if weight is None else np.asarray(weight)
    if w is not None and w.shape != x.shape[-3:]:
        raise ValueError(f"weight {w.shape} must be (D, H, W) = {x.shape[-3:]}")
    return x, m, w


def allowed_axis_orders(shape, in_plane=False):
    """The orders of the spatial axes (D, H, W) = (0, 1, 2) that flip_rotate3d may draw for a
    volume of this shape: permutations moving an axis only onto one of the same length (and, with
    in_plane, never moving D). The identity comes first."""
    out = []
    for order in itertools.permutations(range(3)):
        same_shape = all(shape[a] == shape[b] for a, b in zip(order, range(3)))
        if same_shape and not (in_plane and order[0] != 0):
            out.append(order)
    return out


def flip_rotate3d(image, mask, weight=None, rng=None, in_plane=False):
    """A random symmetry of the volume (see the module docstring): an order of the axes among
    those that keep the shape (allowed_axis_orders), then a mirror of each axis with probability
    1/2. Draws from rng: the order's index, then three mirror bits (D, H, W). For a cube without
    in_plane this is each of the cube's 48 symmetries with probability 1/48."""
    x, m, w = check_volume_sample(image, mask, weight)
    rng = as_generator(rng)
    orders = allowed_axis_orders(x.shape[-3:], in_plane)
    order = orders[int(rng.integers(len(orders)))]
    mirror = rng.integers(2, size=3).astype(bool)

    def f(a):
        if a is None:
            return None
        lead = a.ndim - 3                            # channels or label stacks in front
        a = np.transpose(a, tuple(range(lead)) + tuple(lead + o for o in order))
        flip = tuple(lead + i for i in range(3) if mirror[i])
        if flip:
            a = np.flip(a, axis=flip)
        return np.ascontiguousarray(a)

    return f(x), f(m), f(w)


def _per_axis(value, name):
    vals = (value,) * 3 if np.isscalar(value) else tuple(value)
    if len(vals) != 3:
        raise ValueError(f"{name} must be one number or three (D, H, W), got {value!r}")
    return vals


def displacement_field3d(shape, rng=None, grid=3, sigma=10.0):
    """(3, D, H, W) float64 displacements (dz, dy, dx) in voxels: a grid_d x grid_h x grid_w lattice
    of vectors whose component along axis a is N(0, sigma_a^2), interpolated with the Catmull-Rom
    cubic along each axis (lattice points at the volume's corners and evenly between them).
    grid, sigma: one number for every axis or three (D, H, W). One draw from rng: the lattice."""
    size = tuple(int(s) for s in shape)
    if len(size) != 3:
        raise ValueError(f"shape must be (D, H, W), got {shape}")
    grids = tuple(int(g) for g in _per_axis(grid, "grid"))
    sigmas = np.array(_per_axis(sigma, "sigma"), dtype=np.float64)
    if min(grids) < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if np.any(sigmas < 0):
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    coarse = as_generator(rng).normal(0.0, 1.0, size=(3,) + grids) * sigmas[:, None, None, None]
    md, mh, mw = (cubic_matrix(n, g) for n, g in zip(size, grids))  # (n, grid) per axis
    return np.einsum("di,cijk,hj,wk->cdhw", md, coarse, mh, mw)


def warp3d(image, mask, weight, field):
    """Resample at (z + dz, y + dy, x + dx) for the field (3, D, H, W) of displacements, mirroring
    at the borders: the image and weight trilinearly (the 8 voxels around the sample, weighted by
    the products of 1-D linear weights), the mask at the nearest voxel."""
    x, m, w = check_volume_sample(image, mask, weight)
    size = x.shape[-3:]
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in size], indexing="ij")
    coords = [mirror_coordinates(g + d, n) for g, d, n in zip(grid, field, size)]  # sample points
    lo = [np.clip(np.floor(c).astype(np.intp), 0, max(n - 2, 0)) for c, n in zip(coords, size)]
    hi = [np.minimum(i + 1, n - 1) for i, n in zip(lo, size)]
    frac = [c - i for c, i in zip(coords, lo)]         # in [0, 1]: the weight of the upper voxel

    def trilinear(a):
        a64 = a.astype(np.float64, copy=False)
        out = 0.0
        for corner in itertools.product((0, 1), repeat=3):   # the 8 voxels around each sample
            idx = tuple(h if c else l for c, l, h in zip(corner, lo, hi))
            wt = 1.0
            for c, f in zip(corner, frac):
                wt = wt * (f if c else 1.0 - f)
            out = out + a64[(Ellipsis,) + idx] * wt
        dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
        return np.asarray(out).astype(dtype)

    near = tuple(np.clip(np.rint(c).astype(np.intp), 0, n - 1) for c, n in zip(coords, size))
    return (trilinear(x), np.ascontiguousarray(m[(Ellipsis,) + near]),
            None if w is None else trilinear(w))


def elastic3d(image, mask, weight=None, rng=None, grid=3, sigma=10.0):
    """Elastic deformation of a volume (see the module docstring): one smooth random field moves
    the image (trilinear), the labels (nearest) and the weights (trilinear) alike. grid, sigma: one
    number or three (D, H, W); sigma = 0 everywhere is the identity (the field is still drawn, so
    the generator advances the same way)."""
    x, m, w = check_volume_sample(image, mask, weight)
    field = displacement_field3d(x.shape[-3:], rng, grid, sigma)
    if not np.any(field):
        return x.copy(), m.copy(), None if w is None else w.copy()
    return warp3d(x, m, w, field)

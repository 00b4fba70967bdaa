"""Augmentations that move pixels, applied identically to an image, its labels and its weights.

Every function takes (image, mask, weight=None, rng=None) and returns (image, mask, weight):
    image  (C, H, W) float        resampled with bilinear interpolation
    mask   (H, W) or (K, H, W)    integer labels (class labels, and/or instance labels stacked
                                  under them), resampled with nearest neighbour, so no new label
                                  value can appear
    weight (H, W) float or None   loss weight map, bilinear
    rng    a numpy Generator or an int seed (None: fresh entropy)
The signature is the one `io.batches(augment=...)` expects.

`elastic` is the deformation of the U-Net paper: random displacement vectors on a coarse grid
(3 x 3 by default) drawn with a standard deviation of `sigma` pixels, interpolated smoothly
(bicubic, Catmull-Rom) to one displacement per pixel. Samples that fall outside the image are
mirrored back in (reflection about the border pixels' centres).

Volumes: `flip_rotate` and `elastic` take a volume sample too, image (C, D, H, W) with mask
(D, H, W) or (K, D, H, W) and weight (D, H, W), and hand it to augment3d.flip_rotate3d /
elastic3d (the cube's symmetries, a 3-D random field). They tell a volume by the image's rank: a
(K, H, W) stack of 2-D label maps and a (D, H, W) mask have the same rank, a (C, H, W) image and a
(C, D, H, W) volume do not.
"""
import numpy as np

__all__ = ["flip_rotate", "elastic", "displacement_field", "warp", "compose", "as_generator",
           "cubic_matrix", "mirror_coordinates"]


def as_generator(rng):
    """rng as a numpy Generator: a Generator is used as it is (so its draws advance it), an int
    seeds a new one, None takes fresh entropy."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check(image, mask, weight):
    x = np.asarray(image)
    m = np.asarray(mask)
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W) (or a volume (C, D, H, W)), got shape {x.shape}")
    if m.ndim not in (2, 3) or m.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"mask {m.shape} must be (H, W) or (K, H, W) with the image's "
                         f"H, W {x.shape[-2:]}")
    w = None if weight is None else np.asarray(weight)
    if w is not None and w.shape != x.shape[-2:]:
        raise ValueError(f"weight {w.shape} must be (H, W) = {x.shape[-2:]}")
    return x, m, w


def flip_rotate(image, mask, weight=None, rng=None, in_plane=False):
    """A random element of the square's symmetry group: a rotation by k * 90 degrees and an
    optional left-right flip (8 outcomes, equally likely). A non-square image only gets 0 or 180
    degrees, so that its shape (and a batch's) is kept.
    A volume (image (C, D, H, W)) gets augment3d.flip_rotate3d: the cube's 48 symmetries, or those
    that keep its shape; in_plane=True (volumes only) never swaps D with H or W."""
    if np.ndim(image) == 4:
        from .augment3d import flip_rotate3d
        return flip_rotate3d(image, mask, weight, rng, in_plane=in_plane)
    x, m, w = _check(image, mask, weight)
    rng = as_generator(rng)
    h, wd = x.shape[-2:]
    k = int(rng.integers(4)) if h == wd else 2 * int(rng.integers(2))
    flip = bool(rng.integers(2))

    def f(a):
        if a is None:
            return None
        a = np.rot90(a, k, axes=(-2, -1))
        if flip:
            a = a[..., ::-1]
        return np.ascontiguousarray(a)

    return f(x), f(m), f(w)


def cubic_matrix(n_out, n_in):
    """(n_out, n_in) matrix interpolating n_in evenly spaced samples (the first at 0, the last at
    n_out - 1) to n_out points with the Catmull-Rom cubic; ends are clamped."""
    if n_in == 1:
        return np.ones((n_out, 1))
    t = np.linspace(0.0, n_in - 1.0, n_out) if n_out > 1 else np.zeros(1)
    i = np.clip(np.floor(t).astype(int), 0, n_in - 2)
    u = t - i
    # Catmull-Rom weights for samples i-1, i, i+1, i+2
    wts = np.stack([
        (-u ** 3 + 2 * u ** 2 - u) / 2,
        (3 * u ** 3 - 5 * u ** 2 + 2) / 2,
        (-3 * u ** 3 + 4 * u ** 2 + u) / 2,
        (u ** 3 - u ** 2) / 2,
    ], axis=1)
    mat = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    for j, off in enumerate((-1, 0, 1, 2)):
        np.add.at(mat, (rows, np.clip(i + off, 0, n_in - 1)), wts[:, j])
    return mat


def displacement_field(shape, rng=None, grid=3, sigma=10.0):
    """(2, H, W) float64 displacements (dy, dx) in pixels: a (grid x grid) array of N(0, sigma^2)
    vectors, interpolated bicubically over the image (grid points at its corners and evenly
    between them)."""
    h, w = int(shape[0]), int(shape[1])
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    coarse = as_generator(rng).normal(0.0, 1.0, size=(2, grid, grid)) * float(sigma)
    my, mx = cubic_matrix(h, grid), cubic_matrix(w, grid)
    return np.einsum("hi,cij,wj->chw", my, coarse, mx)


def mirror_coordinates(c, n):
    """Reflect coordinates into [0, n - 1] about the border pixels' centres."""
    if n == 1:
        return np.zeros_like(c)
    period = 2.0 * (n - 1)
    c = np.mod(c, period)
    return np.where(c > n - 1, period - c, c)


def warp(image, mask, weight, field):
    """Resample (image bilinear, mask nearest, weight bilinear) at (y + dy, x + dx) for the field
    (2, H, W) of displacements, mirroring at the borders."""
    x, m, w = _check(image, mask, weight)
    h, wd = x.shape[-2:]
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(wd, dtype=np.float64),
                         indexing="ij")
    sy = mirror_coordinates(yy + field[0], h)
    sx = mirror_coordinates(xx + field[1], wd)
    y0 = np.clip(np.floor(sy).astype(np.intp), 0, max(h - 2, 0))
    x0 = np.clip(np.floor(sx).astype(np.intp), 0, max(wd - 2, 0))
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, wd - 1)
    fy = sy - y0
    fx = sx - x0

    def bilinear(a):
        a64 = a.astype(np.float64, copy=False)
        top = a64[..., y0, x0] * (1 - fx) + a64[..., y0, x1] * fx
        bot = a64[..., y1, x0] * (1 - fx) + a64[..., y1, x1] * fx
        return (top * (1 - fy) + bot * fy).astype(a.dtype if np.issubdtype(a.dtype, np.floating)
                                                  else np.float32)

    ny = np.clip(np.rint(sy).astype(np.intp), 0, h - 1)
    nx = np.clip(np.rint(sx).astype(np.intp), 0, wd - 1)
    return bilinear(x), np.ascontiguousarray(m[..., ny, nx]), (None if w is None
                                                                else bilinear(w))


def elastic(image, mask, weight=None, rng=None, grid=3, sigma=10.0):
    """Elastic deformation (see the module docstring): one smooth random field moves the image
    (bilinear), the labels (nearest) and the weights (bilinear) alike. sigma = 0 is the identity.
    A volume (image (C, D, H, W)) gets augment3d.elastic3d (grid and sigma: one number or three)."""
    if np.ndim(image) == 4:
        from .augment3d import elastic3d
        return elastic3d(image, mask, weight, rng, grid=grid, sigma=sigma)
    x, m, w = _check(image, mask, weight)
    field = displacement_field(x.shape[-2:], rng, grid, sigma)
    if sigma == 0:
        return x.copy(), m.copy(), None if w is None else w.copy()
    return warp(x, m, w, field)


def compose(*fns):
    """One augmentation from several, applied left to right."""
    def run(image, mask, weight=None, rng=None):
        rng = as_generator(rng)
        for f in fns:
            image, mask, weight = f(image, mask, weight, rng)
        return image, mask, weight
    return run

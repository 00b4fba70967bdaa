"""Synthetic segmentation data, small and deterministic, for tests, demos and benchmarks.

touching_cells(n, size, seed)
    Microscopy-like images of cells that often touch: perturbed ellipses grown as clusters, with a
    one-pixel line of background between touching cells (as in the U-Net paper's data), darker
    cell rims, a textured interior, an uneven illumination field and noise. Returns the binary
    masks and the instance labels, from which the paper's weight map follows
    (weightmap.weight_map). It tests what the weight map is for: separating touching objects.
    gap=False keeps touching cells in contact (no background line): instance label images, for
    the three-class targets of instances.py.

shapes(n, size, seed)
    Three classes: background (0), discs (1) and squares (2), all of one grey level and texture,
    large (diameters up to about a third of the image). A pixel inside a shape looks the same
    whether the shape is a disc or a square, so its class can only be told from the shape's
    outline, up to a radius away: it needs context. A network whose receptive field is smaller
    than the shapes can find the shapes but has to guess the class of their interiors; a deeper
    one can see the whole outline. It tests depth / receptive field.

write_folder(out_dir, images, masks)
    Writes images/ and masks/ of PNG files for end-to-end tests of the command line.

touching_spheres(n, size, seed)
    The volume version of touching_cells: perturbed ellipsoids grown as clusters in a (D, H, W)
    volume, with a one-voxel layer of background wherever two of them meet (so each is its own
    26-connected piece), darker rims, texture, an uneven illumination field and noise. Returns
    images (N, 1, D, H, W), masks (N, D, H, W) and instance labels (N, D, H, W).

write_volumes(out_dir, images, masks)
    Writes images/ and masks/ of .npy volumes: image (C, D, H, W) float32, mask (D, H, W).

Every generator gives image i from its own seed (seed, i): the first k images of a set do not
depend on n.
"""
from pathlib import Path

import numpy as np

from .io import whole_file, write_image, write_mask
from .weightmap import label_components

__all__ = ["touching_cells", "shapes", "write_folder", "touching_spheres", "write_volumes"]


def _size(size):
    if np.isscalar(size):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _smooth_field(rng, h, w, grid=4):
    """A low-frequency random field in roughly [-1, 1], bilinear from a coarse grid."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid))
    ty = np.linspace(0, grid - 1, h)
    tx = np.linspace(0, grid - 1, w)
    iy = np.clip(np.floor(ty).astype(int), 0, grid - 2)
    ix = np.clip(np.floor(tx).astype(int), 0, grid - 2)
    fy = (ty - iy)[:, None]
    fx = (tx - ix)[None, :]
    c00 = coarse[iy][:, ix]
    c01 = coarse[iy][:, ix + 1]
    c10 = coarse[iy + 1][:, ix]
    c11 = coarse[iy + 1][:, ix + 1]
    return (c00 * (1 - fy) * (1 - fx) + c01 * (1 - fy) * fx + c10 * fy * (1 - fx)
            + c11 * fy * fx)


MIN_CELL_PIXELS = 12


def _stray_pieces(inst):
    """(H, W) bool: the pixels of every cell outside its largest 4-connected piece (a cell
    squeezed between others can be cut in two), and of cells left with fewer than MIN_CELL_PIXELS
    pixels; they are made background, so that each id is one connected region of a plausible
    size, as in real instance label images. A volume (D, H, W) likewise, with 6-connected pieces
    and voxels."""
    comp = label_components(inst, by_value=True)             # 4-connected (2-D), 6 (3-D)
    n = int(comp.max())
    if n == 0:
        return np.zeros(inst.shape, bool)
    flat = comp.reshape(-1)
    sizes = np.bincount(flat, minlength=n + 1)
    pieces, first = np.unique(flat, return_index=True)
    owner = np.zeros(n + 1, np.int64)
    owner[pieces] = inst.reshape(-1)[first]
    best = np.zeros(int(inst.max()) + 1, np.int64)        # largest piece size per cell
    np.maximum.at(best, owner[1:], sizes[1:])
    keep = sizes >= best[owner]
    keep[0] = True
    # two pieces of equal size: keep the first one only
    ids = np.arange(n + 1)
    first_best = np.full(int(inst.max()) + 1, n + 1)
    np.minimum.at(first_best, owner[keep], ids[keep])
    keep &= ids == first_best[owner]
    keep &= sizes >= MIN_CELL_PIXELS                       # slivers of almost hidden cells
    keep[0] = True
    return ~keep[comp]


def _one_cells(rng, h, w, cells, radius, gap=True):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    scale = min(h, w) / 128.0
    r_lo, r_hi = radius if radius is not None else (7.0 * scale + 2.0, 13.0 * scale + 3.0)
    n_cells = int(rng.integers(cells[0], cells[1] + 1))
    centres, radii = [], []
    for c in range(n_cells):
        r = rng.uniform(r_lo, r_hi)
        if c > 0 and rng.random() < 0.7:
            # grow a cluster: the new cell overlaps an existing one a little, so they touch
            j = int(rng.integers(len(centres)))
            ang = rng.uniform(0, 2 * np.pi)
            dist = (radii[j] + r) * rng.uniform(0.7, 0.95)
            cy, cx = centres[j][0] + dist * np.sin(ang), centres[j][1] + dist * np.cos(ang)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        centres.append((cy, cx))
        radii.append(r)
    # normalised radius rho < 1 inside a cell; a pixel claimed by several goes to the smallest rho
    best = np.full((h, w), np.inf)
    inst = np.zeros((h, w), dtype=np.int32)
    shade = np.zeros((h, w))
    for k, ((cy, cx), r) in enumerate(zip(centres, radii), start=1):
        # work in the cell's bounding window (stretch <= 1.4, wobble <= 1.24)
        reach = r * 1.4 * 1.25 + 1
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
        win = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
        dy, dx = yy[win] - cy, xx[win] - cx
        theta = rng.uniform(0, np.pi)
        ca, sa = np.cos(theta), np.sin(theta)
        u = (dx * ca + dy * sa) / rng.uniform(1.0, 1.4)       # ellipse: stretch one axis
        v = (-dx * sa + dy * ca)
        ang = np.arctan2(v, u)
        wobble = 1.0
        for harmonic in (2, 3, 5):                             # perturbed outline
            wobble = wobble + rng.uniform(0, 0.08) * np.cos(harmonic * ang + rng.uniform(0, 6.3))
        rho = np.hypot(u, v) / (r * wobble)
        _claim(best, inst, shade, win, rho, k, rng)
    # a one-pixel background line wherever two cells meet (8-neighbourhood): a pixel goes to
    # background when a neighbour belongs to a different cell with a larger id
    inst, cut = _separate(inst, gap)  # cells fully covered by others vanish
    # the image: darker rims (so touching borders show), texture, illumination, noise
    fg = inst > 0
    rim = np.where(fg, 1.0 - 0.45 * np.clip(best, 0, 1) ** 6, 0.0)
    texture = 1.0 + 0.08 * _smooth_field(rng, h, w, grid=max(4, int(12 * scale)))
    img = 0.12 + np.where(fg, shade * rim * texture, 0.0)
    img[cut] = 0.12 + 0.15 * shade[cut]  # the separating line: dark, but not as dark as outside
    illum = 1.0 + 0.35 * _smooth_field(rng, h, w, grid=3) + 0.2 * (
        (xx / max(w - 1, 1)) - 0.5) * rng.choice([-1.0, 1.0])
    img = img * illum + rng.normal(0.0, 0.04, size=(h, w))
    img = np.clip(img, 0.0, 1.0)
    return img.astype(np.float32), fg.astype(np.int64), inst


def _touching_line(inst):
    """The pixels (voxels) of an object that touch an object of a larger id, in the 8- (26-)
    neighbourhood: made background, they leave a one-pixel line between touching objects."""
    pad = np.pad(inst, 1)
    cut = np.zeros(inst.shape, dtype=bool)
    for shift in np.ndindex(*(3,) * inst.ndim):
        nb = pad[tuple(slice(k, k + n) for k, n in zip(shift, inst.shape))]
        cut |= (nb > inst) & (inst > 0)
    return cut


def _claim(best, inst, shade, win, rho, k, rng):
    """Object k takes the pixels of the window ``win`` where its normalised distance rho < 1 is the
    smallest so far (``best``), with one random shade (in place; one draw from rng)."""
    bw, iw, sw = best[win], inst[win], shade[win]
    claim = (rho < 1.0) & (rho < bw)
    bw[claim] = rho[claim]
    iw[claim] = k
    sw[claim] = rng.uniform(0.45, 0.75)


def _separate(inst, gap):
    """(instance ids renumbered 1..K, the gap pixels): with gap, a one-pixel (voxel) background line
    where two objects meet (_touching_line); without, objects stay in contact and stray pieces of
    an object go to the background. Objects fully covered by others vanish."""
    cut = _touching_line(inst)
    if not gap:                       # instance data: touching objects stay in contact
        cut[:] = False
        inst[_stray_pieces(inst)] = 0
    inst[cut] = 0
    return _renumber(inst), cut


def _renumber(inst):
    """Instance ids renumbered 1..K in increasing order of the old ids (0 stays background)."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(max(int(inst.max()), 0) + 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[inst]


def touching_cells(n, size=128, seed=0, cells=(6, 14), radius=None, gap=True):
    """n synthetic cell images (see the module docstring).

    size: int or (H, W). cells: (min, max) number of cells drawn per image (some may end up
    hidden). radius: (min, max) cell radius in pixels (default scales with the size).
    gap: True (default) puts a one-pixel line of background between touching cells, as in the
    U-Net paper's data; False leaves them in contact, as in instance label images (Data Science
    Bowl, Cellpose): the mask alone then cannot separate them, the instances must (see
    data.instance_targets). The image is the same either way but for the separating line.
    Returns images float32 (n, 1, H, W) in [0, 1], masks int64 (n, H, W) in {0, 1} and
    instances int32 (n, H, W) (0 = background, 1..K the cells; masks == instances > 0)."""
    h, w = _size(size)
    if n < 0 or h < 1 or w < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, size={size}")
    images = np.zeros((n, 1, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=np.int64)
    instances = np.zeros((n, h, w), dtype=np.int32)
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        images[i, 0], masks[i], instances[i] = _one_cells(rng, h, w, cells, radius, gap)
    return images, masks, instances


def shapes(n, size=128, seed=0, per_image=(2, 5), noise=0.1):
    """n images with discs (class 1) and axis-aligned squares (class 2) on background (0).

    Both kinds have one grey level and the same noise, so only their outlines tell them apart (see
    the module docstring). Shapes may overlap; a later shape covers an earlier one.
    Returns images float32 (n, 1, H, W) and masks int64 (n, H, W) with labels in {0, 1, 2}."""
    h, w = _size(size)
    if n < 0 or h < 1 or w < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, size={size}")
    images = np.zeros((n, 1, h, w), dtype=np.float32)
    masks = np.zeros((n, h, w), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    m = min(h, w)
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        lab = np.zeros((h, w), dtype=np.int64)
        for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
            r = rng.uniform(0.08, 0.18) * m + 1.0                   # half-size
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if rng.random() < 0.5:
                inside = np.hypot(yy - cy, xx - cx) <= r
                lab[inside] = 1
            else:
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
                lab[inside] = 2
        img = np.where(lab > 0, 0.7, 0.25) + rng.normal(0.0, noise, size=(h, w))
        images[i, 0] = np.clip(img, 0.0, 1.0)
        masks[i] = lab
    return images, masks


def write_folder(out_dir, images, masks, convention=None, mask_suffix="", names=None):
    """Write images (N, C, H, W) in [0, 1] as 8-bit PNGs into out_dir/images and masks (N, H, W)
    into out_dir/masks (binary masks as 0/255 unless convention says otherwise, labels as they are).

    mask_suffix: appended to each mask's stem (e.g. '_mask') to exercise the name matching.
    Returns (images_dir, masks_dir) as Paths."""
    out = Path(out_dir)
    idir, mdir = out / "images", out / "masks"
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 4 or masks.ndim != 3 or len(images) != len(masks):
        raise ValueError(f"need images (N, C, H, W) and masks (N, H, W), got {images.shape} and "
                         f"{masks.shape}")
    if convention is None:
        convention = "binary255" if masks.size == 0 or masks.max() <= 1 else "labels"
    names = names if names is not None else [f"img_{i:04d}" for i in range(len(images))]
    idir.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    for name, x, m in zip(names, images, masks):
        write_image(idir / f"{name}.png", x)
        write_mask(mdir / f"{name}{mask_suffix}.png", m, convention)
    return idir, mdir


def _smooth_field3d(rng, shape, grid=3):
    """A low-frequency random field (D, H, W) in roughly [-1, 1]: a coarse grid of uniform values,
    linear along each axis in turn."""
    field = rng.uniform(-1.0, 1.0, size=(grid,) * 3)
    for axis, n in enumerate(shape):
        t = np.linspace(0, grid - 1, n)
        i = np.clip(np.floor(t).astype(int), 0, grid - 2)
        f = t - i
        lo, hi = np.take(field, i, axis=axis), np.take(field, i + 1, axis=axis)
        f = f.reshape([-1 if a == axis else 1 for a in range(3)])
        field = lo * (1 - f) + hi * f
    return field


def _one_spheres(rng, shape, spheres, radius, gap=True):
    d, h, w = shape
    zz, yy, xx = np.mgrid[0:d, 0:h, 0:w].astype(np.float64)
    scale = min(shape) / 32.0
    r_lo, r_hi = radius if radius is not None else (3.0 * scale + 1.5, 5.0 * scale + 2.0)
    count = int(rng.integers(spheres[0], spheres[1] + 1))
    centres, radii = [], []
    for c in range(count):
        r = rng.uniform(r_lo, r_hi)
        if c > 0 and rng.random() < 0.7:
            # grow a cluster: the new sphere overlaps an earlier one a little, so they touch
            j = int(rng.integers(len(centres)))
            u = rng.normal(size=3)
            u /= max(np.linalg.norm(u), 1e-12)
            centre = np.array(centres[j]) + u * (radii[j] + r) * rng.uniform(0.7, 0.95)
        else:
            centre = rng.uniform(0, 1, size=3) * np.array(shape)
        centres.append(tuple(centre))
        radii.append(r)
    # normalised radius rho < 1 inside a sphere; a voxel claimed by several goes to the smallest rho
    best = np.full(shape, np.inf)
    inst = np.zeros(shape, dtype=np.int32)
    shade = np.zeros(shape)
    for k, (centre, r) in enumerate(zip(centres, radii), start=1):
        reach = r * 1.3 * 1.2 + 1                  # stretch <= 1.3, wobble <= 1.2
        win = tuple(slice(max(int(c - reach), 0), max(min(int(c + reach) + 2, n), 0))
                    for c, n in zip(centre, shape))
        rel = np.stack([g[win] - c for g, c in zip((zz, yy, xx), centre)])   # (3, window)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))                        # a random rotation
        axes = np.einsum("ij,j...->i...", q, rel) / rng.uniform(1.0, 1.3, size=(3, 1, 1, 1))
        dist = np.sqrt((axes ** 2).sum(axis=0))
        # a gently wobbling surface: low harmonics of the direction
        unit = axes / np.maximum(dist, 1e-9)
        wobble = 1.0 + rng.uniform(0, 0.1) * np.cos(3 * unit[0] + rng.uniform(0, 6.3)) \
            + rng.uniform(0, 0.1) * np.cos(2 * unit[1] * unit[2] * 3 + rng.uniform(0, 6.3))
        rho = dist / (r * wobble)
        _claim(best, inst, shade, win, rho, k, rng)
    # a one-voxel background layer wherever two spheres meet (26-neighbourhood): a voxel goes to
    # background when a neighbour belongs to a different sphere with a larger id
    inst, cut = _separate(inst, gap)  # spheres fully covered by others vanish
    # the image: darker rims, texture, illumination, noise
    fg = inst > 0
    rim = np.where(fg, 1.0 - 0.45 * np.clip(best, 0, 1) ** 6, 0.0)
    texture = 1.0 + 0.08 * _smooth_field3d(rng, shape, grid=max(3, int(6 * scale)))
    img = 0.12 + np.where(fg, shade * rim * texture, 0.0)
    img[cut] = 0.12 + 0.15 * shade[cut]  # the separating layer: dark, not as dark as outside
    illum = 1.0 + 0.3 * _smooth_field3d(rng, shape, grid=3)
    img = img * illum + rng.normal(0.0, 0.04, size=shape)
    img = np.clip(img, 0.0, 1.0)
    return img.astype(np.float32), fg.astype(np.int64), inst


def _size3d(size):
    if np.isscalar(size):
        return (int(size),) * 3
    d, h, w = size
    return int(d), int(h), int(w)


def touching_spheres(n, size=32, seed=0, spheres=(4, 10), radius=None, gap=True):
    """n synthetic volumes of touching spheres (see the module docstring).

    size: int or (D, H, W). spheres: (min, max) number drawn per volume (some may end up hidden).
    radius: (min, max) in voxels (default scales with the size: 4.5 to 7 voxels at 32).
    gap: True (default) puts a one-voxel layer of background between touching spheres; False
    leaves them in contact (instance label volumes). Volume i comes from its own seed (seed, i).
    Returns images float32 (n, 1, D, H, W) in [0, 1], masks int64 (n, D, H, W) in {0, 1} and
    instances int32 (n, D, H, W) (0 = background, 1..K; masks == instances > 0)."""
    shape = _size3d(size)
    if n < 0 or min(shape) < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, size={size}")
    images = np.zeros((n, 1) + shape, dtype=np.float32)
    masks = np.zeros((n,) + shape, dtype=np.int64)
    instances = np.zeros((n,) + shape, dtype=np.int32)
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        images[i, 0], masks[i], instances[i] = _one_spheres(rng, shape, spheres, radius, gap)
    return images, masks, instances


def _save_npy(path, array):
    with whole_file(path) as f:            # the whole file or none of it
        np.save(f, array, allow_pickle=False)


def write_volumes(out_dir, images, masks, names=None):
    """Write volumes as .npy files: out_dir/images/<name>.npy holds one image (C, D, H, W) float32,
    out_dir/masks/<name>.npy its labels (D, H, W) (uint8, or uint16 / int32 for larger ids), each
    written whole (data.whole_file). images: (N, C, D, H, W); masks: (N, D, H, W).
    Returns (images_dir, masks_dir) as Paths."""
    images = np.asarray(images)
    masks = np.asarray(masks)
    if images.ndim != 5 or masks.ndim != 4 or len(images) != len(masks) \
            or images.shape[2:] != masks.shape[1:]:
        raise ValueError(f"need images (N, C, D, H, W) and masks (N, D, H, W) of the same D, H, W, "
                         f"got {images.shape} and {masks.shape}")
    if masks.size and (masks.min() < 0 or not np.all(np.mod(masks, 1) == 0)):
        raise ValueError("masks must hold non-negative integer labels")
    top = int(masks.max()) if masks.size else 0
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int32
    names = names if names is not None else [f"vol_{i:04d}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} volumes")
    out = Path(out_dir)
    idir, mdir = out / "images", out / "masks"
    idir.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    for name, x, m in zip(names, images, masks):
        _save_npy(idir / f"{name}.npy", np.ascontiguousarray(x, dtype=np.float32))
        _save_npy(mdir / f"{name}.npy", np.ascontiguousarray(m).astype(dtype))
    return idir, mdir

"""The U-Net paper's pixel-wise loss weights, and the two tools they need: an exact Euclidean
distance transform and connected-component labelling, both in plain NumPy.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

d1 and d2 are the distances from pixel x to the nearest and the second-nearest object (instance).
The border term is applied on background pixels only, as in the paper: it is large in the narrow
background gaps between touching objects, which then count much more in the loss. w_c balances the
class frequencies (w_c = 1 everywhere when class_balance is False).

Distance transform
------------------
`edt(features)` gives, for every pixel, the Euclidean distance to the nearest True pixel of
`features` (0 on the features themselves, +inf in a slice that has none). It is exact, computed in
two separable passes:

1. along columns, the 1-D distance to the nearest feature in the same column, found with running
   maxima/minima of feature indices (vectorised over everything);
2. along rows, the lower envelope of parabolas (Felzenszwalb & Huttenlocher, "Distance Transforms
   of Sampled Functions", 2012):  D(x) = min_q (x - q)^2 + g(q)^2, built for all rows at once with
   one Python loop over the columns.

Both passes are vectorised over a leading batch of 2-D slices, so the per-object transforms the
weight map needs are done in one call: O(objects * H * W) work.

Volumes (spatial_dims=3): the squared distance is a sum over the axes, so the same passes apply
one axis at a time: the column pass along D, then a lower envelope along H taking that result as
g^2, then one along W. Each pass is exact, so the result is (checked against scipy's
distance_transform_edt). `spacing` gives anisotropic voxels (slices farther apart than pixels).
`label_components` and `weight_map` take volumes (D, H, W) the same way: 3-D objects, 6-, 18- or
26-connected; the border term then measures distances to the two nearest 3-D objects.
"""
import numpy as np

__all__ = ["edt", "edt_squared", "label_components", "class_weights", "weight_map",
           "weight_map_from_mask", "border_reach", "CONNECTIVITY"]


def _column_sq_distance(features, spacing=1.0):
    """(..., H, W) bool -> (..., H, W) float64: squared 1-D distance to the nearest True in the
    same column (+inf where the column has none), rows `spacing` apart."""
    h = features.shape[-2]
    idx = np.arange(h, dtype=np.float64).reshape((h, 1))
    # index of the nearest feature at or above each row, and at or below
    above = np.where(features, idx, -np.inf)
    above = np.maximum.accumulate(above, axis=-2)
    below = np.where(features, idx, np.inf)
    below = np.flip(np.minimum.accumulate(np.flip(below, axis=-2), axis=-2), axis=-2)
    dist = np.minimum(idx - above, below - idx) * spacing  # inf where neither side has a feature
    return dist * dist


def _lower_envelope(f, spacing=1.0):
    """Felzenszwalb-Huttenlocher 1-D squared distance transform of each row of f (R, n):
    d[r, x] = min_q (spacing * (x - q))^2 + f[r, q], with f = +inf meaning "no feature here".
    (spacing: the distance between neighbouring samples; the parabolas are s^2 (x - q)^2 + f(q).)

    One loop over the n columns; each step updates all rows at once. Rows keep their own stack of
    envelope parabolas: v (their positions) and z (the boundaries between them)."""
    rows, n = f.shape
    f = f / (spacing * spacing)          # work in units of one sample, scale back at the end
    out = np.full((rows, n), np.inf)
    if rows == 0 or n == 0:
        return out
    r_all = np.arange(rows)
    v = np.zeros((rows, n), dtype=np.intp)          # positions of the envelope's parabolas
    z = np.full((rows, n + 1), np.inf)              # z[k] .. z[k+1]: where parabola k is lowest
    k = np.full(rows, -1, dtype=np.intp)            # top of each row's stack (-1: empty)
    for q in range(n):
        fq = f[:, q]
        live = np.isfinite(fq)
        if not live.any():
            continue
        # rows with an empty stack take q as their first parabola
        first = live & (k < 0)
        if first.any():
            rf = r_all[first]
            k[rf] = 0
            v[rf, 0] = q
            z[rf, 0] = -np.inf
            z[rf, 1] = np.inf
        todo = r_all[live & ~first]
        if todo.size == 0:
            continue
        fq_t = fq[todo] + q * q
        # pop parabolas hidden by the new one, row by row as long as any row needs it
        while True:
            kt = k[todo]
            vk = v[todo, kt]
            s = (fq_t - (f[todo, vk] + vk * vk)) / (2.0 * (q - vk))
            pop = s <= z[todo, kt]
            if not pop.any():
                break
            k[todo[pop]] -= 1  # never below 0: z[., 0] = -inf stops it
        k[todo] += 1
        kt = k[todo]
        v[todo, kt] = q
        z[todo, kt] = s
        z[todo, kt + 1] = np.inf
    # read the envelope back: walk each row's segments left to right
    has = k >= 0
    j = np.zeros(rows, dtype=np.intp)
    rr = r_all[has]
    for x in range(n):
        while True:
            adv = z[rr, j[rr] + 1] < x
            if not adv.any():
                break
            j[rr[adv]] += 1
        vj = v[rr, j[rr]]
        out[rr, x] = (x - vj) ** 2 + f[rr, vj]
    return out * (spacing * spacing)


def _envelope_along(g, axis, spacing):
    """The lower envelope (_lower_envelope) along one axis of g (..., n, ...), vectorised over all
    the others: that axis is moved last, every line along it becomes one row of a batch."""
    moved = np.moveaxis(g, axis, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    return np.moveaxis(_lower_envelope(rows, spacing).reshape(moved.shape), -1, axis)


def edt_squared(features, spatial_dims=2, spacing=None):
    """Squared exact Euclidean distance to the nearest True pixel, over the last spatial_dims axes.

    features: (..., H, W) for spatial_dims=2, (..., D, H, W) for spatial_dims=3 (a volume);
        anything truthy marks a feature; leading axes are a batch of independent images/volumes.
    spacing: the distance between neighbouring pixels along each spatial axis (default 1 on every
        axis), e.g. (5.0, 1.0, 1.0) for slices five times as far apart as the pixels within one.
    Returns float64 of the same shape, 0 on features, +inf in an image (volume) without any.

    Separable: the squared distance is a sum over the axes, so a 1-D pass along the first spatial
    axis (_column_sq_distance) is followed by one lower-envelope pass per further axis, each taking
    the previous result as its f (Felzenszwalb & Huttenlocher): three passes for a volume."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    feats = np.asarray(features).astype(bool, copy=False)
    if feats.ndim < spatial_dims:
        axes = "(..., H, W)" if spatial_dims == 2 else "(..., D, H, W)"
        raise ValueError(f"edt with spatial_dims={spatial_dims} needs at least {spatial_dims} "
                         f"dimensions {axes}, got shape {feats.shape}")
    spacing = (1.0,) * spatial_dims if spacing is None else tuple(float(v) for v in spacing)
    if len(spacing) != spatial_dims or min(spacing) <= 0:
        raise ValueError(f"spacing must be {spatial_dims} positive numbers, got {spacing}")
    first = -spatial_dims                            # the first spatial axis: -2 (H) or -3 (D)
    # pass 1 along the first spatial axis (_column_sq_distance works along axis -2)
    g = np.moveaxis(_column_sq_distance(np.moveaxis(feats, first, -2), spacing[0]), -2, first)
    for axis, step in zip(range(first + 1, 0), spacing[1:]):
        g = _envelope_along(g, axis, step)           # then H (for a volume) and W
    return g


def edt(features, spatial_dims=2, spacing=None):
    """Exact Euclidean distance (float64) from every pixel to the nearest True pixel of
    `features` (..., H, W), or of every voxel of (..., D, H, W) with spatial_dims=3; 0 on the
    features, +inf in an image (volume) that has none. spacing: see edt_squared.

    Note the convention: scipy.ndimage.distance_transform_edt(x) measures the distance to the
    nearest *zero* of x, so it equals edt(x == 0) (and its sampling= is our spacing=)."""
    return np.sqrt(edt_squared(features, spatial_dims, spacing))


def _runs(values, fg):
    """Horizontal runs of a 2-D image: maximal stretches of one row where `fg` holds and `values`
    stays the same. Returns (row, start, stop, value) arrays in row-major order (stop exclusive)."""
    h, w = fg.shape
    # a run starts where fg begins or the value changes; it stops where the next one starts or fg ends
    change = np.ones((h, w + 1), dtype=bool)
    change[:, 1:w] = values[:, 1:] != values[:, :-1]
    fgp = np.zeros((h, w + 2), dtype=bool)
    fgp[:, 1:-1] = fg
    begin = fgp[:, 1:-1] & (change[:, :w] | ~fgp[:, :-2])
    finish = fgp[:, 1:-1] & (change[:, 1:] | ~fgp[:, 2:])   # last pixel of a run
    rows, starts = np.nonzero(begin)
    _, lasts = np.nonzero(finish)
    return rows, starts, lasts + 1, values[rows, starts]


def _components_of_graph(n, a, b):
    """Connected components of a graph with nodes 0..n-1 and edges (a[i], b[i]): for every node
    the smallest node of its component. Min-label propagation along the edges, each round followed
    by pointer jumping (root <- root[root]), so long chains collapse in a few rounds."""
    root = np.arange(n)
    while True:
        new = root.copy()
        np.minimum.at(new, a, root[b])
        np.minimum.at(new, b, root[a])
        while True:                      # pointer jumping: every root[i] is a node <= i
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, root):
            return root
        root = new


CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}


def _neighbour_rows(mask_shape, connectivity):
    """The rows (lines along the last axis) a run may join, as (dd, dh, corner): the row dh rows
    down in the slice dd slices further (dd = 0 in 2-D), and corner = 1 when runs that only touch
    diagonally along the row join too. Only rows further on in row-major order are listed; each
    pair of neighbouring runs is then found once.

    2-D, 4: the next row, overlapping runs; 8: also touching at a corner.
    3-D, 6: the next row and the next slice's same row, overlapping runs (face neighbours);
    18: also edge neighbours, two coordinates differing: a corner step within the next row or the
    next slice's same row, and the next slice's rows one up and one down, overlapping;
    26: every offset, corner steps included (vertex neighbours)."""
    if len(mask_shape) == 2:
        return [(0, 1, 1 if connectivity == 8 else 0)]
    edge = 1 if connectivity >= 18 else 0
    rows = [(0, 1, edge), (1, 0, edge)]
    if connectivity >= 18:
        vertex = 1 if connectivity == 26 else 0
        rows += [(1, 1, vertex), (1, -1, vertex)]
    return rows


def label_components(mask, connectivity=None, by_value=False):
    """Connected components of the nonzero pixels of a 2-D mask (H, W) or voxels of a volume
    (D, H, W).

    Returns int32 of the mask's shape: 0 on background, 1..K on the components, numbered in the
    row-major order of their first pixel. connectivity: 4 (edges, the default) or 8 (edges and
    corners) in 2-D; 6 (faces, the default), 18 (faces and edges) or 26 (faces, edges and
    vertices) in 3-D.
    by_value: if True, two neighbouring pixels join only when they hold the same value, so each
        id of a label image gets its own components (an id in two pieces gives two components).

    Method (run-based, so the work is per run, not per pixel): cut every row (a line along the last
    axis; a volume has D * H of them) into runs of foreground pixels (of one value when by_value);
    join a run to the runs of the neighbouring rows (_neighbour_rows) that overlap it, or touch it
    at a corner where the connectivity says so; take the connected components of that graph of
    runs (_components_of_graph); paint each run with its component."""
    m = np.asarray(mask)
    if m.ndim not in (2, 3):
        raise ValueError(f"label_components needs a 2-D mask (H, W) or a volume (D, H, W), got "
                         f"shape {m.shape}")
    if connectivity is None:
        connectivity = CONNECTIVITY[m.ndim][0]
    if connectivity not in CONNECTIVITY[m.ndim]:
        raise ValueError(f"connectivity must be one of {CONNECTIVITY[m.ndim]} for a "
                         f"{m.ndim}-D mask, got {connectivity!r}")
    fg = m != 0
    out = np.zeros(m.shape, dtype=np.int32)
    if not fg.any():
        return out
    h, w = m.shape[-2:]
    lines = fg.reshape(-1, w)                        # (rows, W): a volume's rows slice by slice
    rows, starts, stops, vals = _runs((m if by_value else fg).reshape(-1, w), lines)
    n = len(rows)
    # keys along the flattened rows: runs are sorted by both start key and stop key
    stride = w + 2
    start_key = rows.astype(np.int64) * stride + starts
    stop_key = rows.astype(np.int64) * stride + stops
    row_in_slice = rows % h
    slice_of = rows // h
    depth = lines.shape[0] // h
    edges_a, edges_b = [], []
    for dd, dh, corner in _neighbour_rows(m.shape, connectivity):
        shift = (dd * h + dh) * stride
        # runs b of that row meet run a: stop_b > start_a - corner and start_b < stop_a + corner
        lo = np.searchsorted(stop_key, start_key + shift - corner, side="right")
        hi = np.searchsorted(start_key, stop_key + shift + corner, side="left")
        count = np.maximum(hi - lo, 0)
        # that row must exist: not past the slice's last row or first row, nor the last slice
        inside = (row_in_slice + dh >= 0) & (row_in_slice + dh < h) & (slice_of + dd < depth)
        count[~inside] = 0
        a = np.repeat(np.arange(n), count)
        b = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(lo, count)
        edges_a.append(a)
        edges_b.append(b)
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    if by_value:
        same = vals[a] == vals[b]
        a, b = a[same], b[same]
    root = _components_of_graph(n, a, b)
    # roots are the first run of each component in row-major order: number them 1..K
    ids = np.cumsum(root == np.arange(n)).astype(np.int32)[root]
    flat = out.reshape(-1)
    lengths = stops - starts
    first = (rows.astype(np.int64) * w + starts)
    pix = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) \
        + np.repeat(first, lengths)
    flat[pix] = np.repeat(ids, lengths)
    return out


def class_weights(labels):
    """Per-pixel class-balancing weights w_c (float64, H x W): every class present gets
    total / (classes_present * count_c), so each class contributes the same total weight and the
    mean weight over the image is 1."""
    lab = np.asarray(labels)
    if lab.size == 0:
        return np.zeros(lab.shape)
    vals, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    per_class = lab.size / (len(vals) * counts.astype(np.float64))
    return per_class[inverse.reshape(lab.shape)]


BORDER_TOLERANCE = 1e-9


def border_reach(w0, sigma, tol=BORDER_TOLERANCE):
    """Distance beyond which the border term w0 exp(-d^2 / (2 sigma^2)) is below tol: 34 px for
    w0 = 10, sigma = 5. Each object's distances are computed only this far around it."""
    w0 = abs(float(w0))
    if w0 <= tol:
        return 0.0
    return float(sigma) * np.sqrt(2.0 * np.log(w0 / tol))


def _two_nearest(inst, ids, reach):
    """Distances (H, W) (or (D, H, W)) to the nearest and second-nearest object, each object's
    distances taken exactly inside its bounding box grown by `reach` (+inf beyond, where
    d1 + d2 > reach makes the border term negligible anyway)."""
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    pad = int(np.ceil(reach)) + 1
    # bounding boxes of all objects in one pass: coords (ndim, pixels), sorted by object id
    coords = np.array(np.nonzero(inst))
    lab = inst[tuple(coords)]
    order = np.argsort(lab, kind="stable")
    lab, coords = lab[order], coords[:, order]
    starts = np.searchsorted(lab, ids)
    ends = np.searchsorted(lab, ids, side="right")
    for k, a, b in zip(ids, starts, ends):
        box = tuple(slice(max(c[a:b].min() - pad, 0), min(c[a:b].max() + pad + 1, n))
                    for c, n in zip(coords, inst.shape))
        d = edt(inst[box] == k, inst.ndim)   # exact: the whole object lies inside the box
        b1 = d1[box]
        b2 = d2[box]
        np.minimum(b2, np.maximum(b1, d), out=b2)
        np.minimum(b1, d, out=b1)
    return d1, d2


def weight_map(instances, w0=10.0, sigma=5.0, class_balance=True, labels=None, border_on=None,
               spatial_dims=2):
    """The U-Net paper's weight map (float32, H x W, or D x H x W) from instance labels.

    instances: (H, W) integers, 0 = background, every other value one object; with
        spatial_dims=3, a volume (D, H, W) whose objects are 3-D (d1, d2 are then distances to
        the nearest and second-nearest 3-D object, in voxels).
    labels: optional (H, W) semantic classes for the class-balancing term (default: object vs
        background, i.e. instances > 0). The border term is applied where labels == 0.
    border_on: optional (H, W) bool, the pixels that receive the border term instead of
        labels == 0. Instance label images whose objects touch without a background gap use it to
        weight the objects' border pixels too (instances.instance_weight_map).
    w(x) = w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on background, w_c(x) on objects; with
    fewer than two objects d2 is infinite and the border term vanishes.
    Distances to an object are computed only within border_reach(w0, sigma) of it; farther, the
    border term is below 1e-9 and is left out (exact to float32 precision).
    A stack (N, H, W) gives a stack of maps; with spatial_dims=3, (N, D, H, W) does. (A 3-D array
    is a stack of images unless spatial_dims=3 says it is one volume.)"""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
    inst = np.asarray(instances)
    if inst.ndim == spatial_dims + 1:
        lab = [None] * len(inst) if labels is None else list(labels)
        on = [None] * len(inst) if border_on is None else list(border_on)
        return np.stack([weight_map(i, w0, sigma, class_balance, l, o, spatial_dims)
                         for i, l, o in zip(inst, lab, on)])
    if inst.ndim != spatial_dims:
        want = "(H, W) or (N, H, W)" if spatial_dims == 2 else "(D, H, W) or (N, D, H, W)"
        raise ValueError(f"weight_map(spatial_dims={spatial_dims}) needs instance labels {want}, "
                         f"got {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer) and not np.issubdtype(inst.dtype, np.bool_):
        if not np.all(np.mod(inst, 1) == 0):
            raise ValueError("instance labels must be integers")
        inst = inst.astype(np.int64)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    sem = (inst > 0).astype(np.int64) if labels is None else np.asarray(labels)
    if sem.shape != inst.shape:
        raise ValueError(f"labels {sem.shape} and instances {inst.shape} differ in shape")
    w = class_weights(sem) if class_balance else np.ones(inst.shape)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if len(ids) >= 2 and w0 != 0:
        d1, d2 = _two_nearest(inst, ids, border_reach(w0, sigma))
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma * sigma))
        if border_on is None:
            where = sem == 0
        else:
            where = np.asarray(border_on, dtype=bool)
            if where.shape != inst.shape:
                raise ValueError(f"border_on {where.shape} and instances {inst.shape} differ in shape")
        w = w + np.where(where, border, 0.0)
    return w.astype(np.float32)


def weight_map_from_mask(mask, w0=10.0, sigma=5.0, class_balance=True, connectivity=None):
    """Weight map for a semantic mask (H, W), or volume (D, H, W), whose objects are separated by
    background: the objects are the connected components of mask != 0 (as in the paper's data,
    where touching cells are split by a thin line of background). Class balance is taken over the
    mask's classes. connectivity: see label_components (default 4 in 2-D, 6 in 3-D); a 3-D mask is
    one volume here."""
    m = np.asarray(mask)
    return weight_map(label_components(m, connectivity), w0, sigma, class_balance, labels=m,
                      spatial_dims=m.ndim)

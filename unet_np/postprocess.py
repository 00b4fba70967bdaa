"""From a three-class U-Net's probabilities to an instance label image (one id per object).

The network (trained on data.instance_targets) gives, per pixel, the probabilities of
background (0), cell interior (1) and cell border (2). Touching cells share no interior pixel:
their interiors are separated by border bands. So:

1. seeds: the connected components of the interior class (p_interior > interior_threshold);
   one per cell. Optionally, a seed of fewer than min_seed_size pixels is dropped unless its
   highest p_interior reaches sure_interior: a speck of uncertain interior inside a cell would
   split it (its pixels stay cell pixels and go to the neighbouring seed), while a small cell the
   network is sure of keeps its seed (the targets give cells thinner than the border band an
   interior of one or two pixels, see data.instances);
2. cell pixels: p_interior + p_border > foreground_threshold;
3. each seed grows into the cell pixels by a marker-based watershed (flooding) on the elevation
   1 - p_interior: pixels most surely interior first, the border bands last, where two growing
   cells meet;
4. cell pixels no seed reached (a small cell predicted as border only) become objects of their
   own (keep_unseeded); holes inside one object are filled; objects under min_size pixels are
   dropped; ids are renumbered 1..K.

The watershed is a priority flood with a bucket queue. Elevations are quantised to `levels`
steps. A pixel's priority is (level, ring): at each level the labelled region grows one ring of
4-neighbours at a time, pixels of a higher level wait in that level's bucket. When two seeds
reach a pixel in the same ring, the smaller id takes it. The result depends on nothing else (not
on the order of the queue), which is why the two implementations below give the same labels:

* flood_loops: one pixel at a time with linked lists, the readable reference; compiled with
  Numba when Numba can be imported (a 2048 x 2048 image in well under a second);
* flood_rings: NumPy, one whole ring per step (vectorised), the fallback without Numba.
"""
import numpy as np

from .data.weightmap import label_components

__all__ = ["labels_from_probabilities", "fill_holes", "remove_small", "flood", "flood_loops",
           "flood_rings"]

_COMPILED = {}


def _padded(seeds, level, allowed):
    """Flatten the images with a one-pixel frame that is never allowed, so that the four
    neighbours of pixel p are p - W, p - 1, p + 1, p + W with no edge checks (W = width + 2)."""
    h, w = seeds.shape
    lab = np.zeros((h + 2, w + 2), np.int64)
    lab[1:-1, 1:-1] = seeds
    ok = np.zeros((h + 2, w + 2), bool)
    ok[1:-1, 1:-1] = allowed
    q = np.zeros((h + 2, w + 2), np.int32)
    q[1:-1, 1:-1] = level
    offsets = np.array([-(w + 2), -1, 1, w + 2], dtype=np.int64)
    return lab.reshape(-1), ok.reshape(-1), q.reshape(-1), offsets


def flood_loops(lab, ok, q, levels, offsets):
    """Priority flood, pixel by pixel (the reference; Numba compiles it as it is).

    lab: (P,) int64 flat padded labels, seeds > 0, flooded in place; ok: (P,) bool, pixels that
    may be flooded; q: (P,) int32 levels in [0, levels); offsets: (4,) int64 neighbour steps.
    Queue nodes live in one pool (pix, lbl, nxt) as linked lists: one list per level (the
    buckets) and one for the ring being grown; processed nodes go to a free list for reuse."""
    cap = 1024
    pix = np.empty(cap, np.int64)
    lbl = np.empty(cap, np.int64)
    nxt = np.empty(cap, np.int64)
    free, used = -1, 0
    head = np.full(levels, -1, np.int64)
    tail = np.full(levels, -1, np.int64)
    stamp = np.zeros(lab.size, np.int64)        # the ring in which a pixel got its label
    fresh = np.empty(lab.size, np.int64)        # pixels labelled in the current ring
    n_fresh = 0
    for p in range(lab.size):                   # the seeds are ring 0: they push first
        if lab[p] > 0:
            fresh[n_fresh] = p
            n_fresh += 1
    ring_id = 0
    for lev in range(levels):
        ring = -1
        if ring_id > 0:
            ring = head[lev]                   # the bucket of this level is its first ring
            head[lev] = -1
            tail[lev] = -1
        while True:
            if ring_id > 0:
                # take the ring's proposals: a free pixel gets the label; in the same ring the
                # smallest label wins
                n_fresh = 0
                i = ring
                while i != -1:
                    p, k, after = pix[i], lbl[i], nxt[i]
                    if lab[p] == 0:
                        lab[p] = k
                        stamp[p] = ring_id
                        fresh[n_fresh] = p
                        n_fresh += 1
                    elif stamp[p] == ring_id and k < lab[p]:
                        lab[p] = k
                    nxt[i] = free                 # recycle the node
                    free = i
                    i = after
            if n_fresh == 0:
                break
            ring_id += 1
            # the newly labelled pixels propose their label to their free neighbours: at this
            # level into the next ring, at a higher level into that level's bucket
            ring_head, ring_tail = -1, -1
            for j in range(n_fresh):
                p = fresh[j]
                for o in offsets:
                    nb = p + o
                    if not ok[nb] or lab[nb] != 0:
                        continue
                    if free != -1:
                        node = free
                        free = nxt[node]
                    else:
                        if used == cap:            # grow the pool
                            cap *= 2
                            pix2 = np.empty(cap, np.int64)
                            lbl2 = np.empty(cap, np.int64)
                            nxt2 = np.empty(cap, np.int64)
                            pix2[:used] = pix[:used]
                            lbl2[:used] = lbl[:used]
                            nxt2[:used] = nxt[:used]
                            pix, lbl, nxt = pix2, lbl2, nxt2
                        node = used
                        used += 1
                    pix[node] = nb
                    lbl[node] = lab[p]
                    nxt[node] = -1
                    lv = max(q[nb], lev)
                    if lv == lev:
                        if ring_tail == -1:
                            ring_head = node
                        else:
                            nxt[ring_tail] = node
                        ring_tail = node
                    else:
                        if tail[lv] == -1:
                            head[lv] = node
                        else:
                            nxt[tail[lv]] = node
                        tail[lv] = node
            ring = ring_head
    return lab


def flood_rings(lab, ok, q, levels, offsets):
    """The same priority flood in NumPy, one whole ring per step (same arguments as flood_loops).
    Buckets hold (pixels, labels) arrays; a ring is taken at once: free pixels get the smallest
    label proposed to them, then push their own label to their free neighbours."""
    buckets = [[] for _ in range(levels)]

    def push(src, lev):
        nb = (src[:, None] + offsets).reshape(-1)
        k = np.repeat(lab[src], len(offsets))
        keep = ok[nb] & (lab[nb] == 0)
        nb, k = nb[keep], k[keep]
        lv = np.maximum(q[nb], lev)
        now = lv == lev
        later = ~now
        if later.any():
            order = np.argsort(lv[later], kind="stable")
            lv_l, nb_l, k_l = lv[later][order], nb[later][order], k[later][order]
            cuts = np.flatnonzero(np.diff(lv_l)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(lv_l)]):
                buckets[lv_l[a]].append((nb_l[a:b], k_l[a:b]))
        return nb[now], k[now]

    pending = [push(np.flatnonzero(lab > 0), 0)]     # the seeds are ring 0
    for lev in range(levels):
        parts = pending + buckets[lev]
        buckets[lev] = []
        pending = []
        pixels = np.concatenate([p for p, _ in parts]) if parts else np.zeros(0, np.int64)
        labels = np.concatenate([k for _, k in parts]) if parts else np.zeros(0, np.int64)
        while pixels.size:
            free = lab[pixels] == 0
            pixels, labels = pixels[free], labels[free]
            order = np.lexsort((labels, pixels))        # by pixel, then label: smallest first
            pixels, labels = pixels[order], labels[order]
            first = np.ones(pixels.size, bool)
            first[1:] = pixels[1:] != pixels[:-1]
            pixels, labels = pixels[first], labels[first]
            lab[pixels] = labels
            if not pixels.size:
                break
            pixels, labels = push(pixels, lev)
    return lab


def _numba_flood():
    """flood_loops compiled by Numba, or None when Numba cannot be imported."""
    if "numba" not in _COMPILED:
        try:
            import numba
        except ImportError:
            _COMPILED["numba"] = None
        else:
            _COMPILED["numba"] = numba.njit(nogil=True)(flood_loops)
    return _COMPILED["numba"]


def flood(seeds, level, allowed, levels, method="auto"):
    """Grow `seeds` (H, W) int, 0 = no seed) into the `allowed` pixels (H, W) bool, lowest
    `level` (H, W) int in [0, levels) first. Returns (H, W) int64 labels, 0 where no seed reached.

    method: 'auto' (Numba if importable, else NumPy), 'numba', 'numpy' (flood_rings) or 'python'
    (flood_loops uncompiled: slow, for tests on small images). All give the same labels."""
    seeds = np.asarray(seeds)
    lab, ok, q, offsets = _padded(seeds, level, np.asarray(allowed, bool) & (seeds == 0))
    if method == "auto":
        method = "numba" if _numba_flood() is not None else "numpy"
    if method == "numba":
        fn = _numba_flood()
        if fn is None:
            raise ImportError("flood(method='numba') needs Numba: pip install numba")
        fn(lab, ok, q, int(levels), offsets)
    elif method == "numpy":
        flood_rings(lab, ok, q, int(levels), offsets)
    elif method == "python":
        flood_loops(lab, ok, q, int(levels), offsets)
    else:
        raise ValueError(f"method must be 'auto', 'numba', 'numpy' or 'python', got {method!r}")
    h, w = seeds.shape
    return lab.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


def fill_holes(labels):
    """Fill the holes of each object: a 4-connected region of background that does not touch the
    image edge and borders one object only takes that object's id. (A gap enclosed by two
    different objects stays background.) labels: (H, W) int; returns a new array.

    For every background region, the smallest and the largest id among its 4-neighbours are
    gathered (np.minimum.at / np.maximum.at); a region with one neighbouring object has both equal."""
    lab = np.asarray(labels)
    out = lab.copy()
    bg = label_components(lab == 0, connectivity=4)
    n = int(bg.max())
    if n == 0:
        return out
    edge = np.zeros(n + 1, bool)
    edge[np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]])] = True
    big = np.iinfo(np.int64).max
    lo = np.full(n + 1, big, np.int64)
    hi = np.zeros(n + 1, np.int64)
    for a, b in (((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
                 ((slice(1, None), slice(None)), (slice(None, -1), slice(None)))):
        for region, obj in ((bg[a], lab[b]), (bg[b], lab[a])):
            touch = (region > 0) & (obj > 0)
            np.minimum.at(lo, region[touch], obj[touch])
            np.maximum.at(hi, region[touch], obj[touch])
    one = (lo == hi) & ~edge
    one[0] = False
    fill = np.where(one, hi, 0)
    holes = fill[bg]
    return np.where(holes > 0, holes, out).astype(lab.dtype, copy=False)


def remove_small(labels, min_size):
    """Drop objects of fewer than min_size pixels (they become background) and renumber the rest
    1..K keeping their order. labels: (H, W) non-negative int; returns int64."""
    lab = np.asarray(labels)
    sizes = np.bincount(lab.reshape(-1))
    keep = sizes >= max(min_size, 1)                  # ids absent from the image go too
    keep[0] = False
    lut = np.cumsum(keep) * keep
    return lut[lab]


def _drop_unsure_specks(seeds, interior, min_seed_size, sure_interior):
    """Seeds (H, W) int 1..n without the ones under min_seed_size pixels whose highest interior
    probability is below sure_interior; the rest renumbered 1..K in their order."""
    flat = seeds.reshape(-1)
    n = int(flat.max())
    size = np.bincount(flat, minlength=n + 1)
    peak = np.zeros(n + 1, np.float64)
    np.maximum.at(peak, flat, interior.reshape(-1).astype(np.float64))
    keep = (size >= min_seed_size) | (peak >= sure_interior)
    keep[0] = False
    lut = np.cumsum(keep) * keep
    return lut[seeds]


def labels_from_probabilities(probs, interior_threshold=0.5, foreground_threshold=0.5,
                              min_size=10, min_seed_size=0, sure_interior=0.9, fill=True,
                              keep_unseeded=True, levels=256, method="auto", dtype=np.int32):
    """Instance labels from class probabilities (see the module docstring for the steps).

    probs: (3, H, W) float, the softmax of a three-class network: background, interior, border
        (a whole image, e.g. the output of overlap-tile prediction; (1, 3, H, W) is taken too).
    interior_threshold: p_interior above it makes a seed pixel.
    foreground_threshold: p_interior + p_border above it makes a cell pixel.
    min_size: objects with fewer pixels are dropped (0 keeps everything).
    min_seed_size, sure_interior: a seed (connected component of seed pixels) of fewer than
        min_seed_size pixels is dropped unless its highest p_interior is at least sure_interior
        (min_seed_size 0, the default, or 1 keeps every seed). The command
        (cli.common.objects_from) uses interior_threshold=0.4, min_seed_size=3, sure_interior=0.9
        (SEEDING there): better on 7 of 8 trained demo networks, worse on one, see
        docs/instances.md. With perfect probabilities every seed is sure, so they give the true
        instances back as well.
    fill: fill holes inside objects. keep_unseeded: cell regions no seed reached become objects.
    levels: number of elevation steps of the watershed. method: see flood.
    dtype: of the result, e.g. np.uint16 for a 16-bit label image (ValueError if the objects do
        not fit).
    Returns (H, W) labels: 0 background, 1..K the objects in the row-major order of their seeds."""
    p = np.asarray(probs)
    if p.ndim == 4 and p.shape[0] == 1:
        p = p[0]
    if p.ndim != 3 or p.shape[0] != 3:
        raise ValueError(f"probs must be (3, H, W) probabilities of background, interior and "
                         f"border, got shape {p.shape}")
    if p.dtype.kind != "f":
        raise ValueError(f"probs must be floating-point probabilities, got dtype {p.dtype}")
    if p.size and (np.nanmin(p) < -1e-3 or np.nanmax(p) > 1 + 1e-3 or np.isnan(p).any()):
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to the logits)")
    if not 0 < interior_threshold < 1 or not 0 < foreground_threshold < 1:
        raise ValueError(f"thresholds must lie in (0, 1), got interior {interior_threshold}, "
                         f"foreground {foreground_threshold}")
    if int(levels) < 1 or min_size < 0 or min_seed_size < 0:
        raise ValueError(f"need levels >= 1, min_size >= 0 and min_seed_size >= 0, got {levels}, "
                         f"{min_size} and {min_seed_size}")
    if not 0 <= sure_interior <= 1:
        raise ValueError(f"sure_interior must lie in [0, 1], got {sure_interior}")
    interior = p[1]
    cells = (p[1] + p[2]) > foreground_threshold
    seeds = label_components(cells & (interior > interior_threshold), connectivity=4)
    if min_seed_size > 1 and seeds.max() > 0:
        seeds = _drop_unsure_specks(seeds, interior, min_seed_size, sure_interior)
    level = np.clip(np.rint((1.0 - interior) * (levels - 1)), 0, levels - 1).astype(np.int64)
    lab = flood(seeds, level, cells, levels, method)
    if keep_unseeded:
        rest = label_components(cells & (lab == 0), connectivity=4)
        lab = np.where(rest > 0, rest + lab.max(), lab)
    if fill:
        lab = fill_holes(lab)
    lab = remove_small(lab, min_size)
    top = int(lab.max())
    if top > np.iinfo(dtype).max:
        raise ValueError(f"{top} objects do not fit in {np.dtype(dtype).name}")
    return lab.astype(dtype)

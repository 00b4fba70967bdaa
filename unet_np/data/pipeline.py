"""From a dataset of images of any sizes to training batches, the way ``Trainer.fit(dataset)`` and
``unet-np train`` take them.

    crop = crop_size(model, [m.shape for m in ds.masks])   # the largest size every image gives
    batcher = make_batcher(model, crop, "basic")            # per sample: crop, augment, cut target
    x, y, w = batcher(images, masks, weights, rng)          # one batch, stacked
    train_idx, val_idx = split(len(ds), 0.2, seed=0)        # a seeded validation split

Every random choice draws from the generator passed in, in a fixed order (per sample: the crop's
top, its left, then the augmentation), so a run resumed from a checkpoint's generator state makes the
same batches as the run that was not interrupted.
"""
import numpy as np

from .augment import compose, elastic, flip_rotate

AUGMENTATIONS = ("none", "basic", "elastic")


def augmentation(augment):
    """None / 'none' -> None; 'basic' -> flips and quarter turns; 'elastic' -> those and the
    paper's elastic deformation; a callable f(image, mask, weight, rng) -> (image, mask, weight)
    is used as it is (it must keep the sample's size)."""
    if augment is None or callable(augment):
        return augment
    table = {"none": None, "basic": flip_rotate, "elastic": compose(flip_rotate, elastic)}
    if augment not in table:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} or a callable "
                         f"f(image, mask, weight, rng), got {augment!r}")
    return table[augment]


def per_sample(aug):
    """A per-sample augmentation f(image, mask, weight, rng) applied to each sample of a batch
    x (N, C, H, W), y (N, H, W), w (N, H, W) or None, in order (the array form of Trainer.fit)."""
    def run(x, y, w, rng):
        out = [aug(x[i], y[i], None if w is None else w[i], rng) for i in range(len(x))]
        return (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]),
                None if w is None else np.stack([o[2] for o in out]))
    return run


def crop_size(model, sizes):
    """The common training input size (h, w) ((d, h, w) for volumes): the largest size every image
    can give that ``model`` takes ('same' padding: a multiple of 2**depth; 'valid': a size every
    pooling sees even). sizes: the (H, W) (or (D, H, W)) of each image. ValueError when the images
    are too small for the model."""
    smallest = tuple(min(s[a] for s in sizes) for a in range(len(sizes[0])))
    valid = getattr(model, "padding", "same") == "valid"
    m = 2 ** model.depth
    out = []
    for n in smallest:
        if valid:
            s = n
            while s > 0 and not _takes(model, s):
                s -= 1
        else:
            s = n // m * m
        if s <= 0:
            least = model.valid_input_shape((1,) * len(smallest))[0] if valid else m
            size = "x".join(map(str, smallest))
            raise ValueError(f"images of {size} pixels are too small for a depth-{model.depth} "
                             f"{'valid ' if valid else ''}model (it needs at least "
                             f"{'x'.join([str(least)] * len(smallest))}; use a smaller depth)")
        out.append(s)
    return tuple(out)


def _takes(model, s):
    try:
        model.check_size((s,) * getattr(model, "spatial_dims", 2))
    except ValueError:
        return False
    return True


def output_window(model, in_size):
    """The slices of the model's output inside an input of spatial size in_size ((H, W) or
    (D, H, W)): the whole input for 'same' padding, the centre for 'valid' (whose output is
    smaller)."""
    if getattr(model, "padding", "same") != "valid":
        return tuple(slice(0, n) for n in in_size)
    out = model.output_shape(tuple(in_size))
    return tuple(slice((n - o) // 2, (n - o) // 2 + o) for n, o in zip(in_size, out))


def crop_sample(x, y, w, crop, rng=None):
    """One sample cut to ``crop`` (h, w) ((d, h, w) for volumes): x (C, H, W), y (H, W), w (H, W)
    or None, the same window for all three. At random (the start on each axis in turn, top before
    left, drawn from rng) when rng is given, centred otherwise. A sample already of that size is
    returned as it is."""
    if tuple(y.shape) == tuple(crop):
        return x, y, w
    if rng is not None:
        starts = [int(rng.integers(0, n - c + 1)) for n, c in zip(y.shape, crop)]
    else:
        starts = [(n - c) // 2 for n, c in zip(y.shape, crop)]
    sl = tuple(slice(a, a + c) for a, c in zip(starts, crop))
    return x[(slice(None),) + sl], y[sl], None if w is None else w[sl]


def make_batcher(model, crop, augment=None, random_crop=True):
    """A function (images, masks, weights or None, rng) -> (x, y, w) for Trainer.fit: per sample
    a crop to ``crop`` (random when random_crop, else centred), the augmentation, and for 'valid'
    models the target cut to the output's window; then stacked as x (N, C, h, w) in the model's
    dtype, y int64 (N, ho, wo), w (N, ho, wo) or None (volumes: one more axis each)."""
    aug = augmentation(augment)
    window = output_window(model, crop)

    def run(xs, ys, ws, rng):
        bx, by, bw = [], [], []
        for i in range(len(xs)):
            x, y, w = crop_sample(xs[i], ys[i], None if ws is None else ws[i], crop,
                                  rng if random_crop else None)
            if aug is not None:
                x, y, w = aug(x, y, w, rng)
            bx.append(x)
            by.append(y[window])
            bw.append(None if w is None else w[window])
        x = np.stack(bx).astype(model.dtype, copy=False)
        y = np.stack(by).astype(np.int64)
        w = None if ws is None else np.stack(bw).astype(model.dtype)
        return x, y, w

    return run


def split(n, val_fraction, seed=0):
    """(train indices, validation indices), each sorted: a shuffle seeded by ``seed``, with
    round(n * val_fraction) held out, and at least one of each when n >= 2 and val_fraction > 0."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def object_array(items):
    """A 1-D object array holding arrays of different shapes (indexable by an index array)."""
    arr = np.empty(len(items), dtype=object)
    for i, a in enumerate(items):
        arr[i] = a
    return arr

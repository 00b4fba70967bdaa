"""Prediction on images of any size: the U-Net paper's overlap-tile strategy.

    probs = predict_tiled(model, image)                       # image (C, H, W) -> (num_classes, H, W)
    probs = predict_tiled(model, image, tile=256, overlap=64) # bounded memory for a large image
    probs = predict_tiled(model3d, volume, tile=(16, 64, 64)) # volume (C, D, H, W), spatial_dims=3

How it works, along each axis (rows and columns alike; for a volume, slices too: everything below
is done per axis, so a 3-D model is tiled in D, H and W the same way):

* The image is mirror-padded (reflection at the border) by a margin ``c`` in front, and at the end
  by whatever makes the last tile whole, so the network sees plausible context at the border
  instead of zeros, as in the paper (its Fig. 2).
* The output is cut into tiles of ``T`` pixels. For the tile that starts at output pixel ``p`` the
  network gets the input window ``[p, p + S)`` of the padded image, ``S = T + 2c``; of what it
  returns, the part for output pixels ``[p, p + T)`` is kept.
* 'same' models (output size = input size): ``c`` is the overlap (context on each side) and the
  window's outer ``c`` pixels are thrown away after the forward: they saw the window's zero padding.
  When ``c`` covers the network's receptive field, each kept pixel sees exactly what it would see in
  one forward over the whole padded image, so tiling changes nothing but the memory needed.
* 'valid' models (unpadded convolutions, output smaller than input): the window ``S`` is the smallest
  valid input size whose output covers the tile (see ``UNet.valid_input_shape`` / ``output_shape``),
  and ``c = (S - S_out) / 2`` is fixed by the architecture: there is nothing to throw away.
* Every window starts at a multiple of ``2**depth`` pixels of the padded image, so the max-pool grids
  of all tiles line up with those of a whole-image forward (a U-Net of depth d is only shift-
  equivariant by multiples of 2**d). For 'valid' models the kept part of each tile is therefore
  rounded down to a multiple of 2**depth, and neighbouring outputs overlap by the remainder.

* For 'same' models the margin ``c`` is rounded up to a multiple of ``2**depth``. The image then
  starts at a multiple of ``2**depth`` inside every window as well, so its pixels fall into the same
  pooling cells whatever the overlap asked for, and any overlap of at least the receptive-field reach
  (``receptive_margin``) gives the same probabilities. (Rounding to a multiple of ``2**(depth-1)``
  only, as before, kept S a multiple of 2**depth but shifted the pooling grid against the image by
  half a period for some overlaps: a depth-3 model gave logits that differed by 7.3e-6 (relative,
  float64) between overlaps 52 and 56; the test in tests/test_infer.py measures 0 now.)

Input. ``predict_tiled`` does not normalise: the model sees the image exactly as given. Normalise it
as the training images were, with ``unet_np.data.normalize_image(image, mode, mean, std)`` and the
mode (and, for 'dataset', the statistics) used in training; ``unet-np predict`` and ``evaluate`` do
this from what the checkpoint recorded. An unnormalised image is not refused; the network then sees
values on another scale than in training and its predictions are accordingly wrong.

NumPy only; any backend's model works (its output comes back with ``to_numpy``).
"""
import itertools
import math

import numpy as np

from .backends import to_numpy
from .nn.module import no_grad

__all__ = ["predict_tiled", "receptive_margin", "softmax", "tile_plan", "DEFAULT_MAX_BYTES",
           "DEFAULT_TILE", "DEFAULT_TILE_3D"]

# The whole image goes through one forward when that needs less than this (else the largest tile
# up to 256 pixels, 64 voxels for a volume, whose window does).
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_TILE = 256
DEFAULT_TILE_3D = 64


def receptive_margin(model):
    """How far (in input pixels) an output pixel's receptive field reaches beyond the pixel on its
    worse side, for a 'same' U-Net-family model of depth d.

    Counted layer by layer (a pixel at level i stands for 2**i input pixels): a 3x3 convolution at
    level i widens the reach by 2**i; a 2x2 pooling merges footprints and widens nothing; a 2x2
    stride-2 transposed convolution hands its parent's footprint down, 2**i wider on one side; bilinear
    x2 upsampling reads one more parent on each side (3 * 2**i). Summed over the encoder, the
    bottleneck and the decoder: 7 * 2**d - 5 with transposed convolutions, 9 * 2**d - 7 with bilinear
    upsampling (also used for Attention U-Net, whose gates resample bilinearly). U-Net++'s longest
    path through its nested blocks reaches no further than the plain U-Net's.
    """
    d = int(getattr(model, "depth", 4))
    cfg = model.config() if hasattr(model, "config") else {}
    bilinear = cfg.get("upsample") == "bilinear" or getattr(model, "arch", None) == "attention"
    return 9 * 2 ** d - 7 if bilinear else 7 * 2 ** d - 5


def _round_up(n, m):
    return int(math.ceil(n / m) * m)


def _is_valid(model):
    return getattr(model, "padding", "same") == "valid"


def _spatial_dims(model):
    return int(getattr(model, "spatial_dims", 2))


def _per_axis(value, dims, name):
    """None, an int (every axis) or one value per spatial axis -> a tuple of dims values."""
    if value is None or np.isscalar(value):
        return (value,) * dims
    value = tuple(value)
    if len(value) != dims:
        raise ValueError(f"{name} must be one number or {dims} (one per spatial axis), got {value}")
    return value


def _axis_plan(model, length, tile, overlap):
    """(S, c, T): window size, front margin and kept length per tile along one axis."""
    m = 2 ** int(model.depth)
    if _is_valid(model):
        want = length if tile is None else max(1, int(tile))
        s = model.valid_input_shape((want,))[0]
        while model.output_shape((s,))[0] < want:  # the smallest window whose output covers `want`
            s = model.valid_input_shape((s + 1,))[0]
        s_out = model.output_shape((s,))[0]
        if (s - s_out) % 2:
            raise ValueError(f"{type(model).__name__}: output {s_out} is not centred in input {s}")
        c = (s - s_out) // 2
        if tile is None or want >= length:
            return s, c, s_out  # one window covers the axis
        t = (s_out // m) * m
        if t < 1:  # an output tile too small to keep a whole pooling period: take a larger window
            return _axis_plan(model, length, m + 4, overlap)
        return s, c, t
    c = receptive_margin(model) if overlap is None else max(0, int(overlap))
    # a multiple of 2**depth: S = T + 2c is then one too, and the image starts on the pooling grid
    # of every window, so the result does not depend on the overlap once it covers the reach
    c = _round_up(c, m)
    t = _round_up(length if tile is None else min(max(1, int(tile)), length), m)
    return t + 2 * c, c, t


def _window_bytes(model, size, tiles, overlaps):
    """The model's activation_bytes estimate for one window (batch 1) of the given tiling."""
    window = [_axis_plan(model, n, t, o)[0] for n, t, o in zip(size, tiles, overlaps)]
    return model.activation_bytes((1, model.in_channels, *window))


def _choose_tile(model, size, overlaps, max_bytes):
    """tile=None: None (one window over the whole image) if its forward fits in max_bytes, else the
    largest tile (a multiple of 2**depth, at most DEFAULT_TILE in 2-D or DEFAULT_TILE_3D in 3-D)
    whose window fits; 2**depth if none does. A volume's window grows as the cube of its side, and
    every side carries the margin on both ends, so in 3-D the fitting tile is much smaller."""
    if not hasattr(model, "activation_bytes"):
        return (None,) * len(size)
    if _window_bytes(model, size, (None,) * len(size), overlaps) <= max_bytes:
        return (None,) * len(size)
    m = 2 ** int(model.depth)
    t = DEFAULT_TILE if len(size) == 2 else DEFAULT_TILE_3D
    while t > m and _window_bytes(model, size, (t,) * len(size), overlaps) > max_bytes:
        t -= m
    return (max(t, m),) * len(size)


def tile_plan(model, size, tile=None, overlap=None, max_bytes=DEFAULT_MAX_BYTES):
    """The tiling ``predict_tiled`` would use for an image of spatial size ``size`` ((H, W), or
    (D, H, W) for a volume): a dict with, per spatial axis, 'window' (S), 'margin' (c), 'keep' (T),
    'tiles' (how many) and 'pad' ((before, after) of the mirror padding).

    tile, overlap: one number for every axis or one per axis (see predict_tiled).
    tile=None: one window over the whole image if a forward on it needs under max_bytes (by the
    model's activation_bytes estimate, which counts every axis, D included), else the largest tile
    that fits (see _choose_tile)."""
    size = tuple(int(s) for s in size)
    dims = _spatial_dims(model)
    if len(size) != dims:
        raise ValueError(f"{type(model).__name__}(spatial_dims={dims}) tiles a size of {dims} axes, "
                         f"got {size}")
    tiles = _per_axis(tile, dims, "tile")
    overlaps = _per_axis(overlap, dims, "overlap")
    if all(t is None for t in tiles):
        tiles = _choose_tile(model, size, overlaps, max_bytes)
    plans = [_axis_plan(model, n, t, o) for n, t, o in zip(size, tiles, overlaps)]
    counts = tuple(max(1, math.ceil(n / t)) for n, (_, _, t) in zip(size, plans))
    pads = []
    for n, k, (s, c, t) in zip(size, counts, plans):
        total = (k - 1) * t + s
        pads.append((c, total - c - n))
    return {"window": tuple(p[0] for p in plans), "margin": tuple(p[1] for p in plans),
            "keep": tuple(p[2] for p in plans), "tiles": counts, "pad": tuple(pads)}


def _mirror_pad(x, pads):
    """Reflect-pad (C, *spatial) by one (before, after) per spatial axis; NumPy reflects repeatedly
    when a pad is wider than the axis. A 1-pixel axis cannot be reflected: it is repeated."""
    for axis, (before, after) in enumerate(pads, start=1):
        mode = "reflect" if x.shape[axis] > 1 else "edge"
        widths = [(0, 0)] * x.ndim
        widths[axis] = (before, after)
        x = np.pad(x, widths, mode=mode)
    return x


def softmax(logits, axis=0):
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _scores(model, batch):
    """Logits of the model's (last) output head as a NumPy array."""
    out = model.predict(batch)
    out = out[-1] if isinstance(out, list) else out
    return to_numpy(out)


def _check_image(model, x):
    """One image (C, H, W) for a 2-D model, one volume (C, D, H, W) for a 3-D model."""
    dims = _spatial_dims(model)
    name = f"{type(model).__name__}(spatial_dims={dims})"
    if x.ndim != 1 + dims:
        if dims == 2:
            hint = ("a volume (C, D, H, W) needs a model built with spatial_dims=3"
                    if x.ndim == 4 else "pass one image at a time; a one-channel image needs its "
                    "channel axis: image[None]" if x.ndim == 2 else "pass one image at a time")
            raise ValueError(f"predict_tiled: {name} takes one image (C, H, W), got shape "
                             f"{x.shape}; {hint}")
        hint = ("a one-channel volume needs its channel axis: volume[None]; a 2-D image (C, H, W) "
                "needs a model built with spatial_dims=2" if x.ndim == 3
                else "pass one volume at a time")
        raise ValueError(f"predict_tiled: {name} takes one volume (C, D, H, W), got shape "
                         f"{x.shape}; {hint}")
    if x.shape[0] != model.in_channels:
        raise ValueError(f"image has {x.shape[0]} channels, the model takes {model.in_channels}")
    if not np.all(np.isfinite(x)):
        raise ValueError("image has NaN or infinite values")


def predict_tiled(model, image, tile=None, overlap=None, batch_size=4, logits=False,
                  max_bytes=DEFAULT_MAX_BYTES):
    """Class probabilities (num_classes, H, W) for one image (C, H, W) of any size, or
    (num_classes, D, H, W) for one volume (C, D, H, W) and a model built with spatial_dims=3.

    image: normalised as the model's training images were (see the module docstring: nothing
        checks this).
    tile: output pixels kept per tile, one number for every axis or one per axis (rounded up to a
        multiple of 2**depth for 'same' models, down for 'valid' ones); None: the whole image at
        once when it fits in max_bytes, else the largest tile that fits (tile_plan).
    overlap: context in pixels on each side of a tile, one number or one per axis ('same' models;
        rounded up to a multiple of 2**depth); None: the receptive-field reach (receptive_margin).
        Any overlap of at least the reach gives the same result, tiled or not. 'valid' models take
        their context from the architecture.
    batch_size: windows per forward. logits: return the raw scores instead of probabilities (a
        one-class model's probabilities are sigmoid(score), else softmax over the classes).
    The model is put in eval mode for the call and restored after it.
    """
    x = np.asarray(to_numpy(image))
    _check_image(model, x)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    size = x.shape[1:]                                     # (H, W) or (D, H, W)
    plan = tile_plan(model, size, tile, overlap, max_bytes)
    window, margin, keep = plan["window"], plan["margin"], plan["keep"]
    xp = _mirror_pad(x.astype(model.dtype, copy=False), plan["pad"])
    # every tile's first output pixel, per axis: multiples of its kept length
    starts = list(itertools.product(*[range(0, k * t, t) for k, t in zip(plan["tiles"], keep)]))
    # 'same': the window's output pixel c + k is output pixel p + k; 'valid': its k-th output
    # pixel already is output pixel p + k (the margin was eaten by the network).
    offset = (0,) * len(size) if _is_valid(model) else margin
    out = None
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for b in range(0, len(starts), batch_size):
                group = starts[b:b + batch_size]
                batch = np.stack([xp[(slice(None),) + tuple(slice(p, p + s) for p, s in zip(p0, window))]
                                  for p0 in group])         # (B, C, *window)
                scores = _scores(model, batch)             # (B, classes, *window output)
                if out is None:
                    out = np.empty((scores.shape[1], *size), dtype=scores.dtype)
                for p0, s in zip(group, scores):
                    kept = [min(t, n - p) for t, n, p in zip(keep, size, p0)]  # last tiles stop at the edge
                    dst = tuple(slice(p, p + k) for p, k in zip(p0, kept))
                    src = tuple(slice(o, o + k) for o, k in zip(offset, kept))
                    out[(slice(None),) + dst] = s[(slice(None),) + src]
    finally:
        model.train(was_training)
    if logits:
        return out
    if out.shape[0] == 1:
        return 1.0 / (1.0 + np.exp(-out))
    return softmax(out, axis=0)

"""nnU-Net's sliding-window inference (nnU-Net v2's predictor), for any unet_np model, 2-D and 3-D.

An image larger than the network's patch is covered by tiles of the patch size, placed with a step
of ``tile_step_size`` (0.5: half a patch) times the patch along each axis and spread evenly so the
last tile ends at the border. Each tile's logits are weighted by a Gaussian importance map (sigma =
1/8 of the patch per axis; centre weight 10) that trusts a tile's centre over its borders, summed,
and divided by the summed weights. With ``mirror_axes`` each tile is also predicted flipped along
every non-empty combination of those axes (test-time augmentation) and the flipped-back logits are
averaged. An image smaller than the patch is zero-padded (centred) to the patch size and the result
cropped back, as nnU-Net does.

The constants and steps are nnU-Net's published ones (compute_gaussian: a delta at the patch centre
[s // 2 per axis] blurred by scipy.ndimage.gaussian_filter(sigma = s / 8, truncate 4, constant
borders), scaled so its maximum is 10, zeros replaced by the smallest non-zero value;
compute_steps_for_sliding_window: ceil((image - patch) / (patch * step)) + 1 tiles per axis at
round(k * (image - patch) / (n - 1))). Everything here is NumPy; the Gaussian is computed separably
in float64 without SciPy. nnU-Net itself accumulates in float16 on the GPU; this module accumulates
in the model's dtype.
"""
import itertools
import math

import numpy as np

from .backends import to_numpy

__all__ = ["gaussian_importance_map", "sliding_window_steps", "predict_sliding_window"]


def gaussian_importance_map(patch_size, sigma_scale=1.0 / 8, value_scaling_factor=10.0):
    """The importance weights of one tile, shape ``patch_size`` (float64).

    Per axis of size s: sigma = s * sigma_scale, radius r = int(4 sigma + 0.5) (SciPy's truncate=4),
    a normalised kernel w(x) = exp(-x^2 / (2 sigma^2)) / sum_{|x'| <= r} exp(...) centred at s // 2
    and zero beyond r; the map is the product over axes (the blur of a delta is separable), scaled
    so that its maximum is value_scaling_factor, with exact zeros replaced by the smallest non-zero
    value (so no voxel has zero total weight)."""
    patch_size = tuple(int(s) for s in patch_size)
    if not patch_size or min(patch_size) < 1:
        raise ValueError(f"gaussian_importance_map: patch_size must be positive sizes, got {patch_size}")
    g = np.ones((), dtype=np.float64)
    for s in patch_size:
        sigma = s * sigma_scale
        radius = int(4.0 * sigma + 0.5)
        x = np.arange(-radius, radius + 1)
        phi = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
        phi /= phi.sum()
        axis = np.zeros(s, dtype=np.float64)
        pos = np.arange(s) - s // 2
        inside = np.abs(pos) <= radius
        axis[inside] = phi[pos[inside] + radius]
        g = np.multiply.outer(g, axis)
    g = g / (g.max() / value_scaling_factor)
    if np.any(g == 0):
        g[g == 0] = g[g != 0].min()
    return g


def sliding_window_steps(image_size, patch_size, tile_step_size=0.5):
    """Per axis, the start of every tile (nnU-Net's compute_steps_for_sliding_window)."""
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
    steps = []
    for i, k in zip(image_size, patch_size):
        if i < k:
            raise ValueError(f"sliding_window_steps: image size {tuple(image_size)} is smaller than the "
                             f"patch {tuple(patch_size)} (pad it first)")
        n = int(math.ceil((i - k) / (k * tile_step_size))) + 1
        actual = (i - k) / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * j)) for j in range(n)])
    return steps


def _predict_tile(model, tile, mirror_axes):
    """Logits (num_classes, *patch) of one tile (C, *patch), averaged over the mirror flips."""
    def run(x):
        out = model.predict(x[None])
        out = out[0] if isinstance(out, (list, tuple)) else out
        return np.asarray(to_numpy(out))[0]
    pred = run(tile)
    if mirror_axes:
        axes = [a + 1 for a in mirror_axes]                    # spatial axis -> axis of (C, *spatial)
        combos = [c for r in range(len(axes)) for c in itertools.combinations(axes, r + 1)]
        for c in combos:
            pred = pred + np.flip(run(np.ascontiguousarray(np.flip(tile, c))), c)
        pred = pred / (len(combos) + 1)
    return pred


def predict_sliding_window(model, image, patch_size, tile_step_size=0.5, use_gaussian=True,
                           mirror_axes=None):
    """nnU-Net's sliding-window logits for one image.

    model: any unet_np model (put in eval mode by the caller; a list output, deep supervision, uses
    its first, full-resolution entry). image: (C, *spatial), 2 or 3 spatial axes. patch_size: the
    tile, one size per spatial axis (the plans' patch_size). mirror_axes: None, or spatial axes to
    flip for test-time augmentation ((0, 1) in 2-D, (0, 1, 2) in 3-D as nnU-Net's defaults).
    Returns logits (num_classes, *spatial) in the model's dtype.
    """
    image = np.asarray(to_numpy(image))
    patch_size = tuple(int(p) for p in patch_size)
    if image.ndim != len(patch_size) + 1:
        raise ValueError(f"predict_sliding_window: image must be (C, *spatial) with {len(patch_size)} "
                         f"spatial axes to match patch_size {patch_size}, got shape {image.shape}")
    if mirror_axes is not None and any(not 0 <= a < len(patch_size) for a in mirror_axes):
        raise ValueError(f"predict_sliding_window: mirror_axes {tuple(mirror_axes)} must be spatial "
                         f"axes 0..{len(patch_size) - 1}")
    dtype = np.dtype(getattr(model, "dtype", np.float32))
    image = image.astype(dtype, copy=False)
    # zero-pad (centred) up to the patch where the image is smaller, as nnU-Net's pad_nd_image
    spatial = image.shape[1:]
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip(spatial, patch_size)]
    data = np.pad(image, [(0, 0)] + pads) if any(a or b for a, b in pads) else image
    weights = gaussian_importance_map(patch_size).astype(dtype) if use_gaussian else None
    logits = None
    counts = np.zeros(data.shape[1:], dtype=dtype)
    for start in itertools.product(*sliding_window_steps(data.shape[1:], patch_size, tile_step_size)):
        box = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
        pred = _predict_tile(model, np.ascontiguousarray(data[(slice(None),) + box]), mirror_axes)
        if logits is None:
            logits = np.zeros((pred.shape[0],) + data.shape[1:], dtype=dtype)
        if weights is not None:
            pred = pred * weights
        logits[(slice(None),) + box] += pred
        counts[box] += weights if weights is not None else 1
    logits /= counts
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial))
    return logits[(slice(None),) + crop]

"""Argument normalisers shared by the layers and the backends: an int or a tuple becomes a tuple of
``dims`` ints (2 for (h, w), 3 for (d, h, w)), checked, with an error naming the argument.

    pair(3)                    -> (3, 3)
    pair((1, 2))               -> (1, 2)
    pair(2, dims=3)            -> (2, 2, 2)
    padding_pairs(1)           -> ((1, 1), (1, 1))             (before, after) per axis
    padding_pairs((1, (0, 1))) -> ((1, 1), (0, 1))
    scale_pair(2)              -> (2, 2)                       integer upsampling factors
    size_pair(arr, "CenterCrop") -> arr.shape[-2:]
"""
import numbers

import numpy as np


def _is_int(v):
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


def _shape_words(dims):
    return {2: "a pair (h, w)", 3: "a triple (d, h, w)"}.get(dims, f"a tuple of {dims}")


def pair(v, name="value", dims=2):
    """An int or a tuple of ``dims`` ints -> a tuple of ``dims`` Python ints."""
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    if len(vals) != dims:
        raise ValueError(f"{name} must be an int or {_shape_words(dims)}, got {v!r}")
    if not all(_is_int(u) for u in vals):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {v!r}")
    return tuple(int(u) for u in vals)


def padding_pairs(p, dims=2):
    """int | (p_h, p_w) | ((top, bottom), (left, right)), each entry an int or a (before, after)
    pair -> ((before, after),) * dims as Python ints."""
    vals = tuple(p) if isinstance(p, (tuple, list)) else (p,) * dims
    if len(vals) != dims:
        raise ValueError(f"padding must be an int or one entry per axis ({dims}), got {p!r}")
    out = []
    for v in vals:
        before, after = (v, v) if not isinstance(v, (tuple, list)) else v
        if not (_is_int(before) and _is_int(after)):
            raise TypeError(f"padding must hold ints, got {p!r}")
        out.append((int(before), int(after)))
    return tuple(out)


def scale_pair(scale, owner="Upsample", dims=2):
    """An integer scale factor (an int, an integral float, or a tuple of them) -> a tuple of ``dims``
    ints >= 1."""
    vals = tuple(scale) if isinstance(scale, (tuple, list)) else (scale,) * dims
    if len(vals) != dims:
        raise ValueError(f"{owner}: scale_factor must be a number or {_shape_words(dims)}, got {scale!r}")
    out = []
    for v in vals:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"{owner}: scale_factor must be a positive integer, got {scale!r}")
        if v != int(v) or int(v) < 1:
            raise ValueError(f"{owner}: scale_factor must be a positive integer (only integer factors "
                             f"are supported), got {scale!r}")
        out.append(int(v))
    return tuple(out)


def size_pair(size, owner, dims=2):
    """An int, a tuple of ``dims`` ints, or an array whose last ``dims`` dimensions give the size
    -> a tuple of ``dims`` positive ints."""
    if hasattr(size, "shape") and not isinstance(size, (tuple, list)):
        shape = tuple(size.shape)
        if len(shape) < dims:
            raise ValueError(f"{owner}: an array given as size needs at least {dims} dimensions, got "
                             f"shape {shape}")
        return tuple(int(s) for s in shape[-dims:])
    vals = tuple(size) if isinstance(size, (tuple, list)) else (size,) * dims
    if len(vals) != dims or not all(_is_int(v) for v in vals):
        raise TypeError(f"{owner}: size must be an int, {_shape_words(dims)} of ints or an array whose last "
                        f"{dims} dimensions give it, got {size!r}")
    if min(vals) < 1:
        raise ValueError(f"{owner}: size must be positive, got {size!r}")
    return tuple(int(v) for v in vals)


def check_int(layer, name, v, minimum):
    """v as a Python int >= minimum, or a TypeError / ValueError naming the layer and argument."""
    if not _is_int(v):
        raise TypeError(f"{layer}: {name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {v}")
    return int(v)


def check_pair(layer, name, v, minimum, dims=2):
    """An int or a tuple of ``dims`` ints, each >= minimum -> a tuple of ``dims`` ints."""
    if isinstance(v, (tuple, list)):
        if len(v) != dims:
            raise ValueError(f"{layer}: {name} must be an int or {_shape_words(dims)}, got {v!r}")
        return tuple(check_int(layer, name, u, minimum) for u in v)
    return (check_int(layer, name, v, minimum),) * dims

"""Weight initialisation: PyTorch's defaults, and the U-Net paper's He-normal.

All draws come from one NumPy Generator, so ``unet_np.seed(n)`` makes a model reproducible.

PyTorch's default for Conv2d / ConvTranspose2d is kaiming_uniform(a=sqrt(5)), which works out to
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, and the same bound for the bias.
He-normal (He et al. 2015, used by Ronneberger et al.): N(0, sqrt(2 / N)), N = fan-in, the number of
inputs that feed one output unit.
"""
import math

import numpy as np

_rng = np.random.default_rng(0)


def seed(n):
    """Re-seed the generator that every layer's initialisation draws from."""
    global _rng
    _rng = np.random.default_rng(n)


def default_rng():
    return _rng


def uniform(shape, bound, dtype):
    return _rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_weight_and_bias(weight_shape, bias_size, fan_in, init, dtype):
    """(weight, bias or None) as NumPy arrays. init: 'torch' (PyTorch's default) or 'he' (He-normal
    weight, zero bias). bias_size: the bias length, or None for no bias."""
    bound = 1.0 / math.sqrt(fan_in)
    if init in (None, "torch"):
        w = uniform(weight_shape, bound, dtype)
        b = uniform((bias_size,), bound, dtype) if bias_size else None
    elif init == "he":
        w = (_rng.standard_normal(weight_shape) * math.sqrt(2.0 / fan_in)).astype(dtype)
        b = np.zeros(bias_size, dtype=dtype) if bias_size else None
    else:
        raise ValueError(f"init must be 'torch' or 'he', got {init!r}")
    return w, b

"""Dropout, Dropout2d, Dropout3d: random zeroing in training, the identity in evaluation.

Training: y = x * mask / (1 - p), mask ~ Bernoulli(1 - p), drawn per element (Dropout) or per
(sample, channel) map (Dropout2d on (N, C, H, W), Dropout3d on (N, C, D, H, W)), as PyTorch's
layers do; the 1 / (1 - p) keeps the expected value of y equal to x, so evaluation needs no
rescaling. y is linear in x with a fixed mask, so the backward is dx = dy * mask / (1 - p).

The masks come from a NumPy Generator of the layer's own (``seed=`` an int, or a Generator given by
the caller), drawn on the CPU and moved to the backend: the same seed gives the same masks on every
backend. They cannot equal PyTorch's (another generator), so tests compare with PyTorch using the
mask this layer drew (``last_mask``).
Long form: docs/backprop.md#dropout.
"""
import numpy as np

from .module import Module, check_input


class Dropout(Module):
    """Elementwise dropout with probability p (0 <= p <= 1) of zeroing each value, as
    torch.nn.Dropout. seed: None (fresh entropy), an int, or a numpy.random.Generator to draw from.
    Off in evaluation (``eval()``) and when p == 0. ``last_mask`` is the scaled mask of the last
    training forward (mask / (1 - p), broadcastable to the input), for tests."""

    NDIM = None             # any rank; Dropout2d and Dropout3d fix it

    def __init__(self, p=0.5, inplace=False, seed=None, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0 <= p <= 1:
            raise ValueError(f"{type(self).__name__}: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.inplace = bool(inplace)          # accepted for PyTorch's signature; never in place here
        self.generator = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.last_mask = None

    def mask_shape(self, shape):
        """The shape of one draw: the whole input for Dropout, (N, C, 1, ...) for the channel forms."""
        return shape

    def forward(self, x):
        name = type(self).__name__
        x = check_input(name, x, ndim=self.NDIM, xp=self.xp)
        if not self.training or self.p == 0:
            self._keep(("identity", tuple(x.shape)))
            return x                                   # the identity, as PyTorch (no copy)
        keep = self.generator.random(self.mask_shape(tuple(x.shape))) >= self.p   # Bernoulli(1 - p)
        scale = 0.0 if self.p == 1 else 1.0 / (1.0 - self.p)
        mask = self.backend.asarray((keep * scale).astype(x.dtype))               # mask / (1 - p)
        self.last_mask = mask
        self._keep((mask, tuple(x.shape)))
        return x * mask

    def backward(self, dy):
        mask, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"{type(self).__name__}: backward expected dy of shape {shape}, got "
                             f"{tuple(dy.shape)}")
        # in the forward: y = x * mask / (1 - p); so dx = dy * mask / (1 - p)
        dx = dy.copy() if isinstance(mask, str) else dy * mask
        self._release()
        return dx

    def extra_repr(self):
        return f"p={self.p}"


class Dropout2d(Dropout):
    """Channel dropout on (N, C, H, W), as torch.nn.Dropout2d: each (sample, channel) map is zeroed
    whole with probability p (the others scaled by 1 / (1 - p))."""

    NDIM = 4

    def mask_shape(self, shape):
        return shape[:2] + (1,) * (len(shape) - 2)


class Dropout3d(Dropout2d):
    """Channel dropout on (N, C, D, H, W), as torch.nn.Dropout3d."""

    NDIM = 5

"""Activations: ReLU, LeakyReLU and Sigmoid.

Each primitive is a pair: ``<op>_forward(x) -> (y, cache)`` and ``<op>_backward(dy, cache) -> dx``.
The layer classes at the bottom call them through ``self.ops`` so another backend can replace them.
Derivations in long form: docs/backprop.md#activations.
"""
import numpy as np

from .module import Module, check_input

OPS = ("relu_forward", "relu_backward", "sigmoid_forward", "sigmoid_backward")


def relu_forward(x):
    """y = max(x, 0).   x: any shape -> y: same shape.  cache: y (y > 0 exactly where x > 0)."""
    y = np.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """dL/dx = dL/dy * 1[x > 0].  The derivative at x = 0 is taken as 0, as PyTorch does.
    dy, y: same shape -> dx: same shape."""
    return dy * (y > 0)


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), computed without overflow for |x| up to 1e4.   cache: y."""
    # For x >= 0 use 1/(1+e^-x); for x < 0 the equal form e^x/(1+e^x): exp never sees a large argument.
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, 1 / (1 + e), e / (1 + e))
    return y, y


def sigmoid_backward(dy, y):
    """dy/dx = y (1 - y), so dL/dx = dL/dy * y * (1 - y)."""
    return dy * y * (1 - y)


class ReLU(Module):
    """Rectified linear unit, elementwise. Any input rank."""

    def forward(self, x):
        x = check_input("ReLU", x, ndim=None, xp=self.xp)
        y, cache = self.ops.relu_forward(x)
        self._keep(cache)
        return y

    def backward(self, dy):
        dx = self.ops.relu_backward(dy, self._take())
        self._release()
        return dx


class Sigmoid(Module):
    """Logistic sigmoid, elementwise. Any input rank."""

    def forward(self, x):
        x = check_input("Sigmoid", x, ndim=None, xp=self.xp)
        y, cache = self.ops.sigmoid_forward(x)
        self._keep(cache)
        return y

    def backward(self, dy):
        dx = self.ops.sigmoid_backward(dy, self._take())
        self._release()
        return dx


class LeakyReLU(Module):
    """y = x for x > 0, negative_slope * x otherwise; elementwise, any input rank, as
    torch.nn.LeakyReLU (default slope 0.01; MONAI's BasicUNet uses 0.1, nnU-Net 0.01).

    Backward: dy/dx = 1 where x > 0 and negative_slope elsewhere (x = 0 included, as PyTorch), so
    dx = dy * where(x > 0, 1, negative_slope). The forward keeps the boolean mask x > 0 (one byte a
    value). Written with the backend's array module, so it runs on every backend.
    """

    def __init__(self, negative_slope=0.01, inplace=False, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float, np.floating,
                                                                               np.integer)):
            raise TypeError(f"LeakyReLU: negative_slope must be a number, got {negative_slope!r}")
        self.negative_slope = float(negative_slope)
        self.inplace = bool(inplace)         # accepted for PyTorch's signature; never in place here

    def forward(self, x):
        x = check_input("LeakyReLU", x, ndim=None, xp=self.xp)
        positive = x > 0                                     # same shape as x, bool
        y = self.xp.where(positive, x, x * self.negative_slope).astype(x.dtype, copy=False)
        self._keep(positive)
        return y

    def backward(self, dy):
        positive = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != tuple(positive.shape):
            raise ValueError(f"LeakyReLU: backward expected dy of shape {tuple(positive.shape)}, got "
                             f"{tuple(dy.shape)}")
        # in the forward: y = x if x > 0 else slope * x; so dx = dy or slope * dy
        dx = self.xp.where(positive, dy, dy * self.negative_slope).astype(dy.dtype, copy=False)
        self._release()
        return dx

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"

"""Numba CPU kernels for ReLU (the numba backend); reference: unet_np/nn/activation.py.
Element-wise, parallel over the flattened array, the same arithmetic as the NumPy version:
forward max(x, 0) (NaN propagates, as np.maximum), backward dy * 1[y > 0]."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def relu_forward_flat(x, y):
    for k in prange(x.size):
        v = x[k]
        y[k] = v if (v > 0 or v != v) else 0
    return y


@njit(parallel=True, cache=True, fastmath=False)
def relu_backward_flat(dy, y, dx):
    for k in prange(dy.size):
        dx[k] = dy[k] * (1 if y[k] > 0 else 0)
    return dx

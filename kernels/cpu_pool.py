"""Numba CPU kernels for the 2x2 stride-2 max-pool (the numba backend); reference:
unet_np/nn/pool.py (_maxpool2x2_forward / _maxpool2x2_backward). One pass over the input computes
the maximum and a compact uint8 argmax (0 1 / 2 3, the first maximum on a tie, as PyTorch), with
the same comparisons as the NumPy reference so NaN handling agrees; parallel over (n, c) planes."""
import numpy as np
from numba import njit, prange


@njit(inline="always")
def _nanmax(a, b):
    # np.maximum: NaN if either is NaN, else the larger
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(parallel=True, cache=True, fastmath=False)
def maxpool2x2_forward(x):
    """x (N, C, H, W) -> y (N, C, H//2, W//2), arg uint8 (same shape)."""
    N, C, H, W = x.shape
    Ho = H // 2
    Wo = W // 2
    y = np.empty((N, C, Ho, Wo), dtype=x.dtype)
    arg = np.empty((N, C, Ho, Wo), dtype=np.uint8)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(Ho):
            for j in range(Wo):
                p = x[n, c, 2 * i, 2 * j]
                q = x[n, c, 2 * i, 2 * j + 1]
                r = x[n, c, 2 * i + 1, 2 * j]
                s = x[n, c, 2 * i + 1, 2 * j + 1]
                top = _nanmax(p, q)
                bottom = _nanmax(r, s)
                if bottom > top:
                    arg[n, c, i, j] = 3 if s > r else 2
                else:
                    arg[n, c, i, j] = 1 if q > p else 0
                y[n, c, i, j] = _nanmax(top, bottom)
    return y, arg


@njit(parallel=True, cache=True, fastmath=False)
def maxpool2x2_backward(dy, arg, H, W):
    """dx (N, C, H, W): dy[n, c, i, j] at the window position arg[n, c, i, j], zero elsewhere
    (including a trailing odd row / column that no window reads)."""
    N, C, Ho, Wo = dy.shape
    dx = np.empty((N, C, H, W), dtype=dy.dtype)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for i in range(Ho):
            for j in range(Wo):
                a = arg[n, c, i, j]
                g = dy[n, c, i, j]
                dx[n, c, 2 * i, 2 * j] = g if a == 0 else 0
                dx[n, c, 2 * i, 2 * j + 1] = g if a == 1 else 0
                dx[n, c, 2 * i + 1, 2 * j] = g if a == 2 else 0
                dx[n, c, 2 * i + 1, 2 * j + 1] = g if a == 3 else 0
        if H > 2 * Ho:
            for v in range(W):
                dx[n, c, H - 1, v] = 0
        if W > 2 * Wo:
            for h in range(2 * Ho):
                dx[n, c, h, W - 1] = 0
    return dx

"""Max-pooling for Numba-CUDA, forward with argmax and backward.

NumPy reference: unet_np/nn/pool.py maxpool2d_forward / maxpool2d_backward (``_maxpool_windows_*``
for the general case, ``_maxpool2x2_*`` for the U-Net's 2x2 stride 2). Same rule: the window position
k = a*kw + b (row-major) of the FIRST maximum is kept; padding counts as -inf; a NaN propagates.

Geometry tuple ``g`` = (N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw); arrays flat.
"""
import math

from numba import cuda


@cuda.jit
def maxpool_forward_kernel(x, y, arg, g):
    """y[n, c, ho, wo] = max of the window, arg[...] = its first position. One thread per output."""
    N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw = g
    total = N * C * Ho * Wo
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        wo = idx % Wo
        t = idx // Wo
        ho = t % Ho
        nc = t // Ho
        base = nc * H * W
        best = -math.inf
        best_k = 0
        for a in range(kh):
            h = ho * sh + a - ph
            for b in range(kw):
                w = wo * sw + b - pw
                k = a * kw + b
                v = -math.inf
                if 0 <= h < H and 0 <= w < W:
                    v = x[base + h * W + w]
                if k == 0 or v > best or (v != v and best == best):   # strict: first max wins ties
                    best = v
                    best_k = k
        y[idx] = best
        arg[idx] = best_k


@cuda.jit
def maxpool_backward_kernel(dy, arg, dx, g):
    """dx[n, c, h, w] = sum of dy over the windows whose argmax is (h, w). A gather, one thread per
    input pixel: the windows holding row h are ho in [ceil((h + ph - kh + 1) / sh), (h + ph) / sh]."""
    N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw = g
    total = N * C * H * W
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        w = idx % W
        t = idx // W
        h = t % H
        nc = t // H
        acc = 0.0
        ho_lo = max(0, (h + ph - kh + sh) // sh)
        ho_hi = min(Ho - 1, (h + ph) // sh)
        wo_lo = max(0, (w + pw - kw + sw) // sw)
        wo_hi = min(Wo - 1, (w + pw) // sw)
        for ho in range(ho_lo, ho_hi + 1):
            a = h + ph - ho * sh
            for wo in range(wo_lo, wo_hi + 1):
                b = w + pw - wo * sw
                o = (nc * Ho + ho) * Wo + wo
                if arg[o] == a * kw + b:
                    acc += dy[o]
        dx[idx] = acc

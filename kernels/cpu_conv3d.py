"""Numba CPU kernels for the 3-D convolution driver of unet_np/nn/conv3d_fast.py (the numba backend)
and the 3-D max-pool. References: np_vol2col_band / np_col2vol_band in unet_np/nn/conv3d_fast.py
(which call vol2col / col2vol in unet_np/nn/conv3d_reference.py) and maxpool3d_forward / _backward in
unet_np/nn/pool.py.

Every parallel loop writes disjoint outputs and every sum runs in a fixed order, so results are
bit-identical from run to run.
"""
import numpy as np
from numba import njit, prange


@njit(inline="always")
def _inside(start, s, n_in, n_out):
    """[lo, hi): the outputs o with 0 <= o*s + start < n_in (hi >= lo)."""
    lo = 0
    if start < 0:
        lo = (-start + s - 1) // s
    hi = 0
    if n_in - 1 - start >= 0:
        hi = min(n_out, (n_in - 1 - start) // s + 1)
    if hi < lo:
        hi = lo
    return lo, hi


@njit(parallel=True, cache=True, fastmath=False)
def vol2col_band(x, n, d0, d1, kd, kh, kw, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw, out):
    """out (C*kd*kh*kw, (d1-d0)*Ho*Wo)[(c, i, j, k), (r, a, q)] =
    x_padded[n, c, (d0 + r)*sd + i*dd - pd, a*sh + j*dh - ph, q*sw + k*dw - pw] (0 in the padding)."""
    C, D, H, W = x.shape[1], x.shape[2], x.shape[3], x.shape[4]
    kk = kd * kh * kw
    plane = Ho * Wo
    for row in prange(C * kk):
        c = row // kk
        rest = row - c * kk
        i = rest // (kh * kw)
        j = (rest - i * kh * kw) // kw
        k = rest - i * kh * kw - j * kw
        off = k * dw - pw
        qlo, qhi = _inside(off, sw, W, Wo)
        for r in range(d1 - d0):
            z = (d0 + r) * sd + i * dd - pd
            for a in range(Ho):
                base = r * plane + a * Wo
                h = a * sh + j * dh - ph
                if z < 0 or z >= D or h < 0 or h >= H:
                    for q in range(Wo):
                        out[row, base + q] = 0
                    continue
                for q in range(qlo):
                    out[row, base + q] = 0
                if sw == 1:
                    for q in range(qlo, qhi):
                        out[row, base + q] = x[n, c, z, h, q + off]
                else:
                    for q in range(qlo, qhi):
                        out[row, base + q] = x[n, c, z, h, q * sw + off]
                for q in range(qhi, Wo):
                    out[row, base + q] = 0
    return out


@njit(parallel=True, cache=True, fastmath=False)
def col2vol_band(dcols, dx, n, d0, d1, kd, kh, kw, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw):
    """dx[n] += the adjoint of vol2col_band: each entry of dcols (C*kd*kh*kw, (d1-d0)*Ho*Wo) added
    onto the voxel it was copied from (entries from the padding dropped). Parallel over channels
    (each writes its own dx[n, c]); the kernel offsets are added in a fixed order."""
    C, D, H, W = dx.shape[1], dx.shape[2], dx.shape[3], dx.shape[4]
    kk = kd * kh * kw
    plane = Ho * Wo
    for c in prange(C):
        for rest in range(kk):
            row = c * kk + rest
            i = rest // (kh * kw)
            j = (rest - i * kh * kw) // kw
            k = rest - i * kh * kw - j * kw
            off = k * dw - pw
            qlo, qhi = _inside(off, sw, W, Wo)
            for r in range(d1 - d0):
                z = (d0 + r) * sd + i * dd - pd
                if z < 0 or z >= D:
                    continue
                for a in range(Ho):
                    h = a * sh + j * dh - ph
                    if h < 0 or h >= H:
                        continue
                    base = r * plane + a * Wo
                    for q in range(qlo, qhi):
                        dx[n, c, z, h, q * sw + off] += dcols[row, base + q]


@njit(inline="always")
def _nanmax(a, b):
    # np.maximum: NaN if either is NaN, else the larger
    if a != a:
        return a
    if b != b:
        return b
    return a if a >= b else b


@njit(parallel=True, cache=True, fastmath=False)
def maxpool3d_tiled_forward(x, kd, kh, kw):
    """Non-overlapping windows (stride = kernel, no padding; trailing voxels no window covers are
    dropped): x (N, C, D, H, W) -> y (N, C, D//kd, H//kh, W//kw), arg uint8 (the window offset of
    the first maximum in row-major order, as the reference's strict > compares). Parallel over
    (n, c) volumes."""
    N, C, D, H, W = x.shape
    Do, Ho, Wo = D // kd, H // kh, W // kw
    y = np.empty((N, C, Do, Ho, Wo), dtype=x.dtype)
    arg = np.empty((N, C, Do, Ho, Wo), dtype=np.uint8)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for od in range(Do):
            for oh in range(Ho):
                for ow in range(Wo):
                    best = x[n, c, od * kd, oh * kh, ow * kw]
                    where = 0
                    pos = 0
                    for i in range(kd):
                        for j in range(kh):
                            for k in range(kw):
                                if pos > 0:
                                    v = x[n, c, od * kd + i, oh * kh + j, ow * kw + k]
                                    if v > best:
                                        where = pos
                                    best = _nanmax(best, v)
                                pos += 1
                    y[n, c, od, oh, ow] = best
                    arg[n, c, od, oh, ow] = where
    return y, arg


@njit(parallel=True, cache=True, fastmath=False)
def maxpool3d_tiled_backward(dy, arg, kd, kh, kw, D, H, W):
    """dx (N, C, D, H, W): dy at each window's argmax, zero elsewhere (the dropped border too)."""
    N, C, Do, Ho, Wo = dy.shape
    dx = np.zeros((N, C, D, H, W), dtype=dy.dtype)
    for t in prange(N * C):
        n = t // C
        c = t - n * C
        for od in range(Do):
            for oh in range(Ho):
                for ow in range(Wo):
                    a = arg[n, c, od, oh, ow]
                    i = a // (kh * kw)
                    j = (a - i * kh * kw) // kw
                    k = a - i * kh * kw - j * kw
                    dx[n, c, od * kd + i, oh * kh + j, ow * kw + k] = dy[n, c, od, oh, ow]
    return dx

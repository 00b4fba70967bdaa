"""Numba CPU kernels for the convolution drivers of unet_np/nn/conv_fast.py (the numba backend).

The drivers (tiling, GEMMs) stay in conv_fast.py; these replace its element-wise NumPy helpers, which
are single-threaded and make several strided passes, with one multi-threaded pass each. Every loop
that runs in parallel writes disjoint outputs and every sum runs in a fixed order, so results are
bit-identical from run to run. Reference: the ``_np_*`` helpers in unet_np/nn/conv_fast.py.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, sh, sw, pt, pl, dh, dw, out):
    """out (nb, C*kh*kw, (r1-r0)*Wo)[b, (c, i, j), (r - r0, q)] = x_padded[n0 + b, c, r*sh + i*dh,
    q*sw + j*dw] with (pt, pl) leading zero padding (zeros where the window leaves x)."""
    N, C, H, W = x.shape
    nb = n1 - n0
    kk = kh * kw
    rows = r1 - r0
    for t in prange(nb * C * kk):
        b = t // (C * kk)
        row = t - b * C * kk
        c = row // kk
        i = (row - c * kk) // kw
        j = row - c * kk - i * kw
        # columns q with 0 <= q*sw + j*dw - pl < W: q in [qlo, qhi)
        off = j * dw - pl
        qlo = 0
        if off < 0:
            qlo = (-off + sw - 1) // sw
        qhi = 0
        if W - 1 - off >= 0:
            qhi = min(Wo, (W - 1 - off) // sw + 1)
        if qhi < qlo:
            qhi = qlo
        for r in range(rows):
            h = (r0 + r) * sh + i * dh - pt
            base = r * Wo
            if h < 0 or h >= H:
                for q in range(Wo):
                    out[b, row, base + q] = 0
                continue
            for q in range(qlo):
                out[b, row, base + q] = 0
            if sw == 1:
                for q in range(qlo, qhi):
                    out[b, row, base + q] = x[n0 + b, c, h, q + off]
            else:
                for q in range(qlo, qhi):
                    out[b, row, base + q] = x[n0 + b, c, h, q * sw + off]
            for q in range(qhi, Wo):
                out[b, row, base + q] = 0
    return out


@njit(parallel=True, cache=True, fastmath=False)
def add_bias(y3, b):
    """y3 (nb, O, P) += b (O,), in place (y3 may be a strided view)."""
    nb, O, P = y3.shape
    for t in prange(nb * O):
        n = t // O
        o = t - n * O
        v = b[o]
        for p in range(P):
            y3[n, o, p] += v


@njit(parallel=True, cache=True, fastmath=False)
def channel_sum(a):
    """(N, C, H, W) -> (C,): the sum over n, h, w, accumulated in float64 in a fixed order."""
    N, C, H, W = a.shape
    out = np.empty(C, dtype=a.dtype)
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for h in range(H):
                for w in range(W):
                    s += a[n, c, h, w]
        out[c] = s
    return out


@njit(parallel=True, cache=True, fastmath=False)
def col2im_image(dcols, dx, n, kh, kw, Ho, Wo, sh, sw, pt, pl, dh, dw):
    """dx[n] = the adjoint of im2col for one image: each entry of dcols (C*kh*kw, Ho*Wo) added onto
    the pixel it was copied from (entries from the padding are dropped). Parallel over channels:
    each channel's plane is written by one thread, offsets in a fixed order."""
    _, C, H, W = dx.shape
    kk = kh * kw
    for c in prange(C):
        for h in range(H):
            for v in range(W):
                dx[n, c, h, v] = 0
        for i in range(kh):
            for j in range(kw):
                row = c * kk + i * kw + j
                for r in range(Ho):
                    h = r * sh + i * dh - pt
                    if h < 0 or h >= H:
                        continue
                    for q in range(Wo):
                        v = q * sw + j * dw - pl
                        if v >= 0 and v < W:
                            dx[n, c, h, v] += dcols[row, r * Wo + q]


@njit(parallel=True, cache=True, fastmath=False)
def shuffle(dc, y, n0, kh, kw, b, has_bias):
    """Pixel shuffle: dc (nb, Cout*kh*kw, H*W) -> y[n0 + n, c, h*kh + i, w*kw + j] (+ b[c])."""
    nb = dc.shape[0]
    _, Cout, Hy, Wy = y.shape
    H = Hy // kh
    W = Wy // kw
    for t in prange(nb * Cout):
        n = t // Cout
        c = t - n * Cout
        bias = b[c] if has_bias else 0.0
        for h in range(H):
            for i in range(kh):
                for w in range(W):
                    for j in range(kw):
                        v = dc[n, (c * kh + i) * kw + j, h * W + w]
                        if has_bias:
                            v += bias
                        y[n0 + n, c, h * kh + i, w * kw + j] = v


@njit(parallel=True, cache=True, fastmath=False)
def unshuffle(dy, n0, n1, kh, kw, out):
    """Inverse pixel shuffle: dy[n0:n1] (nb, Cout, H*kh, W*kw) -> out (nb, Cout*kh*kw, H*W)."""
    nb = n1 - n0
    _, Cout, Hy, Wy = dy.shape
    H = Hy // kh
    W = Wy // kw
    for t in prange(nb * Cout):
        n = t // Cout
        c = t - n * Cout
        for h in range(H):
            for i in range(kh):
                for w in range(W):
                    for j in range(kw):
                        out[n, (c * kh + i) * kw + j, h * W + w] = dy[n0 + n, c, h * kh + i, w * kw + j]
    return out

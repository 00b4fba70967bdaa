"""Numba CPU kernels for the Winograd F(2x2x2, 3x3x3) convolution over volumes (the numba backend);
the driver and the derivation are in unet_np/nn/winograd3d.py, the reference is the vol2col path of
unet_np/nn/conv3d_reference.py.

F(2, 3) in 1-D: two outputs of a 3-tap correlation from a 4-sample input tile d, 4 multiplications
instead of 6:  y = A^T [(G g) * (B^T d)]  with
    B^T = [[1,  0, -1,  0],        G = [[1,    0,   0],        A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],             [1/2,  1/2, 1/2],              [0, 1, -1, -1]]
           [0, -1,  1,  0],             [1/2, -1/2, 1/2],
           [0,  1,  0, -1]]             [0,    0,   1]]
In 3-D each transform is the 1-D one applied along depth, then rows, then columns of a 4x4x4 tile:
64 products per 2x2x2 output block instead of 8 * 27 = 216 (3.4x fewer).

Layouts: a chunk is a run of whole tile slabs r0 <= r < r1, r = n * TD + td (slab td covers output
depth 2 td, 2 td + 1); the tiles of a chunk are t = (r - r0) * TH * TW + th * TW + tw, tile
(td, th, tw) covering outputs 2 td.. 2 td + 1, 2 th.. 2 th + 1, 2 tw.. 2 tw + 1 and reading the
input 4x4x4 block that starts at (2 td - pd, 2 th - ph, 2 tw - pw) (zero outside x). V (64, C, T),
M and Z (64, O, T), index 16 a + 4 b + c for the tile position (a, b, c).

Every transform runs in float64 and is rounded once when stored. Every parallel loop writes
disjoint outputs, so results are the same from run to run. Each kernel works a slab at a time in a
small scratch array and then stores it as 64 long runs (one per position), not 64 interleaved short
ones per tile.
"""
import numpy as np
from numba import njit, prange


@njit(inline="always")
def _bt(d0, d1, d2, d3):
    """B^T d for a 4-vector d."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(inline="always")
def _at(m0, m1, m2, m3):
    """A^T m for a 4-vector m: 2 values."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(inline="always")
def _a(g0, g1):
    """A g for a 2-vector g (the adjoint of _at): 4 values."""
    return g0, g0 + g1, g0 - g1, -g1


@njit(parallel=True, cache=True, fastmath=False)
def input_transform(x, r0, r1, TD, TH, TW, pd, ph, pw, V):
    """V[:, c, t] = (B^T x B^T x B^T) d for the 4x4x4 input tile d of channel c (x (N, C, D, H, W))."""
    N, C, D, H, W = x.shape
    SH, SW = 2 * TH + 2, 2 * TW + 2
    TP = TH * TW
    for c in prange(C):
        S = np.zeros((4, SH, SW), dtype=np.float64)             # 4 input planes, zero-padded
        P = np.empty((4, SH, SW), dtype=np.float64)             # B^T along depth
        Q = np.empty((4, 4, SW), dtype=np.float64)              # ... then along rows, one tile row
        L = np.empty((64, TP), dtype=V.dtype)                   # this channel's V for one slab
        lo = min(max(0, pw), SW)                                # strip columns lo..hi hold x
        hi = max(min(SW, W + pw), lo)
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            for a in range(4):
                z = 2 * td - pd + a
                for i in range(SH):
                    h = i - ph
                    if z < 0 or z >= D or h < 0 or h >= H:
                        S[a, i, :] = 0
                        continue
                    S[a, i, :lo] = 0
                    for j in range(lo, hi):
                        S[a, i, j] = x[n, c, z, h, j - pw]
                    S[a, i, hi:] = 0
            for i in range(SH):                                 # depth pass, whole planes
                for j in range(SW):
                    P[0, i, j], P[1, i, j], P[2, i, j], P[3, i, j] = _bt(
                        S[0, i, j], S[1, i, j], S[2, i, j], S[3, i, j])
            for th in range(TH):
                i = 2 * th
                for a in range(4):                              # row pass for this tile row
                    for j in range(SW):
                        Q[a, 0, j], Q[a, 1, j], Q[a, 2, j], Q[a, 3, j] = _bt(
                            P[a, i, j], P[a, i + 1, j], P[a, i + 2, j], P[a, i + 3, j])
                for a in range(4):                              # column pass, every tile of
                    for b in range(4):                          # the row (runs along tw)
                        q = 16 * a + 4 * b
                        for tw in range(TW):
                            j = 2 * tw
                            t = th * TW + tw
                            L[q, t], L[q + 1, t], L[q + 2, t], L[q + 3, t] = _bt(
                                Q[a, b, j], Q[a, b, j + 1], Q[a, b, j + 2], Q[a, b, j + 3])
            base = (r - r0) * TP
            for q in range(64):
                V[q, c, base:base + TP] = L[q]
    return V


@njit(parallel=True, cache=True, fastmath=False)
def output_transform(M, r0, r1, TD, TH, TW, b, has_bias, y):
    """y[n, o, 2 td + a, 2 th + b, 2 tw + c] = ((A^T x A^T x A^T) M[:, o, t])[a, b, c] (+ b[o]);
    outputs past y's edge are dropped. b (O,) is always given."""
    N, O, Do, Ho, Wo = y.shape
    TP = TH * TW
    for o in prange(O):
        Q = np.empty((2, 16, TP), dtype=np.float64)             # A^T along depth, one slab
        bias = np.float64(b[o]) if has_bias else 0.0
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            base = (r - r0) * TP
            for bc in range(16):                                # 4 long runs of M at a time
                for t in range(TP):
                    Q[0, bc, t], Q[1, bc, t] = _at(
                        np.float64(M[bc, o, base + t]), np.float64(M[16 + bc, o, base + t]),
                        np.float64(M[32 + bc, o, base + t]), np.float64(M[48 + bc, o, base + t]))
            for a in range(2):
                z = 2 * td + a
                if z >= Do:
                    continue
                for th in range(TH):
                    for tw in range(TW):
                        t = th * TW + tw
                        # rows: R[bb, c] = A^T along b of Q[a, 4 b + c]
                        r00, r10 = _at(Q[a, 0, t], Q[a, 4, t], Q[a, 8, t], Q[a, 12, t])
                        r01, r11 = _at(Q[a, 1, t], Q[a, 5, t], Q[a, 9, t], Q[a, 13, t])
                        r02, r12 = _at(Q[a, 2, t], Q[a, 6, t], Q[a, 10, t], Q[a, 14, t])
                        r03, r13 = _at(Q[a, 3, t], Q[a, 7, t], Q[a, 11, t], Q[a, 15, t])
                        y00, y01 = _at(r00, r01, r02, r03)
                        y10, y11 = _at(r10, r11, r12, r13)
                        h = 2 * th
                        w = 2 * tw
                        y[n, o, z, h, w] = y00 + bias
                        if w + 1 < Wo:
                            y[n, o, z, h, w + 1] = y01 + bias
                        if h + 1 < Ho:
                            y[n, o, z, h + 1, w] = y10 + bias
                            if w + 1 < Wo:
                                y[n, o, z, h + 1, w + 1] = y11 + bias
    return y


@njit(parallel=True, cache=True, fastmath=False)
def grad_transform(dy, r0, r1, TD, TH, TW, Z):
    """Z[:, o, t] = (A x A x A) dy_tile: the 2x2x2 block of dy (N, O, Do, Ho, Wo) at tile t (zero past
    the edge) spread to 4x4x4, the adjoint of output_transform. Works a tile row at a time: the
    2 x 2 x 2 TW strip of dy, A along depth, then rows, then per tile along columns."""
    N, O, Do, Ho, Wo = dy.shape
    TP = TH * TW
    SW = 2 * TW
    for o in prange(O):
        L = np.empty((64, TP), dtype=Z.dtype)
        g = np.zeros((2, 2, SW), dtype=np.float64)              # the strip of dy, zero-padded
        e = np.empty((4, 2, SW), dtype=np.float64)              # A along depth
        f = np.empty((4, 4, SW), dtype=np.float64)              # ... then along rows
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            for th in range(TH):
                for a in range(2):
                    for bb in range(2):
                        z, h = 2 * td + a, 2 * th + bb
                        if z < Do and h < Ho:
                            for w in range(Wo):
                                g[a, bb, w] = dy[n, o, z, h, w]
                            g[a, bb, Wo:] = 0.0
                        else:
                            g[a, bb, :] = 0.0
                for bb in range(2):
                    for w in range(SW):
                        e[0, bb, w], e[1, bb, w], e[2, bb, w], e[3, bb, w] = _a(g[0, bb, w],
                                                                                g[1, bb, w])
                for a in range(4):
                    for w in range(SW):
                        f[a, 0, w], f[a, 1, w], f[a, 2, w], f[a, 3, w] = _a(e[a, 0, w], e[a, 1, w])
                for a in range(4):
                    for bb in range(4):
                        q = 16 * a + 4 * bb
                        for tw in range(TW):
                            t = th * TW + tw
                            L[q, t], L[q + 1, t], L[q + 2, t], L[q + 3, t] = _a(f[a, bb, 2 * tw],
                                                                                f[a, bb, 2 * tw + 1])
            base = (r - r0) * TP
            for q in range(64):
                Z[q, o, base:base + TP] = L[q]
    return Z


@njit(inline="always")
def _g(g0, g1, g2):
    """G g for a 3-vector g: 4 values."""
    return g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2


@njit(inline="always")
def _gt(d0, d1, d2, d3):
    """G^T d for a 4-vector d (the adjoint of _g): 3 values."""
    return d0 + 0.5 * (d1 + d2), 0.5 * (d1 - d2), 0.5 * (d1 + d2) + d3


@njit(parallel=True, cache=True, fastmath=False)
def weight_transform(w, U):
    """U[16 a + 4 b + c, o, i] = (G x G x G) w[o, i] (w (O, C, 3, 3, 3), U (64, O, C)); the compiled
    version of winograd3d.weight_transform."""
    O, C = w.shape[0], w.shape[1]
    for o in prange(O):
        e = np.empty((3, 3, 4), dtype=np.float64)               # G along columns
        f = np.empty((3, 4, 4), dtype=np.float64)               # ... then along rows
        for c in range(C):
            for i in range(3):
                for j in range(3):
                    e[i, j, 0], e[i, j, 1], e[i, j, 2], e[i, j, 3] = _g(
                        np.float64(w[o, c, i, j, 0]), np.float64(w[o, c, i, j, 1]),
                        np.float64(w[o, c, i, j, 2]))
                for k in range(4):
                    f[i, 0, k], f[i, 1, k], f[i, 2, k], f[i, 3, k] = _g(e[i, 0, k], e[i, 1, k],
                                                                        e[i, 2, k])
            for b in range(4):
                for k in range(4):
                    q = 4 * b + k
                    U[q, o, c], U[16 + q, o, c], U[32 + q, o, c], U[48 + q, o, c] = _g(
                        f[0, b, k], f[1, b, k], f[2, b, k])
    return U


@njit(parallel=True, cache=True, fastmath=False)
def weight_grad_transform(dU, dw):
    """dw[o, i] = (G^T x G^T x G^T) dU[:, o, i] (dU (64, O, C), any float dtype; dw (O, C, 3, 3, 3));
    the compiled version of winograd3d.weight_grad_transform."""
    O, C = dw.shape[0], dw.shape[1]
    for o in prange(O):
        e = np.empty((4, 4, 3), dtype=np.float64)               # G^T along columns
        f = np.empty((4, 3, 3), dtype=np.float64)               # ... then along rows
        for c in range(C):
            for a in range(4):
                for b in range(4):
                    q = 16 * a + 4 * b
                    e[a, b, 0], e[a, b, 1], e[a, b, 2] = _gt(
                        np.float64(dU[q, o, c]), np.float64(dU[q + 1, o, c]),
                        np.float64(dU[q + 2, o, c]), np.float64(dU[q + 3, o, c]))
                for k in range(3):
                    f[a, 0, k], f[a, 1, k], f[a, 2, k] = _gt(e[a, 0, k], e[a, 1, k], e[a, 2, k],
                                                             e[a, 3, k])
            for j in range(3):
                for k in range(3):
                    dw[o, c, 0, j, k], dw[o, c, 1, j, k], dw[o, c, 2, j, k] = _gt(
                        f[0, j, k], f[1, j, k], f[2, j, k], f[3, j, k])
    return dw

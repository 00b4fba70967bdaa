"""Numba CPU kernels for the Winograd F(4x4, 3x3) convolution (the numba backend); the driver is
``winograd_*`` in unet_np/nn/conv_fast.py, the reference the im2col path of conv_reference.py.

F(4x4, 3x3) (Lavin & Gray 2015) computes a 4x4 block of a 3x3 stride-1 correlation from a 6x6
input tile d (neighbouring tiles overlap by 2) with 36 multiplications instead of 144:
    Y = A^T [(G g G^T) * (B^T d B)] A          (* element-wise, all 6x6 but Y 4x4, g 3x3)
with the interpolation points 0, 1, -1, 2, -2 and infinity:
    B^T = [[4,  0, -5,  0, 1, 0],         G = [[ 1/4,     0,    0],      A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],              [-1/6,  -1/6, -1/6],             [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],              [-1/6,   1/6, -1/6],             [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],              [1/24,  1/12,  1/6],             [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],              [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]              [   0,     0,    1]]
Summed over input channels, each of the 36 products becomes one GEMM (O, C) @ (C, tiles): 4x fewer
multiply-adds than im2col, and the transformed input (36 values per 16 outputs) is 2.25x the input
where F(2x2, 3x3) (16 per 4) made it 4x. Its adjoint in g gives the weight gradient from the same
input transform: dg = G^T [(A dY A^T) * (B^T d B)] G, the sum over tiles again 36 GEMMs.

Rounding: the transforms multiply by up to 8 (A) and 5 (B), so a float32 result is about 10x
further from the exact one than a direct convolution's (relative 1e-6 against 1e-7, measured on 64
channels); to keep it there every transform runs in float64 and is rounded once when stored.

Each 2-D transform is the 1-D one applied to the 6 columns, then to the 6 rows (``_bt``, ``_at``,
``_a``, ``_g``, ``_gt`` below, one line per row of the matrix).

Layouts: a chunk of whole tile rows r0 <= r < r1, r = n * TH + th, holding tiles
t = r * TW + tw - r0 * TW, tile (th, tw) covering output rows 4 th .. 4 th + 3 and columns
4 tw .. 4 tw + 3; V (36, C, (r1 - r0) TW), M and Z (36, O, (r1 - r0) TW), index 6 k + l for the
tile position (k, l). Each tile row is first copied into a small zero-padded strip, so the loop
over the tiles of a row has no bounds checks. Every parallel loop writes disjoint outputs, so
results are the same from run to run.
"""
import numpy as np
from numba import njit, prange


# -- the 1-D transforms (float64 in, float64 out) -------------------------------------------------
@njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d for a 6-vector d."""
    return (4.0 * d0 - 5.0 * d2 + d4,
            -4.0 * (d1 + d2) + d3 + d4,
            4.0 * (d1 - d2) - d3 + d4,
            2.0 * (d3 - d1) - d2 + d4,
            2.0 * (d1 - d3) - d2 + d4,
            4.0 * d1 - 5.0 * d3 + d5)


@njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m for a 6-vector m: 4 values."""
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (m0 + s12 + s34,
            d12 + 2.0 * d34,
            s12 + 4.0 * s34,
            d12 + 8.0 * d34 + m5)


@njit(inline="always")
def _a(g0, g1, g2, g3):
    """A g for a 4-vector g (the adjoint of _at): 6 values."""
    s02, s13 = g0 + g2, g1 + g3
    e02, e13 = g0 + 4.0 * g2, 2.0 * g1 + 8.0 * g3
    return (g0, s02 + s13, s02 - s13, e02 + e13, e02 - e13, g3)


_R6, _R12, _R24 = 1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0     # G's entries (products, not divisions: a
                                                        # division costs ~5x a multiplication)


@njit(inline="always")
def _g(g0, g1, g2):
    """G g for a 3-vector g: 6 values."""
    return (0.25 * g0,
            -_R6 * (g0 + g1 + g2),
            -_R6 * (g0 - g1 + g2),
            _R24 * g0 + _R12 * g1 + _R6 * g2,
            _R24 * g0 - _R12 * g1 + _R6 * g2,
            g2)


@njit(inline="always")
def _gt(d0, d1, d2, d3, d4, d5):
    """G^T d for a 6-vector d (the adjoint of _g): 3 values."""
    return (0.25 * d0 - _R6 * (d1 + d2) + _R24 * (d3 + d4),
            _R6 * (d2 - d1) + _R12 * (d3 - d4),
            _R6 * (d3 + d4 - d1 - d2) + d5)


# -- the kernels ------------------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=False)
def input_transform(x, r0, r1, TH, TW, pt, pl, V):
    """V[:, c, t] = B^T d B for the 6x6 tile of channel c at input rows 4 th - pt .. + 5 and
    columns 4 tw - pl .. + 5 (zero outside x)."""
    N, C, H, W = x.shape
    SW = 4 * TW + 2
    for c in prange(C):
        S = np.zeros((6, SW), dtype=np.float64)                 # the strip, already in float64
        P = np.empty((6, SW), dtype=np.float64)                 # B^T S: the column pass
        L = np.empty((36, (r1 - r0) * TW), dtype=V.dtype)       # this channel's V, all tile rows
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            for a in range(6):
                h = 4 * th - pt + a
                if h < 0 or h >= H:
                    S[a, :] = 0
                    continue
                lo = min(max(0, pl), SW)                        # strip columns lo..hi hold x
                hi = max(min(SW, W + pl), lo)
                S[a, :lo] = 0
                S[a, lo:hi] = x[n, c, h, lo - pl:hi - pl]
                S[a, hi:] = 0
            for j in range(SW):                                 # B^T d for every column of the strip
                P[0, j], P[1, j], P[2, j], P[3, j], P[4, j], P[5, j] = _bt(
                    S[0, j], S[1, j], S[2, j], S[3, j], S[4, j], S[5, j])
            base = (r - r0) * TW
            for k in range(6):                                  # (B^T d) B for every tile, row k
                q = 6 * k
                for tw in range(TW):
                    j = 4 * tw
                    t = base + tw
                    (L[q, t], L[q + 1, t], L[q + 2, t], L[q + 3, t], L[q + 4, t],
                     L[q + 5, t]) = _bt(P[k, j], P[k, j + 1], P[k, j + 2], P[k, j + 3],
                                        P[k, j + 4], P[k, j + 5])
        for q in range(36):                                     # one long run each, not 36 short
            V[q, c, :] = L[q]                                   # interleaved ones per tile row
    return V


@njit(parallel=True, cache=True, fastmath=False)
def output_transform(M, r0, r1, TH, TW, b, has_bias, y):
    """y[n, o, 4 th + a, 4 tw + s] = (A^T M[:, o, t] A)[a, s] (+ b[o]; b (O,) is always given);
    rows and columns past the output's edge are dropped."""
    N, O, Ho, Wo = y.shape
    T = (r1 - r0) * TW
    for o in prange(O):
        Q = np.empty((4, 6, T), dtype=np.float64)               # A^T m for every tile of the chunk
        S = np.empty((4, 4 * TW), dtype=y.dtype)                # the 4 output rows of a tile row
        bias = np.float64(b[o]) if has_bias else 0.0
        for l in range(6):                                      # A^T m, column l of every tile:
            for t in range(T):                                  # 6 long runs of M at a time (36
                                                                # short ones per tile row: 4x slower
                                                                # at 64 channels, 64x64, batch 4)
                Q[0, l, t], Q[1, l, t], Q[2, l, t], Q[3, l, t] = _at(
                    np.float64(M[l, o, t]), np.float64(M[6 + l, o, t]),
                    np.float64(M[12 + l, o, t]), np.float64(M[18 + l, o, t]),
                    np.float64(M[24 + l, o, t]), np.float64(M[30 + l, o, t]))
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            base = (r - r0) * TW
            for a in range(4):                                  # (A^T m) A, row a of every tile
                for tw in range(TW):
                    t = base + tw
                    y0, y1, y2, y3 = _at(Q[a, 0, t], Q[a, 1, t], Q[a, 2, t], Q[a, 3, t],
                                         Q[a, 4, t], Q[a, 5, t])
                    j = 4 * tw
                    S[a, j] = y0 + bias
                    S[a, j + 1] = y1 + bias
                    S[a, j + 2] = y2 + bias
                    S[a, j + 3] = y3 + bias
            for a in range(4):
                h = 4 * th + a
                if h < Ho:
                    y[n, o, h, :] = S[a, :Wo]
    return y


@njit(parallel=True, cache=True, fastmath=False)
def grad_transform(dy, r0, r1, TH, TW, Z):
    """Z[:, o, t] = A g A^T for the 4x4 block g of dy[n, o] at tile (th, tw) (zero past the
    edge): the adjoint of the output transform."""
    N, O, Ho, Wo = dy.shape
    for o in prange(O):
        S = np.zeros((4, 4 * TW), dtype=np.float64)             # the 4 rows of dy
        R = np.empty((4, 6, TW), dtype=np.float64)              # g A^T: the row pass
        L = np.empty((36, (r1 - r0) * TW), dtype=Z.dtype)       # this channel's Z, all tile rows
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            for a in range(4):
                h = 4 * th + a
                if h < Ho:
                    S[a, :Wo] = dy[n, o, h, :]
                    S[a, Wo:] = 0
                else:
                    S[a, :] = 0
            for a in range(4):                                  # g A^T, row a of every block
                for tw in range(TW):
                    j = 4 * tw
                    R[a, 0, tw], R[a, 1, tw], R[a, 2, tw], R[a, 3, tw], R[a, 4, tw], R[a, 5, tw] = _a(
                        S[a, j], S[a, j + 1], S[a, j + 2], S[a, j + 3])
            base = (r - r0) * TW
            for l in range(6):                                  # A (g A^T), column l of every block
                for tw in range(TW):
                    t = base + tw
                    (L[l, t], L[6 + l, t], L[12 + l, t], L[18 + l, t], L[24 + l, t],
                     L[30 + l, t]) = _a(R[0, l, tw], R[1, l, tw], R[2, l, tw], R[3, l, tw])
        for q in range(36):
            Z[q, o, :] = L[q]
    return Z


@njit(parallel=True, cache=True, fastmath=False)
def weight_transform(w, U):
    """U[6 k + l, o, c] = (G w[o, c] G^T)[k, l] for w (O, C, 3, 3), U (36, O, C), in float64 and
    rounded once to U's dtype. Reference: wino_weights in unet_np/nn/conv_fast.py. (The loops over c
    are innermost so that each of the 36 outputs is written as one contiguous run: 8x faster than
    36 scattered stores per (o, c).)"""
    O, C = w.shape[:2]
    for o in prange(O):
        t = np.empty((6, 3, C))
        for c in range(C):
            for j in range(3):                                  # t = G g (6x3), column by column
                t[0, j, c], t[1, j, c], t[2, j, c], t[3, j, c], t[4, j, c], t[5, j, c] = _g(
                    np.float64(w[o, c, 0, j]), np.float64(w[o, c, 1, j]), np.float64(w[o, c, 2, j]))
        for k in range(6):                                      # U = t G^T (6x6), row by row
            q = 6 * k
            for c in range(C):
                (U[q, o, c], U[q + 1, o, c], U[q + 2, o, c], U[q + 3, o, c], U[q + 4, o, c],
                 U[q + 5, o, c]) = _g(t[k, 0, c], t[k, 1, c], t[k, 2, c])
    return U


@njit(parallel=True, cache=True, fastmath=False)
def weight_grad_transform(dU, dw):
    """dw[o, c] = G^T dU[:, o, c] G (the adjoint of weight_transform) for dU (36, O, C), dw
    (O, C, 3, 3), in float64 and rounded once to dw's dtype."""
    O, C = dw.shape[:2]
    for o in prange(O):
        s = np.empty((3, 6, C))
        for l in range(6):                                      # s = G^T D (3x6), column by column
            for c in range(C):
                s[0, l, c], s[1, l, c], s[2, l, c] = _gt(
                    np.float64(dU[l, o, c]), np.float64(dU[6 + l, o, c]),
                    np.float64(dU[12 + l, o, c]), np.float64(dU[18 + l, o, c]),
                    np.float64(dU[24 + l, o, c]), np.float64(dU[30 + l, o, c]))
        for c in range(C):
            for i in range(3):                                  # dw = s G (3x3), row by row
                dw[o, c, i, 0], dw[o, c, i, 1], dw[o, c, i, 2] = _gt(
                    s[i, 0, c], s[i, 1, c], s[i, 2, c], s[i, 3, c], s[i, 4, c], s[i, 5, c])
    return dw

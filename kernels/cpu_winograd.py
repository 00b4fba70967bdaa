"""Numba CPU kernels for the Winograd F(2x2, 3x3) convolution (the numba backend); the driver is
``_winograd_*`` in unet_np/nn/conv.py, the reference the im2col path of the same file.

F(2x2, 3x3) (Lavin & Gray 2015) computes a 2x2 block of a 3x3 stride-1 correlation from a 4x4
input tile d with 16 multiplications instead of 36:  Y = A^T [(G g G^T) * (B^T d B)] A,
    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
Summed over input channels, each of the 16 products becomes one GEMM (O, C) @ (C, tiles): 2.25x
fewer multiply-adds than im2col. Its adjoint in g gives the weight gradient from the same input
transform: dg = G^T [(A dY A^T) * (B^T d B)] G, the sum over tiles again 16 GEMMs.
The transforms use only additions and subtractions (B, A) and halves (G, applied to the weights
in NumPy), so the rounding stays that of a direct convolution's order of magnitude.

Layouts: a chunk of whole tile rows r0 <= r < r1, r = n * TH + th, holding tiles
t = r * TW + tw - r0 * TW, tile (th, tw) covering output rows 2 th, 2 th + 1 and columns 2 tw,
2 tw + 1; V (16, C, (r1 - r0) TW), M and Z (16, O, (r1 - r0) TW). Each tile row is first copied
into a small zero-padded strip, so the loop over the tiles of a row has no bounds checks.
Every parallel loop writes disjoint outputs, so results are the same from run to run.
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=False)
def input_transform(x, r0, r1, TH, TW, pt, pl, V):
    """V[:, c, t] = B^T d B for the 4x4 tile of channel c at input rows 2 th - pt .. + 3 and
    columns 2 tw - pl .. + 3 (zero outside x)."""
    N, C, H, W = x.shape
    SW = 2 * TW + 2
    for c in prange(C):
        S = np.zeros((4, SW), dtype=x.dtype)
        L = np.empty((16, TW), dtype=x.dtype)
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            for a in range(4):                                  # the zero-padded strip
                h = 2 * th - pt + a
                if h < 0 or h >= H:
                    S[a, :] = 0
                    continue
                lo = min(max(0, pl), SW)                        # strip columns lo..hi hold x
                hi = max(min(SW, W + pl), lo)
                S[a, :lo] = 0
                S[a, lo:hi] = x[n, c, h, lo - pl:hi - pl]
                S[a, hi:] = 0
            base = (r - r0) * TW
            for tw in range(TW):
                j = 2 * tw
                # B^T d, column by column
                a0 = S[0, j] - S[2, j]
                a1 = S[0, j + 1] - S[2, j + 1]
                a2 = S[0, j + 2] - S[2, j + 2]
                a3 = S[0, j + 3] - S[2, j + 3]
                b0 = S[1, j] + S[2, j]
                b1 = S[1, j + 1] + S[2, j + 1]
                b2 = S[1, j + 2] + S[2, j + 2]
                b3 = S[1, j + 3] + S[2, j + 3]
                c0 = S[2, j] - S[1, j]
                c1 = S[2, j + 1] - S[1, j + 1]
                c2 = S[2, j + 2] - S[1, j + 2]
                c3 = S[2, j + 3] - S[1, j + 3]
                d0 = S[1, j] - S[3, j]
                d1 = S[1, j + 1] - S[3, j + 1]
                d2 = S[1, j + 2] - S[3, j + 2]
                d3 = S[1, j + 3] - S[3, j + 3]
                # (B^T d) B, row by row
                L[0, tw] = a0 - a2
                L[1, tw] = a1 + a2
                L[2, tw] = a2 - a1
                L[3, tw] = a1 - a3
                L[4, tw] = b0 - b2
                L[5, tw] = b1 + b2
                L[6, tw] = b2 - b1
                L[7, tw] = b1 - b3
                L[8, tw] = c0 - c2
                L[9, tw] = c1 + c2
                L[10, tw] = c2 - c1
                L[11, tw] = c1 - c3
                L[12, tw] = d0 - d2
                L[13, tw] = d1 + d2
                L[14, tw] = d2 - d1
                L[15, tw] = d1 - d3
            for q in range(16):                                 # 16 runs of TW (not 16 strided streams)
                V[q, c, base:base + TW] = L[q]
    return V


@njit(parallel=True, cache=True, fastmath=False)
def output_transform(M, r0, r1, TH, TW, b, has_bias, y):
    """y[n, o, 2 th + a, 2 tw + s] = (A^T M[:, o, t] A)[a, s] (+ b[o]; b (O,) is always given);
    rows and columns past the output's edge are dropped."""
    N, O, Ho, Wo = y.shape
    for o in prange(O):
        S = np.empty((2, 2 * TW), dtype=y.dtype)
        bias = b[o]
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            base = (r - r0) * TW
            for tw in range(TW):
                k = base + tw
                u00 = M[0, o, k] + M[4, o, k] + M[8, o, k]
                u01 = M[1, o, k] + M[5, o, k] + M[9, o, k]
                u02 = M[2, o, k] + M[6, o, k] + M[10, o, k]
                u03 = M[3, o, k] + M[7, o, k] + M[11, o, k]
                u10 = M[4, o, k] - M[8, o, k] - M[12, o, k]
                u11 = M[5, o, k] - M[9, o, k] - M[13, o, k]
                u12 = M[6, o, k] - M[10, o, k] - M[14, o, k]
                u13 = M[7, o, k] - M[11, o, k] - M[15, o, k]
                y00 = u00 + u01 + u02
                y01 = u01 - u02 - u03
                y10 = u10 + u11 + u12
                y11 = u11 - u12 - u13
                if has_bias:
                    y00 += bias
                    y01 += bias
                    y10 += bias
                    y11 += bias
                S[0, 2 * tw] = y00
                S[0, 2 * tw + 1] = y01
                S[1, 2 * tw] = y10
                S[1, 2 * tw + 1] = y11
            for a in range(2):
                h = 2 * th + a
                if h < Ho:
                    y[n, o, h, :] = S[a, :Wo]
    return y


@njit(parallel=True, cache=True, fastmath=False)
def grad_transform(dy, r0, r1, TH, TW, Z):
    """Z[:, o, t] = A g A^T for the 2x2 block g of dy[n, o] at tile (th, tw) (zero past the
    edge): the adjoint of the output transform."""
    N, O, Ho, Wo = dy.shape
    for o in prange(O):
        S = np.zeros((2, 2 * TW), dtype=dy.dtype)
        L = np.empty((16, TW), dtype=dy.dtype)
        for r in range(r0, r1):
            n = r // TH
            th = r - n * TH
            for a in range(2):
                h = 2 * th + a
                if h < Ho:
                    S[a, :Wo] = dy[n, o, h, :]
                    S[a, Wo:] = 0
                else:
                    S[a, :] = 0
            base = (r - r0) * TW
            for tw in range(TW):
                g00 = S[0, 2 * tw]
                g01 = S[0, 2 * tw + 1]
                g10 = S[1, 2 * tw]
                g11 = S[1, 2 * tw + 1]
                # p = A g (4x2): rows g0, g0 + g1, g0 - g1, -g1
                p10 = g00 + g10
                p11 = g01 + g11
                p20 = g00 - g10
                p21 = g01 - g11
                # Z = p A^T (4x4): columns p0, p0 + p1, p0 - p1, -p1
                L[0, tw] = g00
                L[1, tw] = g00 + g01
                L[2, tw] = g00 - g01
                L[3, tw] = -g01
                L[4, tw] = p10
                L[5, tw] = p10 + p11
                L[6, tw] = p10 - p11
                L[7, tw] = -p11
                L[8, tw] = p20
                L[9, tw] = p20 + p21
                L[10, tw] = p20 - p21
                L[11, tw] = -p21
                L[12, tw] = -g10
                L[13, tw] = -g10 - g11
                L[14, tw] = g11 - g10
                L[15, tw] = g11
            for q in range(16):
                Z[q, o, base:base + TW] = L[q]
    return Z


@njit(parallel=True, cache=True, fastmath=False)
def weight_transform(w, U):
    """U[4k + l, o, c] = (G w[o, c] G^T)[k, l] for w (O, C, 3, 3), U (16, O, C); the halves are
    taken in float64 and rounded once to U's dtype. Reference: _wino_weights in unet_np/nn/conv.py."""
    O, C = w.shape[:2]
    for o in prange(O):
        t = np.empty((4, 3))
        for c in range(C):
            for j in range(3):                                  # t = G g (4x3)
                g0, g1, g2 = np.float64(w[o, c, 0, j]), np.float64(w[o, c, 1, j]), np.float64(w[o, c, 2, j])
                t[0, j] = g0
                t[1, j] = 0.5 * (g0 + g1 + g2)
                t[2, j] = 0.5 * (g0 - g1 + g2)
                t[3, j] = g2
            for k in range(4):                                  # U = t G^T (4x4)
                U[4 * k, o, c] = t[k, 0]
                U[4 * k + 1, o, c] = 0.5 * (t[k, 0] + t[k, 1] + t[k, 2])
                U[4 * k + 2, o, c] = 0.5 * (t[k, 0] - t[k, 1] + t[k, 2])
                U[4 * k + 3, o, c] = t[k, 2]
    return U


@njit(parallel=True, cache=True, fastmath=False)
def weight_grad_transform(dU, dw):
    """dw[o, c] = G^T dU[:, o, c] G (the adjoint of weight_transform) for dU (16, O, C), dw
    (O, C, 3, 3), in float64 and rounded once to dw's dtype."""
    O, C = dw.shape[:2]
    for o in prange(O):
        s = np.empty((3, 4))
        for c in range(C):
            for l in range(4):                                  # s = G^T D (3x4)
                d0, d1 = np.float64(dU[l, o, c]), np.float64(dU[4 + l, o, c])
                d2, d3 = np.float64(dU[8 + l, o, c]), np.float64(dU[12 + l, o, c])
                s[0, l] = d0 + 0.5 * (d1 + d2)
                s[1, l] = 0.5 * (d1 - d2)
                s[2, l] = 0.5 * (d1 + d2) + d3
            for i in range(3):                                  # dw = s G (3x3)
                dw[o, c, i, 0] = s[i, 0] + 0.5 * (s[i, 1] + s[i, 2])
                dw[o, c, i, 1] = 0.5 * (s[i, 1] - s[i, 2])
                dw[o, c, i, 2] = 0.5 * (s[i, 1] + s[i, 2]) + s[i, 3]
    return dw

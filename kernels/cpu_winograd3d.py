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

The tile transforms (input, output, grad) compute in the array's own dtype: B and A have entries 0
and +-1 only, so a float32 tile value is a sum of at most 8 (input) or 27 (output) terms, a few ulps
from the float64 one (measured: the whole float32 convolution within 3e-7 of the float64 reference,
tests/backends/test_numba_backend.py). Computing them in float32 lets the compiler use twice as many
lanes per vector; in float64 they took 1.5-1.9x longer (one thread, 16 channels at 64^3). The weight
transforms, which have the halves of G, run in float64 and are rounded once. Every loop that writes
runs with unit stride: each tile row's columns are split into even and odd ones first, so the tile
tw's four inputs 2 tw .. 2 tw + 3 are E[tw], Od[tw], E[tw + 1], Od[tw + 1]. Every parallel loop
writes disjoint outputs, so results are the same from run to run.
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


@njit(inline="always")
def bt_rows(d0, d1, d2, d3, o0, o1, o2, o3):
    """(o0, o1, o2, o3) = B^T (d0, d1, d2, d3) element by element along four equal 1-D runs, one
    loop per output run: each loop vectorizes (one loop storing all four runs did not)."""
    for i in range(len(o0)):
        o0[i] = d0[i] - d2[i]
    for i in range(len(o0)):
        o1[i] = d1[i] + d2[i]
    for i in range(len(o0)):
        o2[i] = d2[i] - d1[i]
    for i in range(len(o0)):
        o3[i] = d1[i] - d3[i]


@njit(parallel=True, cache=True, fastmath=False)
def input_transform(x, r0, r1, TD, TH, TW, pd, ph, pw, V):
    """V[:, c, t] = (B^T x B^T x B^T) d for the 4x4x4 input tile d of channel c (x (N, C, D, H, W)).

    Per channel and slab: the 4 input planes the slab reads, zero-padded, are split into their even
    and odd columns (E, Od: (4, SH, TW + 1), column 2 u and 2 u + 1 of the padded plane), so that
    every pass below is a loop along u or tw with unit stride (what the compiler vectorizes): B^T
    along depth on whole planes, along rows per tile row, then along columns, where tile tw reads
    d0..d3 = E[tw], Od[tw], E[tw + 1], Od[tw + 1]."""
    N, C, D, H, W = x.shape
    SH, TW1 = 2 * TH + 2, TW + 1
    SW = 2 * TW1
    TP = TH * TW
    for c in prange(C):
        row = np.zeros(SW, dtype=x.dtype)                       # one padded input row
        E = np.empty((4, SH * TW1), dtype=x.dtype)              # even / odd columns of the 4 planes
        Od = np.empty((4, SH * TW1), dtype=x.dtype)
        PE = np.empty((4, SH * TW1), dtype=x.dtype)             # B^T along depth
        PO = np.empty((4, SH * TW1), dtype=x.dtype)
        QE = np.empty((16, TW1), dtype=x.dtype)                 # ... then along rows, one tile row
        QO = np.empty((16, TW1), dtype=x.dtype)
        lo = min(max(0, pw), SW)                                # row[lo:hi] holds x
        hi = max(min(SW, W + pw), lo)
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            for a in range(4):
                z = 2 * td - pd + a
                for i in range(SH):
                    h = i - ph
                    k0 = i * TW1
                    if z < 0 or z >= D or h < 0 or h >= H:
                        E[a, k0:k0 + TW1] = 0
                        Od[a, k0:k0 + TW1] = 0
                        continue
                    for j in range(lo, hi):
                        row[j] = x[n, c, z, h, j - pw]
                    for u in range(TW1):
                        E[a, k0 + u] = row[2 * u]
                        Od[a, k0 + u] = row[2 * u + 1]
            bt_rows(E[0], E[1], E[2], E[3], PE[0], PE[1], PE[2], PE[3])    # depth pass, whole
            bt_rows(Od[0], Od[1], Od[2], Od[3], PO[0], PO[1], PO[2], PO[3])  # planes
            for th in range(TH):
                k0, k1, k2, k3 = 2 * th * TW1, (2 * th + 1) * TW1, (2 * th + 2) * TW1, (2 * th + 3) * TW1
                k4 = k3 + TW1
                for a in range(4):                              # row pass for this tile row
                    bt_rows(PE[a, k0:k1], PE[a, k1:k2], PE[a, k2:k3], PE[a, k3:k4],
                            QE[4 * a], QE[4 * a + 1], QE[4 * a + 2], QE[4 * a + 3])
                    bt_rows(PO[a, k0:k1], PO[a, k1:k2], PO[a, k2:k3], PO[a, k3:k4],
                            QO[4 * a], QO[4 * a + 1], QO[4 * a + 2], QO[4 * a + 3])
                t0 = (r - r0) * TP + th * TW
                for ab in range(16):                            # column pass: tile tw reads
                    qe, qo = QE[ab], QO[ab]                     # qe[tw], qo[tw], qe[tw+1], qo[tw+1]
                    bt_rows(qe[:TW], qo[:TW], qe[1:], qo[1:],
                            V[4 * ab, c, t0:t0 + TW], V[4 * ab + 1, c, t0:t0 + TW],
                            V[4 * ab + 2, c, t0:t0 + TW], V[4 * ab + 3, c, t0:t0 + TW])
    return V


@njit(parallel=True, cache=True, fastmath=False)
def output_transform(M, r0, r1, TD, TH, TW, b, has_bias, y):
    """y[n, o, 2 td + a, 2 th + b, 2 tw + c] = ((A^T x A^T x A^T) M[:, o, t])[a, b, c] (+ b[o]);
    outputs past y's edge are dropped. b (O,) is always given.

    Per output channel and slab, in loops along the tiles t (unit stride): A^T along depth (Q, from
    four runs of M), along rows (R), then along columns, each result stored as the even and odd
    columns of two output rows."""
    N, O, Do, Ho, Wo = y.shape
    TP = TH * TW
    for o in prange(O):
        Q = np.empty((2, 16, TP), dtype=y.dtype)                # A^T along depth, one slab
        R = np.empty((2, 2, 4, TP), dtype=y.dtype)              # ... then along rows
        bias = b[o] if has_bias else y.dtype.type(0)
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            base = (r - r0) * TP
            for bc in range(16):                                # one loop per run (vectorizes)
                m0 = M[bc, o, base:base + TP]
                m1 = M[16 + bc, o, base:base + TP]
                m2 = M[32 + bc, o, base:base + TP]
                m3 = M[48 + bc, o, base:base + TP]
                q0, q1 = Q[0, bc], Q[1, bc]
                for t in range(TP):                             # _at(m0, m1, m2, m3)
                    q0[t] = m0[t] + m1[t] + m2[t]
                for t in range(TP):
                    q1[t] = m1[t] - m2[t] - m3[t]
            for a in range(2):
                for c in range(4):
                    p0, p1, p2, p3 = Q[a, c], Q[a, 4 + c], Q[a, 8 + c], Q[a, 12 + c]
                    s0, s1 = R[a, 0, c], R[a, 1, c]
                    for t in range(TP):
                        s0[t] = p0[t] + p1[t] + p2[t]
                    for t in range(TP):
                        s1[t] = p1[t] - p2[t] - p3[t]
            full = Wo // 2                                      # tiles with both columns inside y
            for a in range(2):
                z = 2 * td + a
                if z >= Do:
                    continue
                for bb in range(2):
                    g0, g1, g2, g3 = R[a, bb, 0], R[a, bb, 1], R[a, bb, 2], R[a, bb, 3]
                    for th in range(TH):
                        h = 2 * th + bb
                        if h >= Ho:
                            continue
                        t0 = th * TW
                        yr = y[n, o, z, h]
                        for tw in range(full):
                            t = t0 + tw
                            yr[2 * tw] = g0[t] + g1[t] + g2[t] + bias
                            yr[2 * tw + 1] = g1[t] - g2[t] - g3[t] + bias
                        if full < TW:                           # odd Wo: the last tile's first column
                            t = t0 + full
                            yr[2 * full] = g0[t] + g1[t] + g2[t] + bias
    return y


@njit(parallel=True, cache=True, fastmath=False)
def grad_transform(dy, r0, r1, TD, TH, TW, Z):
    """Z[:, o, t] = (A x A x A) dy_tile: the 2x2x2 block of dy (N, O, Do, Ho, Wo) at tile t (zero past
    the edge) spread to 4x4x4, the adjoint of output_transform. Per tile row: the 2 x 2 strip of dy
    split into even and odd columns (gE, gO: block column 0 and 1 of each tile), A along depth, then
    rows, then columns, every loop along tw."""
    N, O, Do, Ho, Wo = dy.shape
    TP = TH * TW
    for o in prange(O):
        gE = np.zeros((2, 2, TW), dtype=Z.dtype)
        gO = np.zeros((2, 2, TW), dtype=Z.dtype)
        eE = np.empty((4, 2, TW), dtype=Z.dtype)                # A along depth
        eO = np.empty((4, 2, TW), dtype=Z.dtype)
        fE = np.empty((16, TW), dtype=Z.dtype)                  # ... then along rows
        fO = np.empty((16, TW), dtype=Z.dtype)
        for r in range(r0, r1):
            n = r // TD
            td = r - n * TD
            for th in range(TH):
                for a in range(2):
                    for bb in range(2):
                        z, h = 2 * td + a, 2 * th + bb
                        if z < Do and h < Ho:
                            for tw in range(Wo // 2):
                                gE[a, bb, tw] = dy[n, o, z, h, 2 * tw]
                                gO[a, bb, tw] = dy[n, o, z, h, 2 * tw + 1]
                            if Wo % 2:
                                gE[a, bb, TW - 1] = dy[n, o, z, h, Wo - 1]
                                gO[a, bb, TW - 1] = 0.0
                        else:
                            gE[a, bb, :] = 0.0
                            gO[a, bb, :] = 0.0
                for bb in range(2):
                    for tw in range(TW):
                        eE[0, bb, tw], eE[1, bb, tw], eE[2, bb, tw], eE[3, bb, tw] = _a(
                            gE[0, bb, tw], gE[1, bb, tw])
                        eO[0, bb, tw], eO[1, bb, tw], eO[2, bb, tw], eO[3, bb, tw] = _a(
                            gO[0, bb, tw], gO[1, bb, tw])
                for a in range(4):
                    for tw in range(TW):
                        fE[4 * a, tw], fE[4 * a + 1, tw], fE[4 * a + 2, tw], fE[4 * a + 3, tw] = _a(
                            eE[a, 0, tw], eE[a, 1, tw])
                        fO[4 * a, tw], fO[4 * a + 1, tw], fO[4 * a + 2, tw], fO[4 * a + 3, tw] = _a(
                            eO[a, 0, tw], eO[a, 1, tw])
                t0 = (r - r0) * TP + th * TW
                for ab in range(16):                            # _a(fE, fO), one loop per run
                    fe, fo = fE[ab], fO[ab]
                    z0 = Z[4 * ab, o, t0:t0 + TW]
                    z1 = Z[4 * ab + 1, o, t0:t0 + TW]
                    z2 = Z[4 * ab + 2, o, t0:t0 + TW]
                    z3 = Z[4 * ab + 3, o, t0:t0 + TW]
                    for tw in range(TW):
                        z0[tw] = fe[tw]
                    for tw in range(TW):
                        z1[tw] = fe[tw] + fo[tw]
                    for tw in range(TW):
                        z2[tw] = fe[tw] - fo[tw]
                    for tw in range(TW):
                        z3[tw] = -fo[tw]
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

"""Winograd F(4x4, 3x3) for Numba-CUDA: the transforms as kernels, and the drivers the numba-cuda
backend calls for 3x3 stride-1 convolutions (forward, weight gradient, input gradient).

The twin of kernels/cuda/winograd.cu (the cupy backend): the same kernels, names, layouts and
formulas, to read side by side. The maths, with the matrices B^T, G, A^T, is in kernels/cpu_winograd.py
(the numba CPU backend's version; the 1-D transforms _bt, _at, _a, _g, _gt below are its formulas as
CUDA device functions). NumPy reference: unet_np/nn/conv_reference.py conv2d_forward_reference /
conv2d_backward_reference (the results), unet_np/nn/conv_fast.py wino_weights / wino_weight_grad (the
filter transforms in NumPy).

    U (36, O, C) = G g G^T          wino_filter_kernel         (flip: (36, C, O) of the flipped kernel)
    V (36, C, P) = B^T d B          wino_input_kernel          P = N * TH * TW tiles of 4x4 outputs
    M (36, O, P) = U @ V            36 GEMMs in one launch (cuda_gemm.gemm_batched, batch 36)
    y = A^T M A (+ bias, ReLU)      wino_output_kernel
    Z (36, O, P) = A dY A^T         wino_output_grad_kernel    weight gradient: dU = Z @ V^T, db = sum Z[7],
    dw = G^T dU G                   wino_filter_grad_kernel    dw from dU
    dx = the forward of dy with the kernel flipped and transposed, leading padding 2 - p.

A ReLU fused into the forward (wino_output_kernel's relu) has its backward fused here too, as in
winograd.cu: wino_input_kernel and wino_output_grad_kernel take the forward's y as a mask.

Every transform computes in float64 and rounds once when it stores (as the CPU and CUDA C versions).
Tile t = (n * TH + th) * TW + tw covers output rows 4 th .. 4 th + 3, columns 4 tw .. 4 tw + 3 and
reads input rows 4 th - pt .. + 5, columns 4 tw - pl .. + 5 (zero outside the image). Kernels take flat
arrays and walk a grid-stride loop (one thread per tile and channel, or per filter).
"""
import math

from numba import cuda, float64

from . import cuda_gemm
from .cuda_launch import grid_1d

_R6, _R12, _R24 = 1.0 / 6.0, 1.0 / 12.0, 1.0 / 24.0


# -- the 1-D transforms (float64), as kernels/cpu_winograd.py ----------------------------------------
@cuda.jit(device=True, inline=True)
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d for a 6-vector d."""
    return (4.0 * d0 - 5.0 * d2 + d4,
            -4.0 * (d1 + d2) + d3 + d4,
            4.0 * (d1 - d2) - d3 + d4,
            2.0 * (d3 - d1) - d2 + d4,
            2.0 * (d1 - d3) - d2 + d4,
            4.0 * d1 - 5.0 * d3 + d5)


@cuda.jit(device=True, inline=True)
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m for a 6-vector m: 4 values."""
    s12, d12, s34, d34 = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return (m0 + s12 + s34, d12 + 2.0 * d34, s12 + 4.0 * s34, d12 + 8.0 * d34 + m5)


@cuda.jit(device=True, inline=True)
def _a(g0, g1, g2, g3):
    """A g for a 4-vector g (the adjoint of _at): 6 values."""
    s02, s13 = g0 + g2, g1 + g3
    e02, e13 = g0 + 4.0 * g2, 2.0 * g1 + 8.0 * g3
    return (g0, s02 + s13, s02 - s13, e02 + e13, e02 - e13, g3)


@cuda.jit(device=True, inline=True)
def _g(g0, g1, g2):
    """G g for a 3-vector g: 6 values."""
    return (0.25 * g0, -_R6 * (g0 + g1 + g2), -_R6 * (g0 - g1 + g2),
            _R24 * g0 + _R12 * g1 + _R6 * g2, _R24 * g0 - _R12 * g1 + _R6 * g2, g2)


@cuda.jit(device=True, inline=True)
def _gt(d0, d1, d2, d3, d4, d5):
    """G^T d for a 6-vector d (the adjoint of _g): 3 values."""
    return (0.25 * d0 - _R6 * (d1 + d2) + _R24 * (d3 + d4),
            _R6 * (d2 - d1) + _R12 * (d3 - d4),
            _R6 * (d3 + d4 - d1 - d2) + d5)


# -- the kernels -----------------------------------------------------------------------------------
@cuda.jit
def wino_filter_kernel(w, U, O, C, flip):
    """U[6k + l, o, c] = (G w[o, c] G^T)[k, l] (36, O, C); flip: U[6k + l, c, o] from w[o, c] flipped
    in space (36, C, O). One thread per stored (o, c)."""
    OC = O * C
    t = cuda.local.array((3, 6), dtype=float64)
    for e in range(cuda.grid(1), OC, cuda.gridsize(1)):
        if flip:
            c = e // O
            o = e - c * O
        else:
            o = e // C
            c = e - o * C
        base = (o * C + c) * 9
        for j in range(3):                                       # G g: the 3 columns
            if flip:                                             # g[i, j] = w[2 - i, 2 - j]
                v = _g(float64(w[base + 8 - j]), float64(w[base + 5 - j]), float64(w[base + 2 - j]))
            else:
                v = _g(float64(w[base + j]), float64(w[base + 3 + j]), float64(w[base + 6 + j]))
            for k in range(6):
                t[j, k] = v[k]
        for k in range(6):                                       # (G g) G^T: the 6 rows
            u = _g(t[0, k], t[1, k], t[2, k])
            for l in range(6):
                U[(6 * k + l) * OC + e] = u[l]


@cuda.jit
def wino_filter_grad_kernel(dU, dw, O, C):
    """dw[o, c] = G^T dU[:, o, c] G (wino_filter_kernel's adjoint); dU (36, O, C), dw (O, C, 3, 3)."""
    OC = O * C
    t = cuda.local.array((6, 3), dtype=float64)
    for e in range(cuda.grid(1), OC, cuda.gridsize(1)):
        for l in range(6):                                       # G^T D: the 6 columns
            v = _gt(float64(dU[l * OC + e]), float64(dU[(6 + l) * OC + e]), float64(dU[(12 + l) * OC + e]),
                    float64(dU[(18 + l) * OC + e]), float64(dU[(24 + l) * OC + e]),
                    float64(dU[(30 + l) * OC + e]))
            for i in range(3):
                t[l, i] = v[i]
        for i in range(3):                                       # (G^T D) G: the 3 rows
            r = _gt(t[0, i], t[1, i], t[2, i], t[3, i], t[4, i], t[5, i])
            for j in range(3):
                dw[e * 9 + i * 3 + j] = r[j]


@cuda.jit
def wino_input_kernel(x, mask, has_mask, V, g):
    """V[6k + l, c, t] = (B^T d B)[k, l], d the 6x6 tile of channel c at rows 4 th - pt + a, columns
    4 tw - pl + b (0 outside x); g = (N, C, H, W, TH, TW, pt, pl). One thread per (c, t). has_mask: x
    is the dy of a convolution whose ReLU was fused, mask its output y: d reads x where mask > 0 and
    x * 0 elsewhere (relu_backward_kernel's formula), so the masked dy is never written."""
    N, C, H, W, TH, TW, pt, pl = g
    P = N * TH * TW
    CP = C * P
    d = cuda.local.array((6, 6), dtype=float64)
    for e in range(cuda.grid(1), CP, cuda.gridsize(1)):
        c = e // P
        t = e - c * P
        n = t // (TH * TW)
        th = (t // TW) % TH
        tw = t % TW
        h0 = 4 * th - pt
        w0 = 4 * tw - pl
        base = (n * C + c) * H * W
        for a in range(6):
            h = h0 + a
            for b in range(6):
                w = w0 + b
                if 0 <= h < H and 0 <= w < W:
                    v = x[base + h * W + w]
                    d[a, b] = float64(v if (not has_mask or mask[base + h * W + w] > 0) else v * 0)
                else:
                    d[a, b] = 0.0
        for b in range(6):                                       # B^T d: the 6 columns
            v = _bt(d[0, b], d[1, b], d[2, b], d[3, b], d[4, b], d[5, b])
            for k in range(6):
                d[k, b] = v[k]
        for k in range(6):                                       # (B^T d) B: the 6 rows
            v = _bt(d[k, 0], d[k, 1], d[k, 2], d[k, 3], d[k, 4], d[k, 5])
            for l in range(6):
                V[(6 * k + l) * CP + e] = v[l]


@cuda.jit
def wino_output_kernel(M, y, bias, has_bias, relu, g):
    """y[n, o, 4 th + i, 4 tw + j] = (A^T M[:, o, t] A)[i, j] (+ bias[o], then ReLU), inside Ho x Wo;
    g = (N, O, Ho, Wo, TH, TW). One thread per (o, t)."""
    N, O, Ho, Wo, TH, TW = g
    P = N * TH * TW
    OP = O * P
    q = cuda.local.array((6, 4), dtype=float64)
    for e in range(cuda.grid(1), OP, cuda.gridsize(1)):
        o = e // P
        t = e - o * P
        n = t // (TH * TW)
        th = (t // TW) % TH
        tw = t % TW
        for l in range(6):                                       # A^T m: the 6 columns
            v = _at(float64(M[l * OP + e]), float64(M[(6 + l) * OP + e]), float64(M[(12 + l) * OP + e]),
                    float64(M[(18 + l) * OP + e]), float64(M[(24 + l) * OP + e]), float64(M[(30 + l) * OP + e]))
            for i in range(4):
                q[l, i] = v[i]
        b = float64(bias[o]) if has_bias else 0.0
        base = (n * O + o) * Ho * Wo
        for i in range(4):                                       # (A^T m) A: the 4 rows
            h = 4 * th + i
            if h < Ho:
                r = _at(q[0, i], q[1, i], q[2, i], q[3, i], q[4, i], q[5, i])
                for j in range(4):
                    w = 4 * tw + j
                    if w < Wo:
                        v = r[j] + b
                        if relu and v < 0:
                            v = 0.0
                        y[base + h * Wo + w] = v


@cuda.jit(device=True, inline=True)
def _dy_at(dy, mask, has_mask, i, inside):
    """dy[i] (0 outside), read as dy * 1[mask > 0] when has_mask (a fused ReLU's backward)."""
    if not inside:
        return 0.0
    v = dy[i]
    return float64(v if (not has_mask or mask[i] > 0) else v * 0)


@cuda.jit
def wino_output_grad_kernel(dy, mask, has_mask, Z, g):
    """Z[6k + l, o, t] = (A dY A^T)[k, l], dY the 4x4 block of dy[n, o] of tile t (0 past Ho, Wo);
    g = (N, O, Ho, Wo, TH, TW). One thread per (o, t). has_mask: dY reads dy * 1[mask > 0]. Row 1 of
    A is all ones, so Z[7, o, t] is the block's sum (the bias gradient sums Z[7])."""
    N, O, Ho, Wo, TH, TW = g
    P = N * TH * TW
    OP = O * P
    q = cuda.local.array((4, 6), dtype=float64)
    for e in range(cuda.grid(1), OP, cuda.gridsize(1)):
        o = e // P
        t = e - o * P
        n = t // (TH * TW)
        th = (t // TW) % TH
        tw = t % TW
        base = (n * O + o) * Ho * Wo
        for j in range(4):                                       # A dY: the 4 columns
            w = 4 * tw + j
            col0 = _dy_at(dy, mask, has_mask, base + (4 * th) * Wo + w, 4 * th < Ho and w < Wo)
            col1 = _dy_at(dy, mask, has_mask, base + (4 * th + 1) * Wo + w, 4 * th + 1 < Ho and w < Wo)
            col2 = _dy_at(dy, mask, has_mask, base + (4 * th + 2) * Wo + w, 4 * th + 2 < Ho and w < Wo)
            col3 = _dy_at(dy, mask, has_mask, base + (4 * th + 3) * Wo + w, 4 * th + 3 < Ho and w < Wo)
            v = _a(col0, col1, col2, col3)
            for k in range(6):
                q[j, k] = v[k]
        for k in range(6):                                       # (A dY) A^T: the 6 rows
            z = _a(q[0, k], q[1, k], q[2, k], q[3, k])
            for l in range(6):
                Z[(6 * k + l) * OP + e] = z[l]


# -- the drivers (the numba-cuda backend's conv primitives call these) --------------------------------
MODES = ("auto", "always", "never")
MIN_CHANNELS = 16       # 'auto': Winograd from 16 input and output channels (as the other backends)


def use_winograd(mode, kh, kw, stride, dilation, C, O):
    """Whether a convolution runs as Winograd under ``mode`` ('auto', 'always', 'never')."""
    if mode not in MODES:
        raise ValueError(f"winograd must be one of {', '.join(MODES)}, got {mode!r}")
    if (kh, kw) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    return mode == "always" or (mode == "auto" and min(C, O) >= MIN_CHANNELS)


def _launch(kernel, n, *args):
    blocks, threads = grid_1d(n)
    kernel[blocks, threads](*args)


def _position_gemms(A, B, out, M, N, K, trans_b=False):
    """out[p] = A[p] @ op(B[p]) for the 36 positions: A (36, M, K), B (36, K, N) or, with trans_b,
    (36, N, K) read transposed; all flat device arrays. ONE launch of cuda_gemm.gemm_batched (batch
    36); the plain form is 36 calls of cuda_gemm.gemm on the slices [p*M*K:(p+1)*M*K], ..."""
    return cuda_gemm.gemm_batched(A, B, out, M, N, K, batch=36, trans_b=trans_b)


def filter_transform(dev, w_d, flip=False):
    """U (36, O, C) = G w G^T, or with flip (36, C, O) of the flipped kernel; flat."""
    O, C = w_d.shape[:2]
    U = dev.empty((36 * O * C,), w_d.dtype)
    _launch(wino_filter_kernel, O * C, w_d.reshape(-1), U, O, C, bool(flip))
    return U


def input_transform(dev, x_d, TH, TW, lead, mask=None):
    """V (36, C, N*TH*TW) flat; with mask (x's shape), x read as x * 1[mask > 0]."""
    N, C, H, W = x_d.shape
    V = dev.empty((36 * C * N * TH * TW,), x_d.dtype)
    xf = x_d.reshape(-1)
    _launch(wino_input_kernel, C * N * TH * TW, xf, xf if mask is None else mask.reshape(-1), mask is not None,
            V, (N, C, H, W, TH, TW, lead[0], lead[1]))
    return V


def conv(dev, x_d, U, O, b_d, Ho, Wo, lead, relu=False, mask=None):
    """y (N, O, Ho, Wo) = act(conv2d(x, w) + b), the 3x3 stride-1 kernel given as U (36, O, C) flat;
    mask: x read as x * 1[mask > 0] (the input gradient of a convolution whose ReLU was fused)."""
    N, C = x_d.shape[:2]
    TH, TW = math.ceil(Ho / 4), math.ceil(Wo / 4)
    P = N * TH * TW
    V = input_transform(dev, x_d, TH, TW, lead, mask)
    M = _position_gemms(U, V, dev.empty((36 * O * P,), x_d.dtype), O, P, C)
    del V
    y = dev.empty((N, O, Ho, Wo), x_d.dtype)
    _launch(wino_output_kernel, O * P, M, y.reshape(-1), b_d if b_d is not None else M, b_d is not None,
            bool(relu), (N, O, Ho, Wo, TH, TW))
    return y


def weight_grad(dev, x_d, dy_d, lead, mask=None):
    """(dw (O, C, 3, 3), Z7) of the 3x3 stride-1 convolution of x (leading padding ``lead``) from dy,
    read as dy * 1[mask > 0] with a mask (a fused ReLU's backward). Z7 (O * P,) flat, (O, P): the sums
    of dy's 4x4 blocks (row 1 of A is all ones), whose per-channel sums are the bias gradient."""
    N, C = x_d.shape[:2]
    _, O, Ho, Wo = dy_d.shape
    TH, TW = math.ceil(Ho / 4), math.ceil(Wo / 4)
    P = N * TH * TW
    Z = dev.empty((36 * O * P,), dy_d.dtype)
    dyf = dy_d.reshape(-1)
    _launch(wino_output_grad_kernel, O * P, dyf, dyf if mask is None else mask.reshape(-1), mask is not None,
            Z, (N, O, Ho, Wo, TH, TW))
    Z7 = Z[7 * O * P:8 * O * P]
    V = input_transform(dev, x_d, TH, TW, lead)                       # (36, C, P)
    dU = _position_gemms(Z, V, dev.empty((36 * O * C,), dy_d.dtype), O, C, P, trans_b=True)
    del Z, V
    dw = dev.empty((O, C, 3, 3), dy_d.dtype)
    _launch(wino_filter_grad_kernel, O * C, dU, dw.reshape(-1), O, C)
    return dw, Z7

"""Convolutions, the fast drivers: the same four primitives as conv_reference.py, tiled.

Read conv_reference.py first: it is the plain maths. These drivers compute the same results (the tests
compare them) while keeping the column buffer small and reusing it, with Winograd F(4x4, 3x3) for 3x3
stride-1 convolutions where a backend supplies its transforms; ``make_conv_primitives(kern)`` builds
the four primitives over a table of element-wise helpers (NumPy ones here, compiled ones in the numba
backend).
"""
import threading

import numpy as np

from . import conv_reference as ref
from .conv_reference import (col2im, conv2d_backward_reference, conv2d_forward_reference,
                             conv_output_size, conv_transpose2d_backward_reference,
                             conv_transpose2d_forward_reference, is_tiling)
from .shapes import padding_pairs, pair

# ---------------------------------------------------------------------------------------------------
# Tiled fast paths (the default primitives). The reference functions above are kept as they are and
# are what runs when ``ref.FAST_PATHS`` is False; the tests compare the two.
#
# Why tiles. A whole-batch column buffer is 9x the input (600 MB for a 128-channel 128x128 map at
# batch 8); writing it once and reading it back goes through DRAM, fresh allocations of that size
# cost page faults on every call, and keeping it for the backward makes a training step hold 9x its
# activations. Instead the output is cut into tiles (a few whole images, or a band of output rows of
# one image) whose column buffer fits ``TILE_BYTES``; for each tile the buffer is packed, used by
# one GEMM per image and packed again for the next tile. The buffer is a per-thread workspace
# reused across calls; it is never returned to a caller. The forward keeps only its input x (which
# the previous layer keeps anyway), so a step holds what PyTorch holds.
#
#   forward      y[n, :, band]  = W (O, K) @ cols_n,band (K, P)        straight into NCHW, no transpose
#   weight grad  dW^T (K, O)   += cols_n,band @ dy[n, :, band]^T        cols packed again from x
#   input grad   stride 1:   dx = conv2d(dy, w flipped and transposed, padding d(k-1) - p)
#                            (a gather: the same tiled forward, no scatter-add); used when C >= O/4
#                otherwise:  dcols_n = W^T @ dy_n, then col2im per image (cheap when C is small)
#
# The helpers that touch memory element by element (packing, bias, pixel shuffles, channel sums,
# col2im) are looked up in a kernel table, so the numba backend runs the same driver with compiled,
# multi-threaded versions (unet_np/kernels/cpu_conv.py); ``NUMPY_KERNELS`` are the NumPy ones.
# ---------------------------------------------------------------------------------------------------
TILE_BYTES = 16 << 20          # column-buffer budget of one tile
_workspaces = threading.local()


def _workspace(key, count, dtype):
    """A flat scratch array of ``count`` elements, private to the calling thread and reused across
    calls (one per key and dtype; it grows to the largest request). Never hand it to a caller.
    Two keys serve every driver, as no driver needs more at once: "cols" for a packed GEMM operand
    (im2col columns, the transposed convolution's columns, Winograd's V) and "dcols" for a GEMM
    product still to be scattered (col2im's input, Winograd's M and Z)."""
    bufs = _workspaces.__dict__.setdefault("bufs", {})
    dtype = np.dtype(dtype)
    buf = bufs.get((key, dtype))
    if buf is None or buf.size < count:
        buf = np.empty(max(count, 1), dtype=dtype)
        bufs[(key, dtype)] = buf
    return buf[:count]


def _plan(N, Ho, Wo, K, itemsize):
    """Tiles (n0, n1, r0, r1) covering N images x Ho output rows: several whole images when one
    image's column buffer (K x Ho*Wo) fits the budget, else bands of rows of one image."""
    per_row = K * Wo * itemsize
    per_image = per_row * Ho
    if per_image <= TILE_BYTES:
        nb = max(1, min(N, TILE_BYTES // per_image))
        return [(n, min(N, n + nb), 0, Ho) for n in range(0, N, nb)]
    rows = max(1, TILE_BYTES // per_row)
    bands = -(-Ho // rows)
    rows = -(-Ho // bands)                                              # even bands
    return [(n, n + 1, r, min(Ho, r + rows)) for n in range(N) for r in range(0, Ho, rows)]


# -- the NumPy element-wise helpers ----------------------------------------------------------------
def _np_im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, stride, lead, dilation, out):
    """out (nb, C*kh*kw, (r1-r0)*Wo) <- the windows of images n0..n1-1, output rows r0..r1-1:
    out[b, (c, i, j), (r - r0, wo)] = x_padded[n0 + b, c, r*sh + i*dh, wo*sw + j*dw]."""
    N, C, H, W = x.shape
    sh, sw = stride
    nb, rows = n1 - n0, r1 - r0
    o6 = out.reshape(nb, C, kh, kw, rows, Wo)
    xs = x[n0:n1]
    for i, (a0, a1, h0, _) in enumerate(ref.axis_ranges(H, Ho, kh, sh, dilation[0], lead[0])):
        lo, hi = max(a0, r0), min(a1, r1)                               # rows of this band inside x
        for j, (b0, b1, w0, w1) in enumerate(ref.axis_ranges(W, Wo, kw, sw, dilation[1], lead[1])):
            dst = o6[:, :, i, j]                                        # (nb, C, rows, Wo)
            if hi <= lo or b1 <= b0:
                dst[...] = 0
                continue
            hs = h0 + (lo - a0) * sh
            dst[:, :, lo - r0:hi - r0, b0:b1] = xs[:, :, hs:hs + (hi - lo - 1) * sh + 1:sh, w0:w1:sw]
            if lo > r0:
                dst[:, :, :lo - r0] = 0
            if hi < r1:
                dst[:, :, hi - r0:] = 0
            if b0 > 0:
                dst[:, :, lo - r0:hi - r0, :b0] = 0
            if b1 < Wo:
                dst[:, :, lo - r0:hi - r0, b1:] = 0
    return out


def _np_add_bias(y3, b):
    """y3 (nb, O, P) += b (O,) per channel, in place."""
    y3 += b.reshape(1, -1, 1)


def _np_channel_sum(a):
    """(N, C, H, W) -> (C,): the sum over n, h, w (a bias gradient)."""
    N, C, H, W = a.shape
    return a.reshape(N, C, H * W).sum(axis=2).sum(axis=0)


def _np_col2im_image(dcols, dx, n, kh, kw, Ho, Wo, stride, lead, dilation):
    """dx[n] = col2im(dcols (C*kh*kw, Ho*Wo)) for one image (written, not added)."""
    dx[n:n + 1] = col2im(dcols, (1,) + dx.shape[1:], kh, kw, Ho, Wo, stride, lead, dilation)


def _np_shuffle(dc, y, n0, kh, kw, b):
    """Pixel shuffle: dc (nb, Cout*kh*kw, H*W) -> y[n0 + b, c, h*kh + i, w*kw + j] (+ bias)."""
    nb = dc.shape[0]
    _, Cout, Hy, Wy = y.shape
    H, W = Hy // kh, Wy // kw
    dst = y[n0:n0 + nb].reshape(nb, Cout, H, kh, W, kw)
    src = dc.reshape(nb, Cout, kh, kw, H, W).transpose(0, 1, 4, 2, 5, 3)
    if b is None:
        np.copyto(dst, src)
    else:
        np.add(src, b.reshape(1, Cout, 1, 1, 1, 1), out=dst)


def _np_unshuffle(dy, n0, n1, kh, kw, out):
    """Inverse pixel shuffle: dy[n0:n1] (nb, Cout, H*kh, W*kw) -> out (nb, Cout*kh*kw, H*W)."""
    nb = n1 - n0
    _, Cout, Hy, Wy = dy.shape
    H, W = Hy // kh, Wy // kw
    src = dy[n0:n1].reshape(nb, Cout, H, kh, W, kw).transpose(0, 1, 3, 5, 2, 4)
    np.copyto(out.reshape(nb, Cout, kh, kw, H, W), src)
    return out


class ConvKernels:
    """The element-wise helpers the tiled drivers call; a backend may supply compiled ones."""

    def __init__(self, im2col_tile, add_bias, channel_sum, col2im_image, shuffle, unshuffle,
                 winograd=None):
        self.im2col_tile = im2col_tile
        self.add_bias = add_bias
        self.channel_sum = channel_sum
        self.col2im_image = col2im_image
        self.shuffle = shuffle
        self.unshuffle = unshuffle
        # None, or an object with input_transform / output_transform / grad_transform /
        # weight_transform / weight_grad_transform (the Winograd F(4x4, 3x3) transforms,
        # kernels/cpu_winograd.py) and matmul_stack(a, b, out) (np.matmul's result, for the 36
        # GEMMs): 3x3 stride-1 convolutions then run as 36 GEMMs with K = C instead of one with
        # K = 9C (4x fewer FLOPs).
        self.winograd = winograd


NUMPY_KERNELS = ConvKernels(_np_im2col_tile, _np_add_bias, _np_channel_sum, _np_col2im_image,
                            _np_shuffle, _np_unshuffle)


# -- Winograd F(4x4, 3x3) drivers (used when the kernel table has the transforms) ---------------------
# A 3x3 stride-1 convolution, output cut into 4x4 blocks ("tiles", read from 6x6 input tiles): for a
#   chunk of tiles, V (36, C, tiles) = B^T d B per 6x6 input tile,  M_k = U_k @ V_k for the 36
#   positions k, with U (36, O, C) = G g G^T per (o, c),  y = A^T M A per tile (+ bias).
# Weight gradient (the adjoint in g): Z = A dY A^T per tile, dU_k = sum over chunks Z_k @ V_k^T,
#   dg = G^T dU G. The input gradient is the same forward run on dy with the flipped, transposed
#   kernel (the gather of the tiled path). Derivation and matrices: kernels/cpu_winograd.py.
WINO_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
WINO_MIN_CHANNELS = 16         # below this the 36 GEMMs with K = C run too far from BLAS peak
WINO_MIN_PIXELS = 1024         # output pixels (all images); below this the weight transforms
                                # (36 O C values) cost more than the 4x the GEMMs save (measured,
                                # batch 1: 256 -> 128 channels on 32x32 forward 4.3 ms against 7.7
                                # for im2col; 256 -> 256 on 16x16 4.9 against 3.9)


def _wino_tiles(Ho, Wo):
    """(TH, TW): the 4x4 output blocks covering an Ho x Wo map (the last ones partial)."""
    return (Ho + 3) // 4, (Wo + 3) // 4


def winograd_ok(kern, C, O, kh, kw, stride, dilation, N, Ho, Wo):
    """Whether a convolution of C -> O channels with N x Ho x Wo outputs runs as Winograd."""
    return (ref.FAST_PATHS and kern.winograd is not None and (kh, kw) == (3, 3) and stride == (1, 1)
            and dilation == (1, 1) and min(C, O) >= WINO_MIN_CHANNELS
            and N * Ho * Wo >= WINO_MIN_PIXELS)


def wino_weights(w):
    """w (O, C, 3, 3) -> U (36, O, C) with U[6k + l, o, c] = (G w[o, c] G^T)[k, l], in float64
    and rounded once. The plain version of the kernel table's weight_transform."""
    O, C = w.shape[:2]
    t = np.tensordot(w.astype(np.float64), WINO_G, axes=([3], [1]))  # (O, C, 3, 6): w G^T
    u = np.tensordot(WINO_G, t, axes=([1], [2]))                      # (6, O, C, 6): G w G^T
    return np.ascontiguousarray(u.transpose(0, 3, 1, 2), dtype=w.dtype).reshape(36, O, C)


def wino_weight_grad(dU):
    """dU (36, O, C) -> dw (O, C, 3, 3) = G^T dU[:, o, c] G (the adjoint of wino_weights), in
    float64 and rounded once. The plain version of the kernel table's weight_grad_transform."""
    _, O, C = dU.shape
    t = np.tensordot(WINO_G, dU.astype(np.float64).reshape(6, 6, O, C), axes=([0], [0]))
    dw = np.tensordot(t, WINO_G, axes=([1], [0]))       # t (3, 6, O, C) = G^T dU; dw (3, O, C, 3)
    return np.ascontiguousarray(dw.transpose(1, 2, 0, 3), dtype=dU.dtype)


def _wino_chunks(R, TW, width, itemsize):
    """Chunks (r0, r1) of the R = N * TH tile rows whose (36, width, (r1 - r0) TW) buffers fit the
    tile budget (at least one row)."""
    rc = max(1, TILE_BYTES // (36 * width * TW * itemsize))
    return [(r0, min(R, r0 + rc)) for r0 in range(0, R, rc)]


def _winograd_conv(x, w, b, y, lead, kern):
    """y (N, O, Ho, Wo) = conv2d(x, w) + b for a 3x3 kernel, stride 1, leading padding ``lead``
    (the trailing padding follows from Ho, Wo)."""
    N, C, H, W = x.shape
    _, O, Ho, Wo = y.shape
    TH, TW = _wino_tiles(Ho, Wo)
    wg = kern.winograd
    U = wg.weight_transform(np.ascontiguousarray(w), np.empty((36, O, C), dtype=w.dtype))
    bias = np.zeros(O, dtype=y.dtype) if b is None else np.ascontiguousarray(b, dtype=y.dtype)
    for r0, r1 in _wino_chunks(N * TH, TW, max(C, O), x.itemsize):
        T = (r1 - r0) * TW
        V = _workspace("cols", 36 * C * T, x.dtype).reshape(36, C, T)
        wg.input_transform(x, r0, r1, TH, TW, lead[0], lead[1], V)
        M = _workspace("dcols", 36 * O * T, x.dtype).reshape(36, O, T)
        wg.matmul_stack(U, V, M)
        wg.output_transform(M, r0, r1, TH, TW, bias, b is not None, y)
    return y


def _winograd_weight_grad(x, dy, lead, kern):
    """dw (O, C, 3, 3) of the 3x3 stride-1 convolution of x with leading padding ``lead``."""
    N, C, H, W = x.shape
    _, O, Ho, Wo = dy.shape
    TH, TW = _wino_tiles(Ho, Wo)
    wg = kern.winograd

    def chunk_parts():                                                  # Z_k @ V_k^T per chunk
        for r0, r1 in _wino_chunks(N * TH, TW, max(C, O), x.itemsize):
            T = (r1 - r0) * TW
            V = _workspace("cols", 36 * C * T, x.dtype).reshape(36, C, T)
            wg.input_transform(x, r0, r1, TH, TW, lead[0], lead[1], V)
            Z = _workspace("dcols", 36 * O * T, x.dtype).reshape(36, O, T)
            wg.grad_transform(dy, r0, r1, TH, TW, Z)
            yield wg.matmul_stack(Z, V.transpose(0, 2, 1), np.empty((36, O, C), dtype=np.result_type(Z, V)))
    dU = _sum_in_order(chunk_parts(), (36, O, C), dy.dtype)
    return wg.weight_grad_transform(dU, np.empty((O, C, 3, 3), dtype=dy.dtype))


# -- drivers -----------------------------------------------------------------------------------------
def _side_by_side(a):
    """(nb, R, P) -> (R, nb P): a tile's images next to each other, so that one GEMM covers them all
    (a copy unless nb = 1). The other way back is .reshape(R, nb, P).transpose(1, 0, 2)."""
    nb, R, P = a.shape
    return a.transpose(1, 0, 2).reshape(R, nb * P)


def _one_gemm_per_tile(nb, M, N, P):
    """Whether one GEMM over a tile's nb images, (M, K) @ (K, nb P) or its transpose, beats nb GEMMs
    of (M, K) @ (K, P): it reads the M x K operand once instead of nb times, for the price of copying
    the nb images' operands into and out of the side-by-side layout (small maps, many channels)."""
    return nb > 1 and M * N * (nb - 1) > (M + N) * nb * P


def _sum_in_order(parts, shape, dtype):
    """Sum of the arrays in ``parts`` in a fixed order (deterministic), the first one taken as is;
    zeros of ``shape`` when there are none (an empty batch)."""
    total = None
    for part in parts:
        if total is None:
            total = part                        # (no zeroed buffer to add the first part into)
        else:
            total += part
    return np.zeros(shape, dtype=dtype) if total is None else total


def _conv_tiles(x, wm, b, y, kh, kw, stride, lead, dilation, kern):
    """y (N, O, Ho, Wo) = conv2d(x, W) + b, tile by tile. wm: (O, C*kh*kw) contiguous."""
    N, C, H, W = x.shape
    _, O, Ho, Wo = y.shape
    K = C * kh * kw
    y3 = y.reshape(N, O, Ho * Wo)
    for n0, n1, r0, r1 in _plan(N, Ho, Wo, K, x.itemsize):
        nb, P = n1 - n0, (r1 - r0) * Wo
        cols = _workspace("cols", nb * K * P, x.dtype).reshape(nb, K, P)
        kern.im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, stride, lead, dilation, cols)
        out = y3[n0:n1, :, r0 * Wo:r1 * Wo]                             # a view into y
        if _one_gemm_per_tile(nb, O, K, P):
            out[...] = np.matmul(wm, _side_by_side(cols)).reshape(O, nb, P).transpose(1, 0, 2)
        else:
            np.matmul(wm, cols, out=out)
        if b is not None:
            kern.add_bias(out, b)
    return y


def _conv_weight_grad_tiles(x, dy, kh, kw, stride, lead, dilation, kern):
    """dW (O, C*kh*kw) = sum over tiles of dy_tile @ cols_tile^T, cols packed again from x. (In
    this order the result is contiguous in W's layout: the gradient is then added into p.grad in
    one contiguous pass; a transposed dW^T made that add 4x slower than the GEMM at 1024 channels.)"""
    N, C, H, W = x.shape
    _, O, Ho, Wo = dy.shape
    K = C * kh * kw
    dy3 = dy.reshape(N, O, Ho * Wo)
    def tile_parts():
        for n0, n1, r0, r1 in _plan(N, Ho, Wo, K, x.itemsize):
            nb, P = n1 - n0, (r1 - r0) * Wo
            cols = _workspace("cols", nb * K * P, x.dtype).reshape(nb, K, P)
            kern.im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, stride, lead, dilation, cols)
            if _one_gemm_per_tile(nb, O, K, P):       # (O, nb P) @ (nb P, K): no nb (O, K) products
                yield np.matmul(_side_by_side(dy3[n0:n1]), _side_by_side(cols).T)
            else:
                for k in range(nb):
                    yield np.matmul(dy3[n0 + k, :, r0 * Wo:r1 * Wo], cols[k].T)
    return _sum_in_order(tile_parts(), (O, K), dy.dtype)


class _TiledConvCache:
    """What the tiled conv2d keeps for its backward: its input and weight (no column buffer)."""
    __slots__ = ("x", "w", "stride", "pads", "dilation", "has_bias", "kern")

    def __init__(self, x, w, stride, pads, dilation, has_bias, kern):
        self.x, self.w, self.stride, self.pads = x, w, stride, pads
        self.dilation, self.has_bias, self.kern = dilation, has_bias, kern


class _TiledConvTCache:
    """What the tiled (kernel == stride) transposed convolution keeps: x as (N, Cin, H*W) and w."""
    __slots__ = ("x3", "w", "x_shape", "has_bias", "kern")

    def __init__(self, x3, w, x_shape, has_bias, kern):
        self.x3, self.w, self.x_shape, self.has_bias, self.kern = x3, w, x_shape, has_bias, kern


def make_conv_primitives(kern=NUMPY_KERNELS):
    """The four conv primitives (same signatures as the reference ones) running the tiled drivers
    with the element-wise helpers ``kern``. Cases the tiles do not cover go to the reference."""

    def conv2d_forward(x, w, b, stride=1, padding=0, dilation=1):
        """y = conv2d(x, w) + b; see conv2d_forward_reference for shapes. Tiled when the kernel is
        larger than 1x1 (the 1x1 case is already one GEMM per image on the NCHW arrays)."""
        st, dil, pads = pair(stride), pair(dilation), padding_pairs(padding)
        O, C, kh, kw = w.shape
        if not ref.FAST_PATHS or kh * kw == 1 or x.ndim != 4 or C != x.shape[1]:
            return conv2d_forward_reference(x, w, b, stride, padding, dilation)
        N, _, H, W = x.shape
        Ho = conv_output_size(H, kh, st[0], sum(pads[0]), dil[0])
        Wo = conv_output_size(W, kw, st[1], sum(pads[1]), dil[1])
        if Ho < 1 or Wo < 1 or is_tiling(kh, kw, st, (pads[0][0], pads[1][0]), dil, H, W, Ho, Wo):
            # (kernel == stride: the reference's pixel-shuffle path is already one copy + one GEMM)
            return conv2d_forward_reference(x, w, b, stride, padding, dilation)
        x = np.ascontiguousarray(x)
        y = np.empty((N, O, Ho, Wo), dtype=x.dtype)
        if winograd_ok(kern, C, O, kh, kw, st, dil, N, Ho, Wo):
            _winograd_conv(x, w, b, y, (pads[0][0], pads[1][0]), kern)
        else:
            _conv_tiles(x, np.ascontiguousarray(w).reshape(O, C * kh * kw), b, y, kh, kw, st,
                        (pads[0][0], pads[1][0]), dil, kern)
        return y, _TiledConvCache(x, w, st, pads, dil, b is not None, kern)

    def conv2d_backward(dy, cache, input_grad=True):
        """Gradients of conv2d (see conv2d_backward_reference), from the input kept by the forward.
        input_grad=False skips dx (returned as None): for a layer whose input needs no gradient."""
        if not isinstance(cache, _TiledConvCache):
            return conv2d_backward_reference(dy, cache, input_grad=input_grad)
        x, w, st, pads, dil, kern_ = cache.x, cache.w, cache.stride, cache.pads, cache.dilation, cache.kern
        N, C, H, W = x.shape
        O, _, kh, kw = w.shape
        Ho, Wo = dy.shape[2], dy.shape[3]
        lead = (pads[0][0], pads[1][0])
        dy = np.ascontiguousarray(dy)
        db = kern_.channel_sum(dy) if cache.has_bias else None
        if winograd_ok(kern_, C, O, kh, kw, st, dil, N, Ho, Wo):
            dw = _winograd_weight_grad(x, dy, lead, kern_)
        else:
            dw = _conv_weight_grad_tiles(x, dy, kh, kw, st, lead, dil, kern_).reshape(w.shape)
        if not input_grad:
            return None, dw, db
        dx = np.empty(x.shape, dtype=dy.dtype)
        fh, fw = dil[0] * (kh - 1), dil[1] * (kw - 1)                  # the kernel's extent - 1
        # gather: worth its copy of the flipped weights only when the map is large against C (at
        # 1024 channels on 8x8, batch 1, the copy took longer than the GEMM)
        gather = (st == (1, 1) and 4 * C >= O and max(pads[0]) <= fh and max(pads[1]) <= fw
                  and N * H * W >= C)
        if gather:
            # dx[n, c, h, v] = sum_{o,i,j} w[o, c, i, j] dy[n, o, h + pt - i dh, v + pl - j dw]:
            # a correlation of dy with w flipped in space and transposed (C, O, kh, kw), padded by
            # (d(k-1) - p) on each side.
            wf = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, O, kh, kw)
            lead_f = (fh - pads[0][0], fw - pads[1][0])
            if winograd_ok(kern_, O, C, kh, kw, st, dil, N, H, W):
                _winograd_conv(dy, wf, None, dx, lead_f, kern_)
            else:
                _conv_tiles(dy, wf.reshape(C, O * kh * kw), None, dx, kh, kw, (1, 1), lead_f, dil,
                            kern_)
        else:
            # dcols (K, nb P) = W^T @ dy for nb images at a time (one GEMM reads W once), then
            # col2im image by image
            K, P = C * kh * kw, Ho * Wo
            wmt = np.ascontiguousarray(w).reshape(O, K).T               # (K, O), a view
            dy3 = dy.reshape(N, O, P)
            nb = max(1, min(N, TILE_BYTES // (K * P * dy.itemsize)))
            for n0 in range(0, N, nb):
                n1 = min(N, n0 + nb)
                a = _side_by_side(dy3[n0:n1])                                 # (a view when nb = 1)
                dcols = _workspace("dcols", K * (n1 - n0) * P, dy.dtype).reshape(K, (n1 - n0) * P)
                np.matmul(wmt, a, out=dcols)                            # (BLAS reads W transposed)
                for k in range(n1 - n0):
                    kern_.col2im_image(dcols[:, k * P:(k + 1) * P], dx, n0 + k, kh, kw, Ho, Wo, st,
                                       lead, dil)
        return dx, dw, db

    def conv_transpose2d_forward(x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
        """y = conv_transpose2d(x, w) + b (see conv_transpose2d_forward_reference). When the kernel
        equals the stride (no padding, dilation 1, no output padding; the U-Net's up-convolution)
        it is one GEMM per image and a pixel shuffle, several images per tile."""
        st, dil, pads = pair(stride), pair(dilation), padding_pairs(padding)
        Cin, Cout, kh, kw = w.shape
        if (not ref.FAST_PATHS or (kh, kw) != st or dil != (1, 1) or pads != ((0, 0), (0, 0))
                or pair(output_padding) != (0, 0) or x.ndim != 4 or x.shape[1] != Cin
                or kh * kw == 1):
            return conv_transpose2d_forward_reference(x, w, b, stride, padding, output_padding,
                                                      dilation)
        N, _, H, W = x.shape
        x3 = np.ascontiguousarray(x).reshape(N, Cin, H * W)
        # (Cout*kh*kw, Cin), a view: BLAS reads W transposed (a transposed copy of 1024x2048 weights
        # took 13 ms, against 1 ms for the GEMM on a 4x4 map)
        wmt = np.ascontiguousarray(w).reshape(Cin, Cout * kh * kw).T
        y = np.empty((N, Cout, H * kh, W * kw), dtype=x.dtype)
        K = Cout * kh * kw
        for n0, n1, _, _ in _plan(N, 1, H * W, K, x.itemsize):
            dc = _workspace("cols", (n1 - n0) * K * H * W, x.dtype).reshape(n1 - n0, K, H * W)
            np.matmul(wmt, x3[n0:n1], out=dc)
            kern.shuffle(dc, y, n0, kh, kw, b)
        return y, _TiledConvTCache(x3, w, x.shape, b is not None, kern)

    def conv_transpose2d_backward(dy, cache):
        """Gradients of the transposed convolution (see conv_transpose2d_backward_reference): per
        tile, cols = unshuffle(dy) (Cout*kh*kw, H*W) per image, dx_n = W @ cols_n,
        dW += x_n @ cols_n^T (in W's own layout, like the conv2d weight gradient)."""
        if not isinstance(cache, _TiledConvTCache):
            return conv_transpose2d_backward_reference(dy, cache)
        x3, w, kern_ = cache.x3, cache.w, cache.kern
        N, Cin, H, W = cache.x_shape
        _, Cout, kh, kw = w.shape
        K = Cout * kh * kw
        dy = np.ascontiguousarray(dy)
        wm = np.ascontiguousarray(w).reshape(Cin, K)
        dx = np.empty((N, Cin, H * W), dtype=dy.dtype)

        def tile_parts():
            for n0, n1, _, _ in _plan(N, 1, H * W, K, dy.itemsize):
                nb = n1 - n0
                cols = _workspace("cols", nb * K * H * W, dy.dtype).reshape(nb, K, H * W)
                kern_.unshuffle(dy, n0, n1, kh, kw, cols)
                np.matmul(wm, cols, out=dx[n0:n1])
                if _one_gemm_per_tile(nb, Cin, K, H * W):
                    yield np.matmul(_side_by_side(x3[n0:n1]), _side_by_side(cols).T)
                else:
                    for k in range(nb):
                        yield np.matmul(x3[n0 + k], cols[k].T)
        dw = _sum_in_order(tile_parts(), (Cin, K), dy.dtype)
        db = kern_.channel_sum(dy) if cache.has_bias else None
        return dx.reshape(N, Cin, H, W), dw.reshape(w.shape), db

    return {"conv2d_forward": conv2d_forward, "conv2d_backward": conv2d_backward,
            "conv_transpose2d_forward": conv_transpose2d_forward,
            "conv_transpose2d_backward": conv_transpose2d_backward}


_numpy_primitives = make_conv_primitives(NUMPY_KERNELS)
conv2d_forward = _numpy_primitives["conv2d_forward"]
conv2d_backward = _numpy_primitives["conv2d_backward"]
conv_transpose2d_forward = _numpy_primitives["conv_transpose2d_forward"]
conv_transpose2d_backward = _numpy_primitives["conv_transpose2d_backward"]


"""Convolutions: Conv2d and ConvTranspose2d, both as GEMMs over a column buffer.

Primitives (every backend implements the same four, with the same arguments):

    conv2d_forward(x, w, b, stride, padding, dilation)                            -> (y, cache)
    conv2d_backward(dy, cache)                                                     -> (dx, dw, db)
    conv_transpose2d_forward(x, w, b, stride, padding, output_padding, dilation)  -> (y, cache)
    conv_transpose2d_backward(dy, cache)                                           -> (dx, dw, db)

Hyper-parameters are ints or (h, w) pairs; ``padding`` may also be ((top, bottom), (left, right)).
``db`` is None when ``b`` is None. The cache is private to the backend that made it.

How it is computed. A convolution is a correlation: each output pixel is a dot product of the kernel
with one window of the (zero-padded) input. ``_im2col`` copies every window into a column buffer
``cols`` of shape (C*kh*kw, N*Ho*Wo), one slab per kernel offset (the only Python loop is over the
kh*kw offsets), and the forward is ONE GEMM for the whole batch, ``W (O, C*kh*kw) @ cols ->
(O, N*Ho*Wo)``, whose result goes to NCHW in the same pass that adds the bias. (Folding the batch into
the GEMM's columns measured faster than one GEMM per image on (N, C*kh*kw, Ho*Wo) buffers, above all
for the weight gradient, whose inner dimension becomes N*Ho*Wo; for N = 1 the two are the same.)
The padding is never materialised: each offset copies the part of its slab that lands inside the
input and writes zeros in the thin border that falls into the padding.

The backward of that GEMM gives ``dcols = W^T @ dY`` and ``dW = dY @ cols^T`` (dY: (O, N*Ho*Wo));
``_col2im`` adds the columns of ``dcols`` back onto the pixels they were copied from (the adjoint of
``_im2col``). The transposed convolution is the convolution's adjoint, so it is the same code read the
other way: its forward is ``col2im(W^T @ X)``, its input gradient is the convolution's forward
``W @ im2col(dy)`` and its weight gradient ``X @ im2col(dy)^T``.

Fast paths (switched off by setting ``_FAST_PATHS = False``, which the tests use to check them):
  * 1x1 kernel, stride 1, no padding: no column buffer at all; one GEMM per image straight on the
    NCHW arrays, ``W (O, C) @ x_n (C, H*W)``, which is NCHW out, for both layers and their backwards.
  * kernel == stride, dilation 1, no padding (the U-Net's 2x2 stride-2 up-convolution): the windows
    neither overlap nor leave gaps, so ``_im2col`` and ``_col2im`` are pure permutations (an inverse
    pixel shuffle and a pixel shuffle), each one transposing copy, the bias added in the same pass.
    The transposed convolution is then exactly one GEMM plus one pixel shuffle, and its backward one
    inverse shuffle plus the two GEMMs.

Derivations in long form: docs/backprop.md#convolution-as-correlation,
docs/backprop.md#the-input-gradient-is-a-full-convolution-with-the-flipped-kernel and
docs/backprop.md#the-transposed-convolution-is-the-convolutions-adjoint.
"""
import numbers

import numpy as np

from . import init as _init
from .module import Module, Parameter, check_input

OPS = ("conv2d_forward", "conv2d_backward", "conv_transpose2d_forward", "conv_transpose2d_backward")

# Set to False to route every call through the general im2col / col2im loops (tests compare the two).
_FAST_PATHS = True


# ---------------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------------
def _pair(v):
    """int -> (v, v); a pair passes through as a tuple of ints."""
    if isinstance(v, numbers.Integral):
        return (int(v), int(v))
    a, b = v
    return (int(a), int(b))


def _padding_pairs(p):
    """int | (ph, pw) | ((top, bottom), (left, right)) -> ((top, bottom), (left, right))."""
    if isinstance(p, numbers.Integral):
        return ((int(p), int(p)), (int(p), int(p)))
    ph, pw = p
    ph = (int(ph), int(ph)) if isinstance(ph, numbers.Integral) else (int(ph[0]), int(ph[1]))
    pw = (int(pw), int(pw)) if isinstance(pw, numbers.Integral) else (int(pw[0]), int(pw[1]))
    return (ph, pw)


def conv_output_size(size, kernel, stride, pad_total, dilation):
    """Output length of a convolution along one axis: floor((size + pads - d(k-1) - 1) / s) + 1."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size, kernel, stride, pad_total, output_padding, dilation):
    """Output length of a transposed convolution along one axis:
    (size - 1) s - pads + d(k-1) + output_padding + 1."""
    return (size - 1) * stride - pad_total + dilation * (kernel - 1) + output_padding + 1


def _ranges(n_in, n_out, k, s, d, p):
    """For each kernel offset i along one axis: (o_lo, o_hi, i_lo, i_hi).

    Output position o reads input position o*s + i*d - p. Outputs o_lo <= o < o_hi read inside the
    input, from input positions i_lo, i_lo + s, ..., below i_hi (slice ``i_lo:i_hi:s``); the others
    read the zero padding. o_hi <= o_lo when the whole slab falls into the padding.
    """
    out = []
    for i in range(k):
        start = i * d - p
        o_lo = (-start + s - 1) // s if start < 0 else 0       # smallest o with o*s + start >= 0
        o_hi = min(n_out, (n_in - 1 - start) // s + 1) if n_in - 1 - start >= 0 else 0
        if o_hi > o_lo:
            out.append((o_lo, o_hi, o_lo * s + start, (o_hi - 1) * s + start + 1))
        else:
            out.append((0, 0, 0, 0))
    return out


def _is_pointwise(kh, kw, stride, pads):
    """1x1 kernel, stride 1, no padding (pads: ((top, bottom), (left, right))): a plain GEMM per image."""
    return _FAST_PATHS and kh == 1 and kw == 1 and stride == (1, 1) and pads == ((0, 0), (0, 0))


def _is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
    """Non-overlapping, gap-free windows (kernel == stride, dilation 1, no leading padding) that stay
    inside the H x W image (no trailing padding reached): im2col is then a pure permutation of the
    image's top-left Ho*kh x Wo*kw pixels (an inverse pixel shuffle)."""
    return (_FAST_PATHS and (kh, kw) == stride and dilation == (1, 1) and pad == (0, 0)
            and Ho * kh <= H and Wo * kw <= W)


# ---------------------------------------------------------------------------------------------------
# The column buffer and its adjoint. Layout: cols (C*kh*kw, N*Ho*Wo), row (c, i, j), column (n, ho, wo).
# ---------------------------------------------------------------------------------------------------
def _channels_first(a):
    """(N, C, H, W) -> (C, N*H*W): the batch folded into the columns (a view when N == 1)."""
    N, C = a.shape[:2]
    if N == 1:
        return np.ascontiguousarray(a).reshape(C, -1)
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).reshape(C, -1)


def _batch_first(a2, N, H, W, bias=None):
    """(C, N*H*W) -> (N, C, H, W), the bias (C,) or None added in the same pass."""
    C = a2.shape[0]
    if N == 1:
        out = a2.reshape(1, C, H, W)
        if bias is not None:
            out += bias.reshape(1, C, 1, 1)
        return out
    out = np.empty((N, C, H * W), dtype=a2.dtype)
    src = a2.reshape(C, N, H * W).transpose(1, 0, 2)
    if bias is None:
        np.copyto(out, src)
    else:
        np.add(src, bias.reshape(1, C, 1), out=out)
    return out.reshape(N, C, H, W)


def _im2col(x, kh, kw, Ho, Wo, stride, pad, dilation):
    """x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), row (c, i, j) and column (n, ho, wo) holding
    x_padded[n, c, ho*sh + i*dh, wo*sw + j*dw]. pad = (top, left): only the leading padding matters.
    Zero padding is not materialised; each offset's slab gets zeros where it reads the padding."""
    N, C, H, W = x.shape
    sh, sw = stride
    cols = np.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    xt = x.transpose(1, 0, 2, 3)                                        # (C, N, H, W), a view
    if _is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
        # Inverse pixel shuffle: x[n, c, ho*kh + i, wo*kw + j] -> cols[c, i, j, n, ho, wo]; rows and
        # columns past Ho*kh, Wo*kw are read by no window. Splitting an axis of a view is a view.
        tiles = xt[:, :, :Ho * kh, :Wo * kw].reshape(C, N, Ho, kh, Wo, kw)
        np.copyto(cols, tiles.transpose(0, 3, 5, 1, 2, 4))
        return cols.reshape(C * kh * kw, N * Ho * Wo)
    rows = _ranges(H, Ho, kh, sh, dilation[0], pad[0])
    columns = _ranges(W, Wo, kw, sw, dilation[1], pad[1])
    for i, (a0, a1, h0, h1) in enumerate(rows):
        for j, (b0, b1, w0, w1) in enumerate(columns):
            dst = cols[:, i, j]                                         # (C, N, Ho, Wo), a view
            if a1 <= a0 or b1 <= b0:
                dst[...] = 0
                continue
            dst[:, :, a0:a1, b0:b1] = xt[:, :, h0:h1:sh, w0:w1:sw]
            if a0 > 0:
                dst[:, :, :a0] = 0
            if a1 < Ho:
                dst[:, :, a1:] = 0
            if b0 > 0:
                dst[:, :, a0:a1, :b0] = 0
            if b1 < Wo:
                dst[:, :, a0:a1, b1:] = 0
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def _col2im(dcols, shape, kh, kw, Ho, Wo, stride, pad, dilation, bias=None):
    """The adjoint of ``_im2col``: dcols (C*kh*kw, N*Ho*Wo) -> out (N, C, H, W) = shape, each column
    entry added onto the pixel it was copied from (entries that came from the padding are dropped).
    bias (C,) or None is added to every pixel, in the same pass where possible."""
    N, C, H, W = shape
    sh, sw = stride
    d6 = dcols.reshape(C, kh, kw, N, Ho, Wo)
    if _is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
        # Pixel shuffle: d6[c, i, j, n, ho, wo] -> out[n, c, ho*kh + i, wo*kw + j], bias in the same
        # pass; rows and columns past Ho*kh, Wo*kw (no window reaches them) get 0 or the bias.
        out = np.empty(shape, dtype=dcols.dtype)
        s0, s1, s2, s3 = out.strides
        tiles = np.lib.stride_tricks.as_strided(out, shape=(N, C, Ho, kh, Wo, kw),
                                                strides=(s0, s1, kh * s2, s2, kw * s3, s3))
        src = d6.transpose(3, 0, 4, 1, 5, 2)
        if bias is None:
            np.copyto(tiles, src)
        else:
            np.add(src, bias.reshape(1, C, 1, 1, 1, 1), out=tiles)
        fill = 0 if bias is None else bias.reshape(1, C, 1, 1)
        if Ho * kh < H:
            out[:, :, Ho * kh:] = fill
        if Wo * kw < W:
            out[:, :, :Ho * kh, Wo * kw:] = fill
        return out
    rows = _ranges(H, Ho, kh, sh, dilation[0], pad[0])
    columns = _ranges(W, Wo, kw, sw, dilation[1], pad[1])
    # With stride 1 some offset usually covers every pixel (3x3 pad 1: the centre): write that one
    # first into an uninitialised buffer, so no separate pass zeroes it.
    first = None
    if stride == (1, 1):
        for i, r in enumerate(rows):
            for j, c in enumerate(columns):
                if first is None and r[2] == 0 and r[3] == H and c[2] == 0 and c[3] == W:
                    first = (i, j)
    if first is not None:
        i, j = first
        a0, a1, _, _ = rows[i]
        b0, b1, _, _ = columns[j]
        out = np.empty(shape, dtype=dcols.dtype)
        src = d6[:, i, j, :, a0:a1, b0:b1].transpose(1, 0, 2, 3)
        if bias is None:
            np.copyto(out, src)
        else:
            np.add(src, bias.reshape(1, C, 1, 1), out=out)
    else:
        out = np.zeros(shape, dtype=dcols.dtype)
    outt = out.transpose(1, 0, 2, 3)                                    # (C, N, H, W), a view
    for i, (a0, a1, h0, h1) in enumerate(rows):
        for j, (b0, b1, w0, w1) in enumerate(columns):
            if (i, j) == first or a1 <= a0 or b1 <= b0:
                continue
            outt[:, :, h0:h1:sh, w0:w1:sw] += d6[:, i, j, :, a0:a1, b0:b1]
    if first is None and bias is not None:
        out += bias.reshape(1, C, 1, 1)
    return out


def _weight_grad(a2, cols):
    """a2 @ cols^T.   a2 (P, M), cols (K, M) -> (P, K) (M = N*Ho*Wo, the long inner dimension).
    Computed as (cols @ a2^T)^T, the operand order OpenBLAS ran fastest here."""
    return np.matmul(cols, a2.T).T


def _weight_grad_per_image(a3, b3):
    """sum_n a3_n @ b3_n^T.   a3 (N, P, L), b3 (N, K, L) -> (P, K), for the 1x1 path on NCHW arrays."""
    g = np.matmul(b3, a3.transpose(0, 2, 1))                            # (N, K, P)
    g = g[0] if g.shape[0] == 1 else g.sum(axis=0)
    return g.T


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------
def conv2d_forward_reference(x, w, b, stride=1, padding=0, dilation=1):
    """y = conv2d(x, w) + b (a cross-correlation, as PyTorch's).

    x: (N, C, H, W), w: (O, C, kh, kw), b: (O,) or None; stride, dilation: int or (h, w);
    padding: int, (ph, pw) or ((top, bottom), (left, right)).
    y: (N, O, Ho, Wo), Ho = floor((H + top + bottom - dh (kh - 1) - 1) / sh) + 1 (likewise Wo).
    y[n, o, ho, wo] = b[o] + sum_{c,i,j} w[o, c, i, j] x_padded[n, c, ho*sh + i*dh, wo*sw + j*dw],
    i.e. Y (O, N*Ho*Wo) = W (O, C*kh*kw) @ cols (C*kh*kw, N*Ho*Wo).
    cache: (cols, or x itself on the 1x1 path; w; x.shape; hyper-parameters; whether there is a bias).
    """
    stride, dilation, pads = _pair(stride), _pair(dilation), _padding_pairs(padding)
    N, C, H, W = x.shape
    O, C2, kh, kw = w.shape
    if C2 != C:
        raise ValueError(f"conv2d_forward: weight expects {C2} input channels, got {C}")
    Ho = conv_output_size(H, kh, stride[0], sum(pads[0]), dilation[0])
    Wo = conv_output_size(W, kw, stride[1], sum(pads[1]), dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv2d_forward: kernel {kh}x{kw} (dilation {dilation}) is larger than the "
                         f"padded input {H + sum(pads[0])}x{W + sum(pads[1])}")
    lead = (pads[0][0], pads[1][0])
    wm = w.reshape(O, C * kh * kw)
    if _is_pointwise(kh, kw, stride, pads):
        x3 = np.ascontiguousarray(x).reshape(N, C, H * W)
        y = np.matmul(wm, x3)                                           # (N, O, H*W), NCHW
        if b is not None:
            y += b.reshape(1, O, 1)
        return y.reshape(N, O, H, W), (x3, w, x.shape, stride, lead, dilation, b is not None)
    cols = _im2col(x, kh, kw, Ho, Wo, stride, lead, dilation)           # (C*kh*kw, N*Ho*Wo)
    y = _batch_first(np.matmul(wm, cols), N, Ho, Wo, bias=b)           # (O, N*Ho*Wo) -> NCHW
    return y, (cols, w, x.shape, stride, lead, dilation, b is not None)


def conv2d_backward_reference(dy, cache, input_grad=True):
    """Gradients of y = conv2d(x, w) + b (dx is None when input_grad is False).

    dy: (N, O, Ho, Wo) -> dx: (N, C, H, W), dw: (O, C, kh, kw), db: (O,) or None.
    With Y = W @ cols (W: (O, C*kh*kw), cols: (C*kh*kw, N*Ho*Wo), dY = dy as (O, N*Ho*Wo)):
      dW = dY @ cols^T,   db = dY summed over its columns,   dcols = W^T @ dY,
    and dx = col2im(dcols): each column entry goes back to the pixel it was copied from, which
    amounts to a full correlation of dy with the flipped kernel
    (docs/backprop.md#convolution-as-correlation,
    docs/backprop.md#the-input-gradient-is-a-full-convolution-with-the-flipped-kernel).
    """
    cols, w, x_shape, stride, lead, dilation, has_bias = cache
    N, C, H, W = x_shape
    O, _, kh, kw = w.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    wm = w.reshape(O, C * kh * kw)
    if cols.ndim == 3:                                                  # the 1x1 path: cols is x (N, C, H*W)
        dy3 = np.ascontiguousarray(dy).reshape(N, O, Ho * Wo)
        db = dy3.sum(axis=2).sum(axis=0) if has_bias else None
        dw = _weight_grad_per_image(dy3, cols).reshape(w.shape)
        dx = np.matmul(wm.T, dy3).reshape(N, C, H, W) if input_grad else None
        return dx, dw, db
    dy2 = _channels_first(dy)                                           # (O, N*Ho*Wo)
    db = dy2.sum(axis=1) if has_bias else None
    dw = _weight_grad(dy2, cols).reshape(w.shape)
    if not input_grad:
        return None, dw, db
    dcols = np.matmul(wm.T, dy2)                                        # (C*kh*kw, N*Ho*Wo)
    dx = _col2im(dcols, x_shape, kh, kw, Ho, Wo, stride, lead, dilation)
    return dx, dw, db


def conv_transpose2d_forward_reference(x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
    """y = conv_transpose2d(x, w) + b: the adjoint of conv2d with the same w and hyper-parameters.

    x: (N, Cin, H, W), w: (Cin, Cout, kh, kw) (PyTorch's layout), b: (Cout,) or None.
    y: (N, Cout, Hy, Wy), Hy = (H - 1) sh - top - bottom + dh (kh - 1) + output_padding_h + 1.
    Seen as conv2d's input gradient, with w read as a conv2d weight (O = Cin, C = Cout):
      y = col2im(W^T @ X),  W = w as (Cin, Cout*kh*kw), X = x as (Cin, N*H*W): one GEMM, then each
    column added onto the output pixels it belongs to
    (docs/backprop.md#the-transposed-convolution-is-the-convolutions-adjoint).
    cache: (x as (Cin, N*H*W), or (N, Cin, H*W) on the 1x1 path; w; hyper-parameters; bias or not).
    """
    stride, dilation, pads = _pair(stride), _pair(dilation), _padding_pairs(padding)
    output_padding = _pair(output_padding)
    N, Cin, H, W = x.shape
    Cin2, Cout, kh, kw = w.shape
    if Cin2 != Cin:
        raise ValueError(f"conv_transpose2d_forward: weight expects {Cin2} input channels, got {Cin}")
    Hy = conv_transpose_output_size(H, kh, stride[0], sum(pads[0]), output_padding[0], dilation[0])
    Wy = conv_transpose_output_size(W, kw, stride[1], sum(pads[1]), output_padding[1], dilation[1])
    if Hy < 1 or Wy < 1:
        raise ValueError(f"conv_transpose2d_forward: the output would be {Hy}x{Wy}; the padding "
                         f"{pads} removes more than the {Hy + sum(pads[0])}x{Wy + sum(pads[1])} "
                         f"full output")
    lead = (pads[0][0], pads[1][0])
    wmt = w.reshape(Cin, Cout * kh * kw).T                              # (Cout*kh*kw, Cin)
    if _is_pointwise(kh, kw, stride, pads) and (Hy, Wy) == (H, W):
        x3 = np.ascontiguousarray(x).reshape(N, Cin, H * W)
        y = np.matmul(wmt, x3)                                          # (N, Cout, H*W), NCHW
        if b is not None:
            y += b.reshape(1, Cout, 1)
        return y.reshape(N, Cout, H, W), (x3, w, x.shape, stride, lead, dilation, b is not None)
    x2 = _channels_first(x)                                             # (Cin, N*H*W)
    dcols = np.matmul(wmt, x2)                                          # (Cout*kh*kw, N*H*W)
    y = _col2im(dcols, (N, Cout, Hy, Wy), kh, kw, H, W, stride, lead, dilation, bias=b)
    return y, (x2, w, x.shape, stride, lead, dilation, b is not None)


def conv_transpose2d_backward_reference(dy, cache):
    """Gradients of y = conv_transpose2d(x, w) + b.

    dy: (N, Cout, Hy, Wy) -> dx: (N, Cin, H, W), dw: (Cin, Cout, kh, kw), db: (Cout,) or None.
    The forward is Y = col2im(W^T @ X); col2im's adjoint is im2col, so with cols = im2col(dy)
    (Cout*kh*kw, N*H*W):  dX = W @ cols (a conv2d forward of dy with w),  dW = X @ cols^T,
    db = dy summed over n, h, w.
    """
    xs, w, x_shape, stride, lead, dilation, has_bias = cache
    N, Cin, H, W = x_shape
    _, Cout, kh, kw = w.shape
    wm = w.reshape(Cin, Cout * kh * kw)
    if xs.ndim == 3:                                                    # the 1x1 path: xs is x (N, Cin, H*W)
        dy3 = np.ascontiguousarray(dy).reshape(N, Cout, H * W)
        dx = np.matmul(wm, dy3).reshape(N, Cin, H, W)
        dw = _weight_grad_per_image(xs, dy3).reshape(w.shape)
        db = dy3.sum(axis=2).sum(axis=0) if has_bias else None
        return dx, dw, db
    cols = _im2col(dy, kh, kw, H, W, stride, lead, dilation)            # (Cout*kh*kw, N*H*W)
    dx = _batch_first(np.matmul(wm, cols), N, H, W)                     # (Cin, N*H*W) -> NCHW
    dw = _weight_grad(xs, cols).reshape(w.shape)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db

# ---------------------------------------------------------------------------------------------------
# Tiled fast paths (the default primitives). The reference functions above are kept as they are and
# are what runs when ``_FAST_PATHS`` is False; the tests compare the two.
#
# Why tiles. A whole-batch column buffer is 9x the input (600 MB for a 128-channel 128x128 map at
# batch 8); writing it once and reading it back goes through DRAM, fresh allocations of that size
# cost page faults on every call, and keeping it for the backward makes a training step hold 9x its
# activations. Instead the output is cut into tiles (a few whole images, or a band of output rows of
# one image) whose column buffer fits ``_TILE_BYTES``; for each tile the buffer is packed, used by
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
import threading

_TILE_BYTES = 16 << 20          # column-buffer budget of one tile
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
    if per_image <= _TILE_BYTES:
        nb = max(1, min(N, _TILE_BYTES // per_image))
        return [(n, min(N, n + nb), 0, Ho) for n in range(0, N, nb)]
    rows = max(1, _TILE_BYTES // per_row)
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
    for i, (a0, a1, h0, _) in enumerate(_ranges(H, Ho, kh, sh, dilation[0], lead[0])):
        lo, hi = max(a0, r0), min(a1, r1)                               # rows of this band inside x
        for j, (b0, b1, w0, w1) in enumerate(_ranges(W, Wo, kw, sw, dilation[1], lead[1])):
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
    dx[n:n + 1] = _col2im(dcols, (1,) + dx.shape[1:], kh, kw, Ho, Wo, stride, lead, dilation)


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
_WINO_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                    [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
_WINO_MIN_CHANNELS = 16         # below this the 36 GEMMs with K = C run too far from BLAS peak
_WINO_MIN_PIXELS = 1024         # output pixels (all images); below this the weight transforms
                                # (36 O C values) cost more than the 4x the GEMMs save (measured,
                                # batch 1: 256 -> 128 channels on 32x32 forward 4.3 ms against 7.7
                                # for im2col; 256 -> 256 on 16x16 4.9 against 3.9)


def _wino_tiles(Ho, Wo):
    """(TH, TW): the 4x4 output blocks covering an Ho x Wo map (the last ones partial)."""
    return (Ho + 3) // 4, (Wo + 3) // 4


def _winograd_ok(kern, C, O, kh, kw, stride, dilation, N, Ho, Wo):
    """Whether a convolution of C -> O channels with N x Ho x Wo outputs runs as Winograd."""
    return (_FAST_PATHS and kern.winograd is not None and (kh, kw) == (3, 3) and stride == (1, 1)
            and dilation == (1, 1) and min(C, O) >= _WINO_MIN_CHANNELS
            and N * Ho * Wo >= _WINO_MIN_PIXELS)


def _wino_weights(w):
    """w (O, C, 3, 3) -> U (36, O, C) with U[6k + l, o, c] = (G w[o, c] G^T)[k, l], in float64
    and rounded once. The plain version of the kernel table's weight_transform."""
    O, C = w.shape[:2]
    t = np.tensordot(w.astype(np.float64), _WINO_G, axes=([3], [1]))  # (O, C, 3, 6): w G^T
    u = np.tensordot(_WINO_G, t, axes=([1], [2]))                      # (6, O, C, 6): G w G^T
    return np.ascontiguousarray(u.transpose(0, 3, 1, 2), dtype=w.dtype).reshape(36, O, C)


def _wino_weight_grad(dU):
    """dU (36, O, C) -> dw (O, C, 3, 3) = G^T dU[:, o, c] G (the adjoint of _wino_weights), in
    float64 and rounded once. The plain version of the kernel table's weight_grad_transform."""
    _, O, C = dU.shape
    t = np.tensordot(_WINO_G, dU.astype(np.float64).reshape(6, 6, O, C), axes=([0], [0]))
    dw = np.tensordot(t, _WINO_G, axes=([1], [0]))       # t (3, 6, O, C) = G^T dU; dw (3, O, C, 3)
    return np.ascontiguousarray(dw.transpose(1, 2, 0, 3), dtype=dU.dtype)


def _wino_chunks(R, TW, width, itemsize):
    """Chunks (r0, r1) of the R = N * TH tile rows whose (36, width, (r1 - r0) TW) buffers fit the
    tile budget (at least one row)."""
    rc = max(1, _TILE_BYTES // (36 * width * TW * itemsize))
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
        st, dil, pads = _pair(stride), _pair(dilation), _padding_pairs(padding)
        O, C, kh, kw = w.shape
        if not _FAST_PATHS or kh * kw == 1 or x.ndim != 4 or C != x.shape[1]:
            return conv2d_forward_reference(x, w, b, stride, padding, dilation)
        N, _, H, W = x.shape
        Ho = conv_output_size(H, kh, st[0], sum(pads[0]), dil[0])
        Wo = conv_output_size(W, kw, st[1], sum(pads[1]), dil[1])
        if Ho < 1 or Wo < 1 or _is_tiling(kh, kw, st, (pads[0][0], pads[1][0]), dil, H, W, Ho, Wo):
            # (kernel == stride: the reference's pixel-shuffle path is already one copy + one GEMM)
            return conv2d_forward_reference(x, w, b, stride, padding, dilation)
        x = np.ascontiguousarray(x)
        y = np.empty((N, O, Ho, Wo), dtype=x.dtype)
        if _winograd_ok(kern, C, O, kh, kw, st, dil, N, Ho, Wo):
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
        if _winograd_ok(kern_, C, O, kh, kw, st, dil, N, Ho, Wo):
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
            if _winograd_ok(kern_, O, C, kh, kw, st, dil, N, H, W):
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
            nb = max(1, min(N, _TILE_BYTES // (K * P * dy.itemsize)))
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
        st, dil, pads = _pair(stride), _pair(dilation), _padding_pairs(padding)
        Cin, Cout, kh, kw = w.shape
        if (not _FAST_PATHS or (kh, kw) != st or dil != (1, 1) or pads != ((0, 0), (0, 0))
                or _pair(output_padding) != (0, 0) or x.ndim != 4 or x.shape[1] != Cin
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


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------
def _check_int(layer, name, v, minimum):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{layer}: {name} must be an int, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {v}")
    return int(v)


def _check_pair(layer, name, v, minimum):
    """An int or a pair of ints, each >= minimum -> (h, w)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{layer}: {name} must be an int or a pair (h, w), got {v!r}")
        return (_check_int(layer, name, v[0], minimum), _check_int(layer, name, v[1], minimum))
    v = _check_int(layer, name, v, minimum)
    return (v, v)


def _check_init(layer, init):
    if init not in (None, "torch", "he"):
        raise ValueError(f"{layer}: init must be 'torch' or 'he', got {init!r}")


def _check_dy(layer, dy, shape, xp, dtype):
    if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
        raise TypeError(f"{layer}.backward: expected an array of shape {shape}, got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(shape):
        raise ValueError(f"{layer}.backward: expected a gradient of shape {tuple(shape)} (the "
                         f"forward's output), got {tuple(dy.shape)}")
    return xp.asarray(dy, dtype=dtype)


def _set_parameters(layer, w, b):
    """weight (and bias, or None) as Parameters on the layer's backend."""
    layer.weight = Parameter(layer.backend.asarray(w))
    layer.bias = Parameter(layer.backend.asarray(b)) if b is not None else None


def _add_grads(layer, dw, db):
    """Accumulate the parameter gradients of one backward into .grad (handing dw and db over)."""
    layer.weight.add_grad(dw)
    if layer.bias is not None:
        layer.bias.add_grad(db)


class Conv2d(Module):
    """2-D convolution (cross-correlation, as PyTorch's) over NCHW input.

    padding: an int, a pair (ph, pw), 'valid' (no padding) or 'same' (output as large as the input;
    stride 1 only; when the total padding d (k - 1) is odd the extra row/column goes on the
    bottom/right, as in PyTorch). weight: (out_channels, in_channels, kh, kw), bias: (out_channels,).
    init: 'torch' (PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias) or 'he'
    (He-normal weight, std sqrt(2 / fan_in), zero bias); fan_in = in_channels * kh * kw.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        name = "Conv2d"
        self.in_channels = _check_int(name, "in_channels", in_channels, 1)
        self.out_channels = _check_int(name, "out_channels", out_channels, 1)
        self.kernel_size = _check_pair(name, "kernel_size", kernel_size, 1)
        self.stride = _check_pair(name, "stride", stride, 1)
        self.dilation = _check_pair(name, "dilation", dilation, 1)
        _check_init(name, init)
        if isinstance(padding, str):
            if padding == "valid":
                pads = ((0, 0), (0, 0))
            elif padding == "same":
                if self.stride != (1, 1):
                    raise ValueError(f"{name}: padding='same' needs stride 1, got stride {self.stride}")
                pads = []
                for k, d in zip(self.kernel_size, self.dilation):
                    total = d * (k - 1)
                    pads.append((total // 2, total - total // 2))
                pads = tuple(pads)
            else:
                raise ValueError(f"{name}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        else:
            ph, pw = _check_pair(name, "padding", padding, 0)
            pads = ((ph, ph), (pw, pw))
        self.padding = padding if isinstance(padding, str) else (pads[0][0], pads[1][0])
        self._pads = pads
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        w, b = _init.init_weight_and_bias((self.out_channels, self.in_channels, kh, kw),
                                          self.out_channels if bias else None, fan_in, init, self.dtype)
        _set_parameters(self, w, b)

    def output_shape(self, input_shape):
        """(N, out_channels, Ho, Wo) for an input of shape (N, C, H, W); ValueError when the kernel
        does not fit in the padded input."""
        N, _, H, W = input_shape
        (kh, kw), (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = (self.kernel_size, self.stride,
                                                              self.dilation, self._pads)
        eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        if eh > H + pt + pb or ew > W + pl + pr:
            raise ValueError(
                f"Conv2d: the kernel spans {eh}x{ew} pixels (kernel {kh}x{kw}, dilation {dh}x{dw}), "
                f"larger than the padded input {H + pt + pb}x{W + pl + pr} (input {H}x{W}, padding "
                f"{self._pads})")
        return (N, self.out_channels, conv_output_size(H, kh, sh, pt + pb, dh),
                conv_output_size(W, kw, sw, pl + pr, dw))

    def forward(self, x):
        x = check_input("Conv2d", x, channels=self.in_channels, xp=self.xp, dtype=self.dtype)
        out_shape = self.output_shape(x.shape)
        b = self.bias.data if self.bias is not None else None
        y, cache = self.ops.conv2d_forward(x, self.weight.data, b, self.stride, self._pads, self.dilation)
        self._keep((cache, out_shape))
        return y

    # False: backward computes no input gradient and returns None (a model's first convolution,
    # whose input is the image, sets it for a training step; see UNet.backward(input_grad=False)).
    needs_input_grad = True

    def backward(self, dy):
        cache, out_shape = self._take()
        dy = _check_dy("Conv2d", dy, out_shape, self.xp, self.dtype)
        dx, dw, db = self.ops.conv2d_backward(dy, cache, input_grad=self.needs_input_grad)
        _add_grads(self, dw, db)
        self._release()
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")


class ConvTranspose2d(Module):
    """2-D transposed convolution (the adjoint of Conv2d with the same weight and hyper-parameters).

    Output size: (H - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1;
    output_padding must be smaller than the stride or the dilation (as PyTorch requires).
    weight: (in_channels, out_channels, kh, kw), PyTorch's layout; bias: (out_channels,).
    init: 'torch' reproduces PyTorch's default, whose bound 1/sqrt(fan_in) takes fan_in as
    weight.shape[1] * kh * kw = out_channels * kh * kw (what PyTorch computes for this layout). 'he'
    uses the true fan-in, the average number of inputs feeding one output pixel:
    in_channels * kh * kw / (sh * sw) (each input pixel spreads over kh*kw outputs, and there are
    sh*sw outputs per input), which is in_channels for the U-Net's 2x2 stride-2 up-convolution.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, bias=True, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        name = "ConvTranspose2d"
        self.in_channels = _check_int(name, "in_channels", in_channels, 1)
        self.out_channels = _check_int(name, "out_channels", out_channels, 1)
        self.kernel_size = _check_pair(name, "kernel_size", kernel_size, 1)
        self.stride = _check_pair(name, "stride", stride, 1)
        self.dilation = _check_pair(name, "dilation", dilation, 1)
        if isinstance(padding, str):
            raise ValueError(f"{name}: padding must be an int or a pair (ph, pw), got {padding!r}")
        self.padding = _check_pair(name, "padding", padding, 0)
        self.output_padding = _check_pair(name, "output_padding", output_padding, 0)
        for op, s, d in zip(self.output_padding, self.stride, self.dilation):
            if op >= max(s, d):
                raise ValueError(f"{name}: output_padding must be smaller than the stride or the "
                                 f"dilation, got output_padding {self.output_padding}, stride "
                                 f"{self.stride}, dilation {self.dilation}")
        _check_init(name, init)
        kh, kw = self.kernel_size
        if init == "he":
            fan_in = self.in_channels * kh * kw / (self.stride[0] * self.stride[1])
        else:
            fan_in = self.out_channels * kh * kw
        w, b = _init.init_weight_and_bias((self.in_channels, self.out_channels, kh, kw),
                                          self.out_channels if bias else None, fan_in, init, self.dtype)
        _set_parameters(self, w, b)

    def output_shape(self, input_shape):
        """(N, out_channels, Hy, Wy) for an input (N, C, H, W); ValueError when not positive."""
        N, _, H, W = input_shape
        size = [conv_transpose_output_size(n, k, s, 2 * p, op, d) for n, k, s, p, op, d in
                zip((H, W), self.kernel_size, self.stride, self.padding, self.output_padding,
                    self.dilation)]
        if size[0] < 1 or size[1] < 1:
            raise ValueError(
                f"ConvTranspose2d: the output would be {size[0]}x{size[1]} for an input {H}x{W}: the "
                f"padding {self.padding} crops more than the {size[0] + 2 * self.padding[0]}x"
                f"{size[1] + 2 * self.padding[1]} full output (kernel {self.kernel_size}, stride "
                f"{self.stride}, dilation {self.dilation})")
        return (N, self.out_channels, size[0], size[1])

    def forward(self, x):
        x = check_input("ConvTranspose2d", x, channels=self.in_channels, xp=self.xp, dtype=self.dtype)
        out_shape = self.output_shape(x.shape)
        b = self.bias.data if self.bias is not None else None
        y, cache = self.ops.conv_transpose2d_forward(x, self.weight.data, b, self.stride, self.padding,
                                                     self.output_padding, self.dilation)
        self._keep((cache, out_shape))
        return y

    def backward(self, dy):
        cache, out_shape = self._take()
        dy = _check_dy("ConvTranspose2d", dy, out_shape, self.xp, self.dtype)
        dx, dw, db = self.ops.conv_transpose2d_backward(dy, cache)
        _add_grads(self, dw, db)
        self._release()
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, dtype={self.dtype}")

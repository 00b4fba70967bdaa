"""Convolutions, the reference maths: Conv2d and ConvTranspose2d as GEMMs over a column buffer.

This is the plain version a learner should read first (``conv2d_forward_reference`` and its three
siblings, with ``im2col`` / ``col2im`` beside them). The tiled drivers in ``conv_fast.py`` compute the
same thing faster and are checked against these functions; the layers are in ``conv.py``.

Primitives (every backend implements the same four, with the same arguments):

    conv2d_forward(x, w, b, stride, padding, dilation)                            -> (y, cache)
    conv2d_backward(dy, cache)                                                     -> (dx, dw, db)
    conv_transpose2d_forward(x, w, b, stride, padding, output_padding, dilation)  -> (y, cache)
    conv_transpose2d_backward(dy, cache)                                           -> (dx, dw, db)

Hyper-parameters are ints or (h, w) pairs; ``padding`` may also be ((top, bottom), (left, right)).
``db`` is None when ``b`` is None. The cache is private to the backend that made it.

How it is computed. A convolution is a correlation: each output pixel is a dot product of the kernel
with one window of the (zero-padded) input. ``im2col`` copies every window into a column buffer
``cols`` of shape (C*kh*kw, N*Ho*Wo), one slab per kernel offset (the only Python loop is over the
kh*kw offsets), and the forward is ONE GEMM for the whole batch, ``W (O, C*kh*kw) @ cols ->
(O, N*Ho*Wo)``, whose result goes to NCHW in the same pass that adds the bias. (Folding the batch into
the GEMM's columns measured faster than one GEMM per image on (N, C*kh*kw, Ho*Wo) buffers, above all
for the weight gradient, whose inner dimension becomes N*Ho*Wo; for N = 1 the two are the same.)
The padding is never materialised: each offset copies the part of its slab that lands inside the
input and writes zeros in the thin border that falls into the padding.

The backward of that GEMM gives ``dcols = W^T @ dY`` and ``dW = dY @ cols^T`` (dY: (O, N*Ho*Wo));
``col2im`` adds the columns of ``dcols`` back onto the pixels they were copied from (the adjoint of
``im2col``). The transposed convolution is the convolution's adjoint, so it is the same code read the
other way: its forward is ``col2im(W^T @ X)``, its input gradient is the convolution's forward
``W @ im2col(dy)`` and its weight gradient ``X @ im2col(dy)^T``.

Fast paths (switched off by setting ``FAST_PATHS = False``, which the tests use to check them):
  * 1x1 kernel, stride 1, no padding: no column buffer at all; one GEMM per image straight on the
    NCHW arrays, ``W (O, C) @ x_n (C, H*W)``, which is NCHW out, for both layers and their backwards.
  * kernel == stride, dilation 1, no padding (the U-Net's 2x2 stride-2 up-convolution): the windows
    neither overlap nor leave gaps, so ``im2col`` and ``col2im`` are pure permutations (an inverse
    pixel shuffle and a pixel shuffle), each one transposing copy, the bias added in the same pass.
    The transposed convolution is then exactly one GEMM plus one pixel shuffle, and its backward one
    inverse shuffle plus the two GEMMs.

Derivations in long form: docs/backprop.md#convolution-as-correlation,
docs/backprop.md#the-input-gradient-is-a-full-convolution-with-the-flipped-kernel and
docs/backprop.md#the-transposed-convolution-is-the-convolutions-adjoint.

Set ``FAST_PATHS = False`` (a module attribute, read at each call) to route every call of this module
and of conv_fast through the general im2col / col2im loops; the tests compare the two.
"""
import numpy as np

from .shapes import padding_pairs, pair

OPS = ("conv2d_forward", "conv2d_backward", "conv_transpose2d_forward", "conv_transpose2d_backward")

# Set to False to route every call through the general im2col / col2im loops (tests compare the two).
FAST_PATHS = True


# ---------------------------------------------------------------------------------------------------
# Output sizes and the slabs of one axis
# ---------------------------------------------------------------------------------------------------
def conv_output_size(size, kernel, stride, pad_total, dilation):
    """Output length of a convolution along one axis: floor((size + pads - d(k-1) - 1) / s) + 1."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size, kernel, stride, pad_total, output_padding, dilation):
    """Output length of a transposed convolution along one axis:
    (size - 1) s - pads + d(k-1) + output_padding + 1."""
    return (size - 1) * stride - pad_total + dilation * (kernel - 1) + output_padding + 1


def axis_ranges(n_in, n_out, k, s, d, p):
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


def is_pointwise(kh, kw, stride, pads):
    """1x1 kernel, stride 1, no padding (pads: ((top, bottom), (left, right))): a plain GEMM per image."""
    return FAST_PATHS and kh == 1 and kw == 1 and stride == (1, 1) and pads == ((0, 0), (0, 0))


def is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
    """Non-overlapping, gap-free windows (kernel == stride, dilation 1, no leading padding) that stay
    inside the H x W image (no trailing padding reached): im2col is then a pure permutation of the
    image's top-left Ho*kh x Wo*kw pixels (an inverse pixel shuffle)."""
    return (FAST_PATHS and (kh, kw) == stride and dilation == (1, 1) and pad == (0, 0)
            and Ho * kh <= H and Wo * kw <= W)


# ---------------------------------------------------------------------------------------------------
# The column buffer and its adjoint. Layout: cols (C*kh*kw, N*Ho*Wo), row (c, i, j), column (n, ho, wo).
# ---------------------------------------------------------------------------------------------------
def channels_first(a):
    """(N, C, H, W) -> (C, N*H*W): the batch folded into the columns (a view when N == 1)."""
    N, C = a.shape[:2]
    if N == 1:
        return np.ascontiguousarray(a).reshape(C, -1)
    return np.ascontiguousarray(a.transpose(1, 0, 2, 3)).reshape(C, -1)


def batch_first(a2, N, H, W, bias=None):
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


def im2col(x, kh, kw, Ho, Wo, stride, pad, dilation):
    """x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), row (c, i, j) and column (n, ho, wo) holding
    x_padded[n, c, ho*sh + i*dh, wo*sw + j*dw]. pad = (top, left): only the leading padding matters.
    Zero padding is not materialised; each offset's slab gets zeros where it reads the padding."""
    N, C, H, W = x.shape
    sh, sw = stride
    cols = np.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    xt = x.transpose(1, 0, 2, 3)                                        # (C, N, H, W), a view
    if is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
        # Inverse pixel shuffle: x[n, c, ho*kh + i, wo*kw + j] -> cols[c, i, j, n, ho, wo]; rows and
        # columns past Ho*kh, Wo*kw are read by no window. Splitting an axis of a view is a view.
        tiles = xt[:, :, :Ho * kh, :Wo * kw].reshape(C, N, Ho, kh, Wo, kw)
        np.copyto(cols, tiles.transpose(0, 3, 5, 1, 2, 4))
        return cols.reshape(C * kh * kw, N * Ho * Wo)
    rows = axis_ranges(H, Ho, kh, sh, dilation[0], pad[0])
    columns = axis_ranges(W, Wo, kw, sw, dilation[1], pad[1])
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


def col2im(dcols, shape, kh, kw, Ho, Wo, stride, pad, dilation, bias=None):
    """The adjoint of ``im2col``: dcols (C*kh*kw, N*Ho*Wo) -> out (N, C, H, W) = shape, each column
    entry added onto the pixel it was copied from (entries that came from the padding are dropped).
    bias (C,) or None is added to every pixel, in the same pass where possible."""
    N, C, H, W = shape
    sh, sw = stride
    d6 = dcols.reshape(C, kh, kw, N, Ho, Wo)
    if is_tiling(kh, kw, stride, pad, dilation, H, W, Ho, Wo):
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
    rows = axis_ranges(H, Ho, kh, sh, dilation[0], pad[0])
    columns = axis_ranges(W, Wo, kw, sw, dilation[1], pad[1])
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


def weight_grad(a2, cols):
    """a2 @ cols^T.   a2 (P, M), cols (K, M) -> (P, K) (M = N*Ho*Wo, the long inner dimension).
    Computed as (cols @ a2^T)^T, the operand order OpenBLAS ran fastest here."""
    return np.matmul(cols, a2.T).T


def weight_grad_per_image(a3, b3):
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
    stride, dilation, pads = pair(stride), pair(dilation), padding_pairs(padding)
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
    if is_pointwise(kh, kw, stride, pads):
        x3 = np.ascontiguousarray(x).reshape(N, C, H * W)
        y = np.matmul(wm, x3)                                           # (N, O, H*W), NCHW
        if b is not None:
            y += b.reshape(1, O, 1)
        return y.reshape(N, O, H, W), (x3, w, x.shape, stride, lead, dilation, b is not None)
    cols = im2col(x, kh, kw, Ho, Wo, stride, lead, dilation)           # (C*kh*kw, N*Ho*Wo)
    y = batch_first(np.matmul(wm, cols), N, Ho, Wo, bias=b)           # (O, N*Ho*Wo) -> NCHW
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
        dw = weight_grad_per_image(dy3, cols).reshape(w.shape)
        dx = np.matmul(wm.T, dy3).reshape(N, C, H, W) if input_grad else None
        return dx, dw, db
    dy2 = channels_first(dy)                                           # (O, N*Ho*Wo)
    db = dy2.sum(axis=1) if has_bias else None
    dw = weight_grad(dy2, cols).reshape(w.shape)
    if not input_grad:
        return None, dw, db
    dcols = np.matmul(wm.T, dy2)                                        # (C*kh*kw, N*Ho*Wo)
    dx = col2im(dcols, x_shape, kh, kw, Ho, Wo, stride, lead, dilation)
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
    stride, dilation, pads = pair(stride), pair(dilation), padding_pairs(padding)
    output_padding = pair(output_padding)
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
    if is_pointwise(kh, kw, stride, pads) and (Hy, Wy) == (H, W):
        x3 = np.ascontiguousarray(x).reshape(N, Cin, H * W)
        y = np.matmul(wmt, x3)                                          # (N, Cout, H*W), NCHW
        if b is not None:
            y += b.reshape(1, Cout, 1)
        return y.reshape(N, Cout, H, W), (x3, w, x.shape, stride, lead, dilation, b is not None)
    x2 = channels_first(x)                                             # (Cin, N*H*W)
    dcols = np.matmul(wmt, x2)                                          # (Cout*kh*kw, N*H*W)
    y = col2im(dcols, (N, Cout, Hy, Wy), kh, kw, H, W, stride, lead, dilation, bias=b)
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
        dw = weight_grad_per_image(xs, dy3).reshape(w.shape)
        db = dy3.sum(axis=2).sum(axis=0) if has_bias else None
        return dx, dw, db
    cols = im2col(dy, kh, kw, H, W, stride, lead, dilation)            # (Cout*kh*kw, N*H*W)
    dx = batch_first(np.matmul(wm, cols), N, H, W)                     # (Cin, N*H*W) -> NCHW
    dw = weight_grad(xs, cols).reshape(w.shape)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None
    return dx, dw, db

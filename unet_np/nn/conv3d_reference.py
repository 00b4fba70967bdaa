"""Convolutions over volumes, the reference maths: vol2col / col2vol and the four 3-D primitives.

This is the clean, minimal version to read first; ``conv3d_fast.py`` computes the same thing in tiles
(and the numba backend with compiled packing) and is checked against it. Nothing here is specific to
three axes: ``vol2col`` is im2col for any number of spatial axes, and the primitives take their
number of spatial axes from the weight, so the same code runs a 1-D, 2-D or 3-D convolution (the tests
run it in 2-D against ``conv_reference.py`` as well as in 3-D against PyTorch).

Primitives (every backend offers the same four; a backend without its own runs these on the host):

    conv3d_forward(x, w, b, stride, padding, dilation)                            -> (y, cache)
    conv3d_backward(dy, cache, input_grad=True)                                    -> (dx, dw, db)
    conv_transpose3d_forward(x, w, b, stride, padding, output_padding, dilation)  -> (y, cache)
    conv_transpose3d_backward(dy, cache)                                           -> (dx, dw, db)

x: (N, C, D, H, W). Hyper-parameters are ints or (d, h, w) triples; ``padding`` may also give a
(before, after) pair per axis. ``db`` is None when ``b`` is None.

What changes from 2-D: nothing but the number of loops. A kernel offset is now a triple (i, j, k), a
window has kd*kh*kw positions, and ``cols`` has one row per (c, i, j, k) and one column per output
voxel (n, od, oh, ow):

    cols (C*kd*kh*kw, N*Do*Ho*Wo)[(c, i, j, k), (n, od, oh, ow)]
        = x_padded[n, c, od*sd + i*dd, oh*sh + j*dh, ow*sw + k*dw]
    forward        Y (O, N*Do*Ho*Wo) = W (O, C*kd*kh*kw) @ cols
    backward       dW = dY @ cols^T,   dcols = W^T @ dY,   dx = col2vol(dcols)   (vol2col's adjoint)
    transposed     y = col2vol(W^T @ X),   dX = W @ vol2col(dy),   dW = X @ vol2col(dy)^T

The buffer is 27x the input for a 3x3x3 kernel (a 16-channel 64^3 volume makes a 450 MB float32
``cols``): this reference holds it whole for clarity; the tiled driver never does.
Long form: docs/backprop.md#what-changes-in-3-d.
"""
import itertools
import math

import numpy as np

from .conv_reference import axis_ranges, conv_output_size, conv_transpose_output_size
from .shapes import padding_pairs, pair

OPS = ("conv3d_forward", "conv3d_backward", "conv_transpose3d_forward", "conv_transpose3d_backward")


# ---------------------------------------------------------------------------------------------------
# The column buffer and its adjoint, for any number of spatial axes
# ---------------------------------------------------------------------------------------------------
def channels_first_nd(a):
    """(N, C, *S) -> (C, N*prod(S)): the batch folded into the columns (a view when N == 1)."""
    N, C = a.shape[:2]
    if N == 1:
        return np.ascontiguousarray(a).reshape(C, -1)
    return np.ascontiguousarray(np.moveaxis(a, 1, 0)).reshape(C, -1)


def batch_first_nd(a2, N, size, bias=None):
    """(C, N*prod(size)) -> (N, C, *size), the bias (C,) or None added on the way."""
    C = a2.shape[0]
    y = np.moveaxis(a2.reshape((C, N) + tuple(size)), 0, 1)
    if bias is not None:
        y = y + bias.reshape((1, C) + (1,) * len(size))
    return np.ascontiguousarray(y)


def vol2col(x, kernel, out_size, stride, lead, dilation):
    """x (N, C, *S) -> cols (C*prod(kernel), N*prod(out_size)).

    Row (c, i, j, ...) and column (n, o1, o2, ...) hold x_padded[n, c, o1*s1 + i*d1 - lead1, ...]:
    one slab per kernel offset, copied with one strided slice per axis; the part of a slab that
    falls into the zero padding (only ``lead``, the padding before each axis, matters) is zero.
    ``lead`` may be negative: the column block of a tile that starts further in (conv3d_fast.py).
    """
    N, C = x.shape[:2]
    S = x.shape[2:]
    cols = np.empty((C,) + tuple(kernel) + (N,) + tuple(out_size), dtype=x.dtype)
    xt = np.moveaxis(x, 1, 0)                                          # (C, N, *S), a view
    # per axis and kernel offset: outputs [o_lo, o_hi) read inputs i_lo, i_lo + s, ... < i_hi
    ranges = [axis_ranges(S[a], out_size[a], kernel[a], stride[a], dilation[a], lead[a])
              for a in range(len(S))]
    for offset in itertools.product(*(range(k) for k in kernel)):
        dst = cols[(slice(None),) + offset]                            # (C, N, *out_size), a view
        r = [ranges[a][i] for a, i in enumerate(offset)]
        if any(o_hi <= o_lo for o_lo, o_hi, _, _ in r):
            dst[...] = 0                                               # the whole slab is padding
            continue
        inside = (slice(None), slice(None)) + tuple(slice(o_lo, o_hi) for o_lo, o_hi, _, _ in r)
        source = (slice(None), slice(None)) + tuple(slice(i_lo, i_hi, s) for (_, _, i_lo, i_hi), s
                                                    in zip(r, stride))
        if any(o_lo > 0 or o_hi < n for (o_lo, o_hi, _, _), n in zip(r, out_size)):
            dst[...] = 0                                               # part of it reads padding
        dst[inside] = xt[source]
    return cols.reshape(C * math.prod(kernel), N * math.prod(out_size))


def col2vol(dcols, shape, kernel, out_size, stride, lead, dilation, out=None):
    """The adjoint of ``vol2col``: dcols (C*prod(kernel), N*prod(out_size)) -> (N, C, *S) = shape.

    Every entry of a column is added back onto the voxel it was copied from (entries that came from
    the padding are dropped); a voxel read by several windows collects the sum. ``out``: an array of
    ``shape`` to add into (a new zero array when None). Returns it.
    """
    N, C = shape[:2]
    S = shape[2:]
    if out is None:
        out = np.zeros(shape, dtype=dcols.dtype)
    d = dcols.reshape((C,) + tuple(kernel) + (N,) + tuple(out_size))
    outt = np.moveaxis(out, 1, 0)                                      # (C, N, *S), a view
    ranges = [axis_ranges(S[a], out_size[a], kernel[a], stride[a], dilation[a], lead[a])
              for a in range(len(S))]
    for offset in itertools.product(*(range(k) for k in kernel)):
        r = [ranges[a][i] for a, i in enumerate(offset)]
        if any(o_hi <= o_lo for o_lo, o_hi, _, _ in r):
            continue
        inside = (slice(None), slice(None)) + tuple(slice(o_lo, o_hi) for o_lo, o_hi, _, _ in r)
        target = (slice(None), slice(None)) + tuple(slice(i_lo, i_hi, s) for (_, _, i_lo, i_hi), s
                                                    in zip(r, stride))
        outt[target] += d[(slice(None),) + offset][inside]
    return out


# ---------------------------------------------------------------------------------------------------
# Hyper-parameters
# ---------------------------------------------------------------------------------------------------
def conv_geometry(x_shape, w_shape, stride, padding, dilation, who="conv3d_forward"):
    """(stride, dilation, pads, out_size) as tuples of one entry per spatial axis, checked.
    The number of spatial axes is the weight's: w (O, C, *kernel)."""
    dims = len(w_shape) - 2
    if len(x_shape) != dims + 2:
        raise ValueError(f"{who}: a {dims}-D kernel needs a {dims + 2}-D input, got shape "
                         f"{tuple(x_shape)}")
    stride, dilation = pair(stride, "stride", dims), pair(dilation, "dilation", dims)
    pads = padding_pairs(padding, dims)
    kernel = tuple(w_shape[2:])
    out_size = tuple(conv_output_size(n, k, s, sum(p), d)
                     for n, k, s, p, d in zip(x_shape[2:], kernel, stride, pads, dilation))
    if min(out_size) < 1:
        raise ValueError(f"{who}: kernel {kernel} (dilation {dilation}) is larger than the padded "
                         f"input {tuple(n + sum(p) for n, p in zip(x_shape[2:], pads))}")
    return stride, dilation, pads, out_size


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------
def conv3d_forward_reference(x, w, b, stride=1, padding=0, dilation=1):
    """y = conv3d(x, w) + b (a cross-correlation, as PyTorch's).

    x: (N, C, D, H, W), w: (O, C, kd, kh, kw), b: (O,) or None -> y: (N, O, Do, Ho, Wo),
    Do = floor((D + front + back - dd (kd - 1) - 1) / sd) + 1 (likewise Ho, Wo).
    y[n, o, od, oh, ow] = b[o] + sum_{c,i,j,k} w[o, c, i, j, k] x_padded[n, c, od*sd + i*dd, ...],
    i.e. Y (O, N*Do*Ho*Wo) = W (O, C*kd*kh*kw) @ vol2col(x).
    cache: (cols, w, x.shape, stride, lead, dilation, whether there is a bias).
    """
    O, C = w.shape[:2]
    if x.shape[1] != C:
        raise ValueError(f"conv3d_forward: weight expects {C} input channels, got {x.shape[1]}")
    stride, dilation, pads, out_size = conv_geometry(x.shape, w.shape, stride, padding, dilation)
    lead = tuple(p[0] for p in pads)
    cols = vol2col(x, w.shape[2:], out_size, stride, lead, dilation)   # (C*kd*kh*kw, N*Do*Ho*Wo)
    y = batch_first_nd(np.matmul(w.reshape(O, -1), cols), x.shape[0], out_size, bias=b)
    return y, (cols, w, x.shape, stride, lead, dilation, b is not None)


def conv3d_backward_reference(dy, cache, input_grad=True):
    """Gradients of y = conv3d(x, w) + b (dx is None when input_grad is False).

    dy: (N, O, Do, Ho, Wo) -> dx: (N, C, D, H, W), dw: (O, C, kd, kh, kw), db: (O,) or None.
    In the forward pass this was:  Y = W @ cols,  y = Y + b.  So now:
      dW = dY @ cols^T            (each weight met every column it multiplied)
      db = dY summed over its columns
      dcols = W^T @ dY,  dx = col2vol(dcols)   (each column entry was a copy of one voxel of x)
    """
    cols, w, x_shape, stride, lead, dilation, has_bias = cache
    dy2 = channels_first_nd(dy)                                        # (O, N*Do*Ho*Wo)
    db = dy2.sum(axis=1) if has_bias else None
    dw = np.matmul(dy2, cols.T).reshape(w.shape)
    if not input_grad:
        return None, dw, db
    dcols = np.matmul(w.reshape(w.shape[0], -1).T, dy2)               # (C*kd*kh*kw, N*Do*Ho*Wo)
    dx = col2vol(dcols, x_shape, w.shape[2:], dy.shape[2:], stride, lead, dilation)
    return dx, dw, db


def transpose_geometry(x_shape, w_shape, stride, padding, output_padding, dilation,
                       who="conv_transpose3d_forward"):
    """(stride, dilation, pads, out_size) of a transposed convolution, checked (w: (Cin, Cout, *k))."""
    dims = len(w_shape) - 2
    if len(x_shape) != dims + 2:
        raise ValueError(f"{who}: a {dims}-D kernel needs a {dims + 2}-D input, got shape "
                         f"{tuple(x_shape)}")
    stride, dilation = pair(stride, "stride", dims), pair(dilation, "dilation", dims)
    output_padding = pair(output_padding, "output_padding", dims)
    pads = padding_pairs(padding, dims)
    out_size = tuple(conv_transpose_output_size(n, k, s, sum(p), op, d) for n, k, s, p, op, d in
                     zip(x_shape[2:], w_shape[2:], stride, pads, output_padding, dilation))
    if min(out_size) < 1:
        raise ValueError(f"{who}: the output would be {out_size}; the padding {pads} removes more "
                         f"than the full output")
    return stride, dilation, pads, out_size


def conv_transpose3d_forward_reference(x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
    """y = conv_transpose3d(x, w) + b: the adjoint of conv3d with the same w and hyper-parameters.

    x: (N, Cin, D, H, W), w: (Cin, Cout, kd, kh, kw) (PyTorch's layout), b: (Cout,) or None.
    y: (N, Cout, Dy, Hy, Wy), Dy = (D - 1) sd - front - back + dd (kd - 1) + output_padding_d + 1.
    It is conv3d's input gradient with w read as a conv3d weight (O = Cin, C = Cout):
      y = col2vol(W^T @ X),  W = w as (Cin, Cout*kd*kh*kw), X = x as (Cin, N*D*H*W).
    cache: (X, w, x.shape, stride, lead, dilation, whether there is a bias).
    """
    Cin, Cout = w.shape[:2]
    if x.shape[1] != Cin:
        raise ValueError(f"conv_transpose3d_forward: weight expects {Cin} input channels, got "
                         f"{x.shape[1]}")
    stride, dilation, pads, out_size = transpose_geometry(x.shape, w.shape, stride, padding,
                                                          output_padding, dilation)
    lead = tuple(p[0] for p in pads)
    x2 = channels_first_nd(x)                                          # (Cin, N*D*H*W)
    dcols = np.matmul(w.reshape(Cin, -1).T, x2)                        # (Cout*kd*kh*kw, N*D*H*W)
    N = x.shape[0]
    y = col2vol(dcols, (N, Cout) + out_size, w.shape[2:], x.shape[2:], stride, lead, dilation)
    if b is not None:
        y += b.reshape((1, Cout) + (1,) * len(out_size))
    return y, (x2, w, x.shape, stride, lead, dilation, b is not None)


def conv_transpose3d_backward_reference(dy, cache):
    """Gradients of y = conv_transpose3d(x, w) + b.

    dy: (N, Cout, Dy, Hy, Wy) -> dx: (N, Cin, D, H, W), dw: (Cin, Cout, kd, kh, kw), db: (Cout,).
    In the forward pass this was:  y = col2vol(W^T @ X) + b.  col2vol's adjoint is vol2col, so
    with cols = vol2col(dy) (Cout*kd*kh*kw, N*D*H*W):
      dX = W @ cols   (a conv3d forward of dy with w),   dW = X @ cols^T,   db = sum of dy.
    """
    x2, w, x_shape, stride, lead, dilation, has_bias = cache
    cols = vol2col(dy, w.shape[2:], x_shape[2:], stride, lead, dilation)
    dx = batch_first_nd(np.matmul(w.reshape(w.shape[0], -1), cols), x_shape[0], x_shape[2:])
    dw = np.matmul(x2, cols.T).reshape(w.shape)
    db = dy.sum(axis=(0,) + tuple(range(2, dy.ndim))) if has_bias else None
    return dx, dw, db

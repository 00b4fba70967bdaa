"""Convolutions over volumes, the tiled driver: the four primitives of conv3d_reference.py computed
band by band, so the column buffer never holds more than ``TILE_BYTES``.

Read conv3d_reference.py first. A tile here is one image and a band of output depth slices
[d0, d1); its columns are ``vol2col`` of the whole image with the depth axis shifted: output slice
d0 + r reads input depth (d0 + r) sd + i dd - front = r sd + i dd - (front - d0 sd), so the band is
vol2col with lead ``front - d0 sd`` (possibly negative) and d1 - d0 output slices. The same holds
for col2vol. Three drivers do all the work:

    forward       y[n, :, band] = W (O, K) @ cols(n, band)                     (K = C*kd*kh*kw)
    weight grad   dW (O, K)    += dy[n, :, band] @ cols(n, band)^T
    data grad     stride 1:  dx = forward(dy, w flipped in space and transposed, lead = extent - lead)
                             (a gather: the same tiled forward, no scatter-add)
                  otherwise: dcols = W^T @ dy[n, :, band], col2vol(dcols) added into dx

and the transposed convolution is the same three read the other way: its forward is the data grad
(with w (Cin, Cout, *k) read as a conv weight, O = Cin), its input gradient the forward and its weight
gradient the weight grad with x and dy swapped.

kd x 3 x 3 stride-1 convolutions (3x3x3, 1x3x3) with enough channels (winograd3d.winograd3d_ok) leave
the band loop when the kernel table has Winograd transforms (the numba backend's): the forward, the
stride-1 input gradient (through forward_tiles) and the weight gradient run as Winograd F(4x4, 3x3)
in every plane with the depth taps summed directly (winograd3d.py: the 2-D transforms, and 36
position GEMMs with the taps stacked along K).

The element-wise helpers come from a kernel table, ``Conv3dKernels``: ``NUMPY_KERNELS3D`` (the
reference vol2col / col2vol on a band) here, compiled ones in the numba backend
(unet_np/kernels/cpu_conv3d.py).
"""
import math
import threading

import numpy as np

from . import conv_reference, winograd3d
from .conv3d_reference import (col2vol, conv3d_backward_reference, conv3d_forward_reference,
                               conv_geometry, conv_transpose3d_backward_reference,
                               conv_transpose3d_forward_reference, transpose_geometry, vol2col)

TILE_BYTES = 48 << 20          # column-buffer budget of one tile (GEMMs on fewer than ~30k columns
                               # ran well below BLAS speed here; 48 MB is 3 slices of 64^2 at K = 864)
_workspaces = threading.local()


def workspace(key, count, dtype):
    """A flat scratch array private to the calling thread, reused across calls (grown as needed)."""
    bufs = _workspaces.__dict__.setdefault("bufs", {})
    dtype = np.dtype(dtype)
    buf = bufs.get((key, dtype))
    if buf is None or buf.size < count:
        buf = np.empty(max(count, 1), dtype=dtype)
        bufs[(key, dtype)] = buf
    return buf[:count]


# ---------------------------------------------------------------------------------------------------
# The kernel table
# ---------------------------------------------------------------------------------------------------
def np_vol2col_band(x, n, d0, d1, kernel, out_hw, stride, lead, dilation, out):
    """out (K, (d1-d0)*Ho*Wo) = vol2col of image n for output depth slices [d0, d1)."""
    band_lead = (lead[0] - d0 * stride[0],) + tuple(lead[1:])
    out[...] = vol2col(x[n:n + 1], kernel, (d1 - d0,) + tuple(out_hw), stride, band_lead, dilation)


def np_col2vol_band(dcols, dx, n, d0, d1, kernel, out_hw, stride, lead, dilation):
    """dx[n] += col2vol of dcols (K, (d1-d0)*Ho*Wo), the columns of output slices [d0, d1)."""
    band_lead = (lead[0] - d0 * stride[0],) + tuple(lead[1:])
    col2vol(dcols, (1,) + dx.shape[1:], kernel, (d1 - d0,) + tuple(out_hw), stride, band_lead,
            dilation, out=dx[n:n + 1])


def np_add_bias(y3, b):
    """y3 (N, O, P) += b (O,)."""
    y3 += b.reshape(1, -1, 1)


def np_channel_sum(a):
    """(N, C, ...) -> (C,)."""
    return a.sum(axis=(0,) + tuple(range(2, a.ndim)))


class Conv3dKernels:
    """The element-wise helpers a backend gives the 3-D driver (see the np_* functions above)."""

    def __init__(self, vol2col_band, col2vol_band, add_bias, channel_sum, winograd=None):
        self.vol2col_band = vol2col_band
        self.col2vol_band = col2vol_band
        self.add_bias = add_bias
        self.channel_sum = channel_sum
        # None, or an object with the 2-D Winograd F(4x4, 3x3) transforms weight_transform,
        # input_transform, output_transform, grad_transform, weight_grad_transform
        # (kernels/cpu_winograd.py) and matmul_stack(a, b, out) (np.matmul's result, the position
        # GEMMs split over threads): winograd3d.py runs them plane by plane
        self.winograd = winograd


NUMPY_KERNELS3D = Conv3dKernels(np_vol2col_band, np_col2vol_band, np_add_bias, np_channel_sum)


# ---------------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------------
def bands(N, Do, plane, K, itemsize):
    """(n, d0, d1) tiles: each image cut into bands of output depth slices whose column buffer
    (K x band*plane) fits TILE_BYTES (at least one slice)."""
    per = max(1, min(Do, TILE_BYTES // max(1, K * plane * itemsize)))
    for n in range(N):
        for d0 in range(0, Do, per):
            yield n, d0, min(Do, d0 + per)


def is_pointwise(kernel, stride, lead):
    """1x1x1 kernel, stride 1, no padding: the columns are x itself, no packing."""
    return (conv_reference.FAST_PATHS and all(k == 1 for k in kernel) and all(s == 1 for s in stride)
            and all(p == 0 for p in lead))


def forward_tiles(x, wm, kernel, out_size, stride, lead, dilation, kern, b=None):
    """y (N, O, *out_size) = conv(x, w) (+ b when given); wm = w as (O, K). kd x 3 x 3 stride-1
    kernels with enough channels run as Winograd (winograd3d.py), the rest band by band."""
    N, C = x.shape[:2]
    O, K = wm.shape
    plane = out_size[1] * out_size[2]
    y = np.empty((N, O) + tuple(out_size), dtype=x.dtype)
    y3 = y.reshape(N, O, -1)
    if winograd3d.winograd3d_ok(kern, C, O, kernel, stride, dilation, N, out_size):
        return winograd3d.winograd3d_forward(np.ascontiguousarray(x), wm.reshape((O, C) + tuple(kernel)),
                                             y, lead, kern.winograd, workspace, TILE_BYTES, b)
    if is_pointwise(kernel, stride, lead) and tuple(x.shape[2:]) == tuple(out_size):
        np.matmul(wm, np.ascontiguousarray(x).reshape(N, C, -1), out=y3)
        if b is not None:
            kern.add_bias(y3, np.ascontiguousarray(b, dtype=y.dtype))
        return y
    for n, d0, d1 in bands(N, out_size[0], plane, K, x.itemsize):
        cols = workspace("cols", K * (d1 - d0) * plane, x.dtype).reshape(K, -1)
        kern.vol2col_band(x, n, d0, d1, kernel, out_size[1:], stride, lead, dilation, cols)
        np.matmul(wm, cols, out=y3[n, :, d0 * plane:d1 * plane])
    if b is not None:
        kern.add_bias(y3, np.ascontiguousarray(b, dtype=y.dtype))
    return y


def weight_grad_tiles(x, dy, kernel, stride, lead, dilation, kern):
    """dW (O, K) = sum over tiles of dy[n, :, band] @ cols(n, band)^T, summed in a fixed order.
    Computed as dW^T (K, O) += cols @ dy_band^T: with the long inner dimension P, OpenBLAS ran this
    operand order 3-5x faster here than dy_band @ cols^T (16 x 432 weights, P = 8k-64k)."""
    N, C = x.shape[:2]
    O = dy.shape[1]
    out_size = dy.shape[2:]
    K = C * math.prod(kernel)
    plane = out_size[1] * out_size[2]
    if winograd3d.winograd3d_ok(kern, C, O, kernel, stride, dilation, N, out_size):
        return winograd3d.winograd3d_weight_grad(np.ascontiguousarray(x), np.ascontiguousarray(dy),
                                                 lead, kernel[0], kern.winograd, workspace,
                                                 TILE_BYTES).reshape(O, K)
    dy3 = np.ascontiguousarray(dy).reshape(N, O, -1)
    dwt = np.zeros((K, O), dtype=dy.dtype)                            # dW^T
    if is_pointwise(kernel, stride, lead) and tuple(x.shape[2:]) == tuple(out_size):
        x3 = np.ascontiguousarray(x).reshape(N, C, -1)
        for n in range(N):
            dwt += np.matmul(x3[n], dy3[n].T)
        return dwt.T
    for n, d0, d1 in bands(N, out_size[0], plane, K, x.itemsize):
        cols = workspace("cols", K * (d1 - d0) * plane, x.dtype).reshape(K, -1)
        kern.vol2col_band(x, n, d0, d1, kernel, out_size[1:], stride, lead, dilation, cols)
        dwt += np.matmul(cols, dy3[n, :, d0 * plane:d1 * plane].T)
    return dwt.T


def data_grad_tiles(dy, w, x_shape, stride, lead, dilation, kern):
    """dx (x_shape) = the input gradient of y = conv(x, w): W^T @ dy put back by col2vol.

    With stride 1 and padding within the kernel's extent this is a gather instead: dx is the
    correlation of dy with w flipped in space and transposed (C, O, *k), with the padding
    extent - lead before each axis (docs/backprop.md#the-input-gradient-is-a-full-convolution-with-the-flipped-kernel)."""
    O, C = w.shape[:2]
    kernel = w.shape[2:]
    N = dy.shape[0]
    extent = tuple(d * (k - 1) for d, k in zip(dilation, kernel))
    if (conv_reference.FAST_PATHS and all(s == 1 for s in stride)
            and all(0 <= p <= e for p, e in zip(lead, extent))):
        wf = np.ascontiguousarray(np.swapaxes(w[(slice(None), slice(None)) + (slice(None, None, -1),)
                                                * len(kernel)], 0, 1))          # (C, O, *kernel)
        lead_f = tuple(e - p for e, p in zip(extent, lead))
        return forward_tiles(dy, wf.reshape(C, -1), kernel, x_shape[2:], stride, lead_f, dilation,
                             kern)
    K = C * math.prod(kernel)
    out_size = dy.shape[2:]
    plane = out_size[1] * out_size[2]
    dy3 = np.ascontiguousarray(dy).reshape(N, O, -1)
    wmt = np.ascontiguousarray(w).reshape(O, K).T                       # (K, O), a view
    if is_pointwise(kernel, stride, lead) and tuple(x_shape[2:]) == tuple(out_size):
        return np.matmul(wmt, dy3).reshape(x_shape)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n, d0, d1 in bands(N, out_size[0], plane, K, dy.itemsize):
        dcols = workspace("dcols", K * (d1 - d0) * plane, dy.dtype).reshape(K, -1)
        np.matmul(wmt, dy3[n, :, d0 * plane:d1 * plane], out=dcols)
        kern.col2vol_band(dcols, dx, n, d0, d1, kernel, out_size[1:], stride, lead, dilation)
    return dx


# ---------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------
class TiledConv3dCache:
    """What the tiled backward needs: the input itself (the columns are packed again per tile)."""

    def __init__(self, x, w, stride, lead, dilation, has_bias, kern):
        self.x, self.w, self.stride, self.lead = x, w, stride, lead
        self.dilation, self.has_bias, self.kern = dilation, has_bias, kern


def make_conv3d_primitives(kern=NUMPY_KERNELS3D):
    """The four 3-D primitives over the helpers in ``kern``; the reference functions run instead
    when ``conv_reference.FAST_PATHS`` is False or the input is not 5-D."""

    def conv3d_forward(x, w, b, stride=1, padding=0, dilation=1):
        """As conv3d_forward_reference, band by band (the cache keeps x, not the columns)."""
        if not conv_reference.FAST_PATHS or x.ndim != 5 or w.ndim != 5:
            return conv3d_forward_reference(x, w, b, stride, padding, dilation)
        O, C = w.shape[:2]
        if x.shape[1] != C:
            raise ValueError(f"conv3d_forward: weight expects {C} input channels, got {x.shape[1]}")
        stride, dilation, pads, out_size = conv_geometry(x.shape, w.shape, stride, padding, dilation)
        lead = tuple(p[0] for p in pads)
        y = forward_tiles(x, np.ascontiguousarray(w).reshape(O, -1), w.shape[2:], out_size, stride,
                          lead, dilation, kern, b)
        return y, TiledConv3dCache(x, w, stride, lead, dilation, b is not None, kern)

    def conv3d_backward(dy, cache, input_grad=True):
        """As conv3d_backward_reference: dW and dx by the weight-grad and data-grad drivers."""
        if not isinstance(cache, TiledConv3dCache):
            return conv3d_backward_reference(dy, cache, input_grad)
        c = cache
        dy = np.ascontiguousarray(dy)
        db = c.kern.channel_sum(dy) if c.has_bias else None
        dw = weight_grad_tiles(c.x, dy, c.w.shape[2:], c.stride, c.lead, c.dilation, c.kern)
        dx = None
        if input_grad:
            dx = data_grad_tiles(dy, c.w, c.x.shape, c.stride, c.lead, c.dilation, c.kern)
        return dx, dw.reshape(c.w.shape), db

    def conv_transpose3d_forward(x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
        """As conv_transpose3d_forward_reference: the data-grad driver with w as a conv weight."""
        if not conv_reference.FAST_PATHS or x.ndim != 5 or w.ndim != 5:
            return conv_transpose3d_forward_reference(x, w, b, stride, padding, output_padding,
                                                      dilation)
        Cin, Cout = w.shape[:2]
        if x.shape[1] != Cin:
            raise ValueError(f"conv_transpose3d_forward: weight expects {Cin} input channels, got "
                             f"{x.shape[1]}")
        stride, dilation, pads, out_size = transpose_geometry(x.shape, w.shape, stride, padding,
                                                              output_padding, dilation)
        lead = tuple(p[0] for p in pads)
        N = x.shape[0]
        y = data_grad_tiles(np.ascontiguousarray(x), w, (N, Cout) + out_size, stride, lead,
                            dilation, kern)
        if b is not None:
            kern.add_bias(y.reshape(N, Cout, -1), np.ascontiguousarray(b, dtype=y.dtype))
        return y, TiledConv3dCache(x, w, stride, lead, dilation, b is not None, kern)

    def conv_transpose3d_backward(dy, cache):
        """As conv_transpose3d_backward_reference: dX = conv3d(dy, w) (the forward driver),
        dW = the weight-grad driver with the roles of x and dy swapped."""
        if not isinstance(cache, TiledConv3dCache):
            return conv_transpose3d_backward_reference(dy, cache)
        c = cache
        dy = np.ascontiguousarray(dy)
        Cin = c.w.shape[0]
        kernel = c.w.shape[2:]
        dx = forward_tiles(dy, np.ascontiguousarray(c.w).reshape(Cin, -1), kernel, c.x.shape[2:],
                           c.stride, c.lead, c.dilation, c.kern)
        dw = weight_grad_tiles(dy, c.x, kernel, c.stride, c.lead, c.dilation, c.kern)
        db = c.kern.channel_sum(dy) if c.has_bias else None
        return dx, dw.reshape(c.w.shape), db

    return {"conv3d_forward": conv3d_forward, "conv3d_backward": conv3d_backward,
            "conv_transpose3d_forward": conv_transpose3d_forward,
            "conv_transpose3d_backward": conv_transpose3d_backward}


_numpy_primitives = make_conv3d_primitives(NUMPY_KERNELS3D)
conv3d_forward = _numpy_primitives["conv3d_forward"]
conv3d_backward = _numpy_primitives["conv3d_backward"]
conv_transpose3d_forward = _numpy_primitives["conv_transpose3d_forward"]
conv_transpose3d_backward = _numpy_primitives["conv_transpose3d_backward"]

"""The volume primitives of the numba-cuda backend (host side): which Numba-CUDA kernels of
kernels/cuda_vol.py run, around which GEMMs. unet_np/backends/numba_cuda_backend.py puts them in its
table, beside the 2-D convolutions of numba_cuda_conv.py (ConvOps), whose GEMM steps these share.

NumPy references (same arguments, same results): unet_np/nn/conv3d_reference.py (conv3d_*,
conv_transpose3d_*), unet_np/nn/pool.py maxpool3d_*, unet_np/nn/upsample.py upsample_trilinear3d_* and
upsample_nearest3d_*, unet_np/nn/concat.py pad3d_* and center_crop_* (4-D and 5-D).

    conv3d              cols = vol2col(x) (C*kd*kh*kw, N*Do*Ho*Wo), then ConvOps's GEMMs exactly as
                        conv2d's im2col path: y[n] = W @ cols[:, n-th block] (+ bias in the GEMM's
                        output pass); dW = sum_n dY[n] @ cols[:, n-th block]^T; dx = col2vol(W^T @ dy).
                        A 1x1x1 stride-1 unpadded kernel skips the columns: y[n] = W @ x[n].
    transposed conv3d   the adjoint: y = col2vol(W^T @ X) + b (bias in col2vol's pass);
                        dx = W @ vol2col(dy);  dW = X @ vol2col(dy)^T
    maxpool3d           one thread per window (argmax kept, int32), backward a gather (no atomics)
    upsample 3-D        trilinear (align_corners False or True) and nearest, backward gathers
    pad3d               constant: fill + copy_box; reflect: one index map per axis, backward a gather
    center_crop         copy_box on a 4-D view (N*C, D, H, W) of a volume ((N, C, H, W) of an image)

activation='relu' (conv3d_forward; the backend lists 'conv3d_relu' in ``fused``), as conv2d's: the ReLU
in the GEMM's output pass, and the backward masks dy where y <= 0 first (ConvOps.relu_mask). Caches
stay on the device and keep the convolution's input, never a column buffer (the backward rebuilds it
with one vol2col pass).
"""
import math

import numpy as np

from ..nn.concat import PAD_MODES
from ..nn.conv3d_reference import conv_geometry, transpose_geometry
from ..nn.pool import pool_output_size
from ..nn.shapes import pair, scale_pair
from .numba_cuda_conv import flat


def as_box(shape):
    """A 4-D view shape (lead, A, B, C) of an array with >= 3 axes: its last three axes kept, the
    others folded into the first (what copy_box_kernel takes)."""
    shape = tuple(int(s) for s in shape)
    return (int(np.prod(shape[:-3], dtype=np.int64)),) + shape[-3:]


class VolOps:
    """The 3-D primitives of the numba-cuda backend, and the copies (crop, constant pad, concat's)
    that serve every rank. conv: the backend's ConvOps (its dev, GEMM module and channel_reduce)."""

    def __init__(self, conv):
        from ..kernels import cuda_elementwise, cuda_launch, cuda_vol
        self.conv, self.dev, self.gemm = conv, conv.dev, conv.gemm
        # modules, not their functions: the checks count launches by replacing module attributes
        self.kvol, self.ew = cuda_vol, cuda_elementwise
        self.grid = cuda_launch.grid_1d

    def launch(self, kernel, n, *args):
        blocks, threads = self.grid(n)
        kernel[blocks, threads](*args)

    # -- copies ------------------------------------------------------------------------------------------
    def copy_box(self, src, dst, box, s_off, d_off):
        """dst[n, d_off + (c, h, w)] = src[n, s_off + (c, h, w)] over box (N, C, H, W); src and dst 4-D
        (views) device arrays (cuda_elementwise.copy_box_kernel)."""
        self.launch(self.ew.copy_box_kernel, int(np.prod(box)), flat(src), flat(dst), tuple(box),
                    tuple(src.shape[1:]), tuple(s_off), tuple(dst.shape[1:]), tuple(d_off))

    def zeros(self, shape, dtype):
        out = self.dev.empty(shape, dtype)
        self.launch(self.ew.fill_kernel, out.size, flat(out), 0.0)
        return out

    def center_crop_forward(self, x, size):
        """y = the centre (h, w) or (d, h, w) of x's trailing axes, front offsets (n - m) // 2, as
        concat.center_crop_forward. x: (N, C, H, W) or (N, C, D, H, W) -> (y, cache)."""
        dev = self.dev
        size = tuple(int(m) for m in size)
        shape = tuple(int(s) for s in x.shape)
        k = len(size)
        offsets = tuple((n - m) // 2 for n, m in zip(shape[-k:], size))
        x_d = dev.put(x)
        y = dev.empty(shape[:-k] + size, x_d.dtype)
        pad = (0,) * (3 - k)
        self.copy_box(x_d.reshape(as_box(shape)), y.reshape(as_box(y.shape)), as_box(y.shape),
                      pad + offsets, (0, 0, 0))
        return dev.get(y), (shape, offsets)

    def center_crop_backward(self, dy, cache):
        """dx = dy placed back where the crop came from, zero elsewhere."""
        shape, offsets = cache
        dy_d = self.dev.put(dy)
        dx = self.zeros(shape, dy_d.dtype)
        pad = (0,) * (3 - len(offsets))
        self.copy_box(dy_d.reshape(as_box(dy_d.shape)), dx.reshape(as_box(shape)), as_box(dy_d.shape),
                      (0, 0, 0), pad + offsets)
        return self.dev.get(dx)

    def pad3d_forward(self, x, pads, mode, value=0.0):
        """x (N, C, D, H, W), pads (left, right, top, bottom, front, back) -> (y, cache)."""
        dev = self.dev
        if mode not in PAD_MODES:
            raise ValueError(f"pad3d_forward: mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
        l, r, t, b, f, k = (int(p) for p in pads)
        N, C, D, H, W = (int(s) for s in x.shape)
        x_d = dev.put(x)
        y = dev.empty((N, C, f + D + k, t + H + b, l + W + r), x_d.dtype)
        if mode == "constant":
            self.launch(self.ew.fill_kernel, y.size, flat(y), float(value))
            self.copy_box(x_d.reshape(as_box(x_d.shape)), y.reshape(as_box(y.shape)), (N * C, D, H, W),
                          (0, 0, 0), (f, t, l))
        else:
            if min(l, r, t, b, f, k) < 0 or max(l, r) >= W or max(t, b) >= H or max(f, k) >= D:
                raise ValueError(f"pad3d_forward: reflect padding must be >= 0 and smaller than the padded "
                                 f"dimension, got pads (left, right, top, bottom, front, back) = "
                                 f"{(l, r, t, b, f, k)} for an input of {D}x{H}x{W}")
            self.launch(self.kvol.reflect_pad3d_forward_kernel, y.size, flat(x_d), flat(y),
                        (N, C, D, H, W, l, r, t, b, f, k))
        return dev.get(y), ((l, r, t, b, f, k), mode)

    def pad3d_backward(self, dy, cache):
        """dy (N, C, f+D+k, t+H+b, l+W+r) -> dx (N, C, D, H, W)."""
        (l, r, t, b, f, k), mode = cache
        N, C, Dp, Hp, Wp = (int(s) for s in dy.shape)
        D, H, W = Dp - f - k, Hp - t - b, Wp - l - r
        dy_d = self.dev.put(dy)
        dx = self.dev.empty((N, C, D, H, W), dy_d.dtype)
        if mode == "constant":
            self.copy_box(dy_d.reshape(as_box(dy_d.shape)), dx.reshape(as_box(dx.shape)), (N * C, D, H, W),
                          (f, t, l), (0, 0, 0))
        else:
            self.launch(self.kvol.reflect_pad3d_backward_kernel, dx.size, flat(dy_d), flat(dx),
                        (N, C, D, H, W, l, r, t, b, f, k))
        return self.dev.get(dx)

    # -- column passes -------------------------------------------------------------------------------------
    @staticmethod
    def _geometry(shape, kernel, out, stride, lead, dilation):
        """The tuple g of vol2col_kernel / col2vol_kernel (kernels/cuda_vol.py)."""
        return tuple(int(v) for v in tuple(shape) + tuple(kernel) + tuple(out) + tuple(stride) + tuple(lead)
                     + tuple(dilation))

    def vol2col(self, x_d, kernel, out, stride, lead, dilation):
        """x (N, C, D, H, W) -> cols (C*kd*kh*kw, N*Do*Ho*Wo) on the device."""
        N, C = x_d.shape[:2]
        cols = self.dev.empty((C * math.prod(kernel), N * math.prod(out)), x_d.dtype)
        g = self._geometry(x_d.shape, kernel, out, stride, lead, dilation)
        self.launch(self.kvol.vol2col_kernel, cols.size, flat(x_d), flat(cols), g)
        return cols

    def col2vol(self, dcols, shape, kernel, out, stride, lead, dilation, bias=None):
        """dcols (C*kd*kh*kw, N*Do*Ho*Wo) -> (N, C, D, H, W) = shape [+ bias[c]] on the device."""
        vol = self.dev.empty(shape, dcols.dtype)
        g = self._geometry(shape, kernel, out, stride, lead, dilation)
        self.launch(self.kvol.col2vol_kernel, vol.size, flat(dcols), flat(vol), g,
                    bias if bias is not None else flat(vol), bias is not None)
        return vol

    # -- conv3d --------------------------------------------------------------------------------------------
    def conv3d_forward(self, x, w, b, stride=1, padding=0, dilation=1, activation=None):
        """y = act(conv3d(x, w) + b). x (N, C, D, H, W), w (O, C, kd, kh, kw), b (O,) or None; activation
        None or 'relu' (fused) -> (y, cache)."""
        dev, gm = self.dev, self.gemm
        if activation not in (None, "relu"):
            raise ValueError(f"conv3d_forward: activation must be None or 'relu', got {activation!r}")
        relu = activation == "relu"
        O, C = int(w.shape[0]), int(w.shape[1])
        if x.shape[1] != C:
            raise ValueError(f"conv3d_forward: weight expects {C} input channels, got {x.shape[1]}")
        stride, dilation, pads, out = conv_geometry(x.shape, w.shape, stride, padding, dilation)
        N, kernel = int(x.shape[0]), tuple(int(k) for k in w.shape[2:])
        lead = tuple(p[0] for p in pads)
        x_d, w_d = dev.put(x), dev.put(w, dtype=x.dtype)
        b_d = dev.put(b, dtype=x.dtype) if b is not None else None
        K, P = C * math.prod(kernel), math.prod(out)
        y = dev.empty((N, O) + out, x_d.dtype)
        pointwise = kernel == (1, 1, 1) and stride == (1, 1, 1) and pads == ((0, 0),) * 3
        if pointwise:                                      # y[n] (O, P) = W (O, C) @ x[n] (C, P)
            gm.gemm_batched(flat(w_d), flat(x_d), flat(y), O, P, C, batch=N, sa=0, bias=b_d, relu=relu)
        else:                                              # y[n] = W (O, K) @ cols[:, n*P:(n+1)*P]
            cols = self.vol2col(x_d, kernel, out, stride, lead, dilation)
            gm.gemm_batched(flat(w_d), flat(cols), flat(y), O, P, K, batch=N, ldb=N * P, sa=0, sb=P,
                            bias=b_d, relu=relu)
            del cols                                       # the backward rebuilds it
        return dev.get(y), (x_d, w_d, out, stride, lead, dilation, b is not None, pointwise,
                            y if relu else None)

    def conv3d_backward(self, dy, cache, input_grad=True):
        """dy (N, O, Do, Ho, Wo) -> (dx, dw, db); input_grad=False skips dx (None): neither its GEMM nor
        its col2vol runs."""
        dev = self.dev
        x_d, w_d, out, stride, lead, dilation, has_bias, pointwise, y_relu = cache
        N, C = x_d.shape[:2]
        O, kernel = w_d.shape[0], tuple(w_d.shape[2:])
        K, P = C * math.prod(kernel), math.prod(out)
        dy_d = dev.put(dy, dtype=w_d.dtype)
        if y_relu is not None:                             # the fused ReLU's backward
            dy_d = self.conv.relu_mask(dy_d, y_relu)
        db = dev.get(self.conv.channel_reduce(dy_d, N, O, P)) if has_bias else None
        dw = dev.empty(w_d.shape, w_d.dtype)
        if pointwise:                                      # dW = sum_n dY[n] X[n]^T, dX[n] = W^T dY[n]
            dx = self.conv.pointwise_grads(dy_d, x_d, w_d, dw, N, O, C, P, input_grad)
            return (dev.get(dx) if input_grad else None), dev.get(dw), db
        cols = self.vol2col(x_d, kernel, out, stride, lead, dilation)     # rebuilt: the cache keeps x
        # dW = sum_n dY[n] @ cols[:, n-th block]^T;  dcols[:, n-th block] = W^T @ dy[n]
        dcols = self.conv.column_grads(dy_d, w_d, cols, dw, N, O, K, P, input_grad)
        del cols
        if not input_grad:
            return None, dev.get(dw), db
        dx = self.col2vol(dcols, tuple(x_d.shape), kernel, out, stride, lead, dilation)
        return dev.get(dx), dev.get(dw), db

    # -- transposed conv3d ---------------------------------------------------------------------------------
    def conv_transpose3d_forward(self, x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
        """y = conv_transpose3d(x, w) + b. x (N, Cin, D, H, W), w (Cin, Cout, kd, kh, kw) -> (y, cache)."""
        dev = self.dev
        Cin, Cout = int(w.shape[0]), int(w.shape[1])
        if x.shape[1] != Cin:
            raise ValueError(f"conv_transpose3d_forward: weight expects {Cin} input channels, got "
                             f"{x.shape[1]}")
        stride, dilation, pads, out = transpose_geometry(x.shape, w.shape, stride, padding, output_padding,
                                                         dilation)
        N, size = int(x.shape[0]), tuple(int(s) for s in x.shape[2:])
        kernel = tuple(int(k) for k in w.shape[2:])
        lead = tuple(p[0] for p in pads)
        x_d, w_d = dev.put(x), dev.put(w, dtype=x.dtype)
        b_d = dev.put(b, dtype=x.dtype) if b is not None else None
        R, P = Cout * math.prod(kernel), math.prod(size)
        dcols = self.conv.transpose_columns(w_d, x_d, N, Cin, R, P)     # dcols[:, n-th block] = W^T @ x[n]
        y = self.col2vol(dcols, (N, Cout) + out, kernel, size, stride, lead, dilation, bias=b_d)
        return dev.get(y), (x_d, w_d, stride, lead, dilation, b is not None)

    def conv_transpose3d_backward(self, dy, cache):
        """dy (N, Cout, Dy, Hy, Wy) -> dx (N, Cin, D, H, W), dw (Cin, Cout, kd, kh, kw), db (Cout,) or
        None."""
        dev = self.dev
        x_d, w_d, stride, lead, dilation, has_bias = cache
        N, Cin = x_d.shape[:2]
        size, kernel = tuple(x_d.shape[2:]), tuple(w_d.shape[2:])
        Cout = w_d.shape[1]
        R, P = Cout * math.prod(kernel), math.prod(size)
        dy_d = dev.put(dy, dtype=w_d.dtype)
        db = dev.get(self.conv.channel_reduce(dy_d, N, Cout, math.prod(dy_d.shape[2:]))) if has_bias else None
        dx = dev.empty(x_d.shape, w_d.dtype)
        dw = dev.empty(w_d.shape, w_d.dtype)
        cols = self.vol2col(dy_d, kernel, size, stride, lead, dilation)          # (R, N*P)
        self.conv.transpose_grads(w_d, x_d, cols, dx, dw, N, Cin, R, P)        # dX = W cols, dW = X cols^T
        return dev.get(dx), dev.get(dw), db

    # -- max-pooling ---------------------------------------------------------------------------------------
    def maxpool3d_forward(self, x, kernel, stride, padding):
        """x (N, C, D, H, W) -> (y (N, C, Do, Ho, Wo), cache (argmax int32, geometry))."""
        kernel, stride = pair(kernel, "kernel", 3), pair(stride, "stride", 3)
        padding = pair(padding, "padding", 3)
        N, C, D, H, W = (int(s) for s in x.shape)
        out = tuple(pool_output_size(n, k, s, p) for n, k, s, p in zip((D, H, W), kernel, stride, padding))
        x_d = self.dev.put(x)
        y = self.dev.empty((N, C) + out, x_d.dtype)
        arg = self.dev.empty((N, C) + out, np.int32)
        g = (N, C, D, H, W) + out + kernel + stride + padding
        self.launch(self.kvol.maxpool3d_forward_kernel, y.size, flat(x_d), flat(y), flat(arg), g)
        return self.dev.get(y), (arg, g)

    def maxpool3d_backward(self, dy, cache):
        arg, g = cache
        dy_d = self.dev.put(dy)
        dx = self.dev.empty(g[:5], dy_d.dtype)
        self.launch(self.kvol.maxpool3d_backward_kernel, dx.size, flat(dy_d), flat(arg), flat(dx), g)
        return self.dev.get(dx)

    # -- upsampling ----------------------------------------------------------------------------------------
    def _upsample(self, kernel, x, scale, *flags):
        sd, sh, sw = scale
        N, C, D, H, W = (int(s) for s in x.shape)
        x_d = self.dev.put(x)
        y = self.dev.empty((N, C, D * sd, H * sh, W * sw), x_d.dtype)
        self.launch(kernel, y.size, flat(x_d), flat(y), (N, C, D, H, W, sd, sh, sw), *flags)
        return self.dev.get(y)

    def _upsample_back(self, kernel, dy, scale, *flags):
        sd, sh, sw = scale
        N, C, Do, Ho, Wo = (int(s) for s in dy.shape)
        D, H, W = Do // sd, Ho // sh, Wo // sw
        dy_d = self.dev.put(dy)
        dx = self.dev.empty((N, C, D, H, W), dy_d.dtype)
        self.launch(kernel, dx.size, flat(dy_d), flat(dx), (N, C, D, H, W, sd, sh, sw), *flags)
        return self.dev.get(dx)

    def upsample_trilinear3d_forward(self, x, scale, align_corners=False):
        """x (N, C, D, H, W) -> (y (N, C, sd*D, sh*H, sw*W), cache (scale, align_corners))."""
        scale = scale_pair(scale, dims=3)
        corners = bool(align_corners)
        return self._upsample(self.kvol.upsample_trilinear3d_forward_kernel, x, scale, corners), \
            (scale, corners)

    def upsample_trilinear3d_backward(self, dy, cache):
        scale, corners = cache
        return self._upsample_back(self.kvol.upsample_trilinear3d_backward_kernel, dy, scale, corners)

    def upsample_nearest3d_forward(self, x, scale):
        scale = scale_pair(scale, dims=3)
        return self._upsample(self.kvol.upsample_nearest3d_forward_kernel, x, scale), scale

    def upsample_nearest3d_backward(self, dy, cache):
        return self._upsample_back(self.kvol.upsample_nearest3d_backward_kernel, dy, cache)

    def table(self):
        """name -> primitive, for the backend's table."""
        names = ("conv3d_forward", "conv3d_backward", "conv_transpose3d_forward", "conv_transpose3d_backward",
                 "maxpool3d_forward", "maxpool3d_backward", "upsample_trilinear3d_forward",
                 "upsample_trilinear3d_backward", "upsample_nearest3d_forward", "upsample_nearest3d_backward",
                 "pad3d_forward", "pad3d_backward", "center_crop_forward", "center_crop_backward")
        return {name: getattr(self, name) for name in names}

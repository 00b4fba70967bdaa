"""The 3-D primitives of the cupy backend (host side): which kernels of kernels/cuda/vol.cu (and of pool.cu,
upsample.cu: maxpool3d_*, trilinear3d_*, nearest3d_*) run, around which GEMMs.
unet_np/backends/cupy_backend.py's CudaKernels inherits them, beside kernels/cupy_conv.py's
2-D convolutions (whose plumbing, _launch / _fn / _c / _reduce / _matmul / _bias_act / _relu_mask /
_window, they use).

NumPy references, same arguments and results: unet_np/nn/conv3d_reference.py (conv3d_forward_reference,
conv3d_backward_reference, conv_transpose3d_forward_reference, conv_transpose3d_backward_reference),
unet_np/nn/pool.py (maxpool3d_*), unet_np/nn/upsample.py (upsample_trilinear3d_*, upsample_nearest3d_*),
unet_np/nn/concat.py (pad3d_*, center_crop_*). The numba CPU backend runs the same tiles with
kernels/cpu_conv3d.py's vol2col_band / col2vol_band (driver: unet_np/nn/conv3d_fast.py).

    conv3d, general        per tile of columns (samples n0..n1, output depths d0..d1):
                           cols = vol2col(x) (C*kd*kh*kw, Mt);  Y = W @ cols (one cuBLAS GEMM);
                           y[n0:n1, :, d0:d1] = Y + b (ReLU fused when asked; tile_to_vol)
        backward           dY = vol_to_tile(dy);  dW += dY @ colsT (colsT the tile's columns written
                           transposed, contiguous, as the 2-D code);  dx = col2vol(W^T @ dY), the
                           later depth bands of a sample adding onto the first (accumulate)
    conv3d, 1x1x1          no column buffer: one batched GEMM on the (N, C, D*H*W) arrays
    conv_transpose3d       its adjoint, tiled over the INPUT's samples and depths:
                           y = col2vol(W^T @ vol_to_tile(x)) + b;  dX = W @ vol2col(dy);
                           dW += X @ vol2col(dy)^T

A tile's column buffer holds at most ``vol_tile_elements`` values (an attribute; the whole batch when it
fits, else fewer samples, else one sample in bands of output depth slices, at least one slice), so a
64^3 volume never needs its whole 27x buffer. The forward keeps its INPUT (and y when the ReLU is
fused), never a column buffer: the backward rebuilds the columns tile by tile.

activation='relu' (conv3d_forward only, as conv2d_forward's; backend.fused holds 'conv3d_relu'):
y = max(conv + b, 0) in the output pass, and the backward masks dy where y <= 0 first.
"""
import numpy as np

from unet_np.nn.conv3d_reference import conv_geometry, transpose_geometry
from unet_np.nn.pool import pool_output_size
from unet_np.nn.shapes import pair, scale_pair

from .cupy_conv import float_dtype, kernel_int

_i = kernel_int

# The most values a tile's column buffer holds: 2^27 (512 MiB in float32, 1 GiB in float64).
VOL_TILE_ELEMENTS = 1 << 27


def vol_tiles(N, Do, per_slice, budget):
    """(n0, n1, d0, d1) tiles of the (sample, output depth) grid whose column buffer (per_slice values
    per sample and depth slice) stays within budget: the whole batch, else groups of samples at full
    depth, else one sample in bands of output depth slices (at least one slice: a slice never splits)."""
    per_sample = per_slice * Do
    if per_sample * N <= budget:
        return [(0, N, 0, Do)]
    if per_sample <= budget:
        step = budget // per_sample
        return [(n, min(N, n + step), 0, Do) for n in range(0, N, step)]
    band = max(1, budget // max(1, per_slice))
    return [(n, n + 1, d, min(Do, d + band)) for n in range(N) for d in range(0, Do, band)]


class Volumes:
    """The 3-D primitives (and center_crop for 4-D and 5-D arrays). Needs, from the class it is mixed
    into: xp, _launch, _fn, _c, _reduce, _matmul, _bias_act, _relu_mask and _window (CudaKernels)."""

    vol_tile_elements = VOL_TILE_ELEMENTS

    # -- the memory passes of vol.cu ----------------------------------------------------------------
    def _vol2col(self, img, geom, d0, Dt, transposed=False):
        """img (Nt, C, D, H, W) -> the tile's cols (C*kd*kh*kw, Nt*Dt*Ho*Wo), or transposed its
        transpose (Nt*Dt*Ho*Wo, C*kd*kh*kw), contiguous. geom: (C, D, H, W, kd, kh, kw, Do, Ho, Wo,
        sd, sh, sw, pd, ph, pw, dd, dh, dw) of the image and the window grid."""
        Nt = img.shape[0]
        C, kd, kh, kw, Ho, Wo = geom[0], geom[4], geom[5], geom[6], geom[8], geom[9]
        K, M = C * kd * kh * kw, Nt * Dt * Ho * Wo
        cols = self.xp.empty((M, K) if transposed else (K, M), dtype=img.dtype)
        self._launch("vol", "vol2col", img.dtype, C * M, img, cols, _i(transposed), _i(Nt), *map(_i, geom),
                     _i(d0), _i(Dt))
        return cols

    def _col2vol(self, cols, out, geom, d0, Dt, bias=None):
        """out (Nt, C, D, H, W) = col2vol of the tile's cols (+ bias), or += it for a later depth band
        (d0 > 0) of the same samples."""
        self._launch("vol", "col2vol", cols.dtype, out.size, cols, out, cols if bias is None else bias,
                     _i(bias is not None), _i(d0 > 0), _i(out.shape[0]), *map(_i, geom), _i(d0), _i(Dt))

    def _tile_to_vol(self, src, dst, d0, Dt, bias=None, relu=False):
        """dst (Nt, A, Do, P...)[:, :, d0:d0+Dt] = act(src (A, Nt*Dt*P) + bias[a]), in place."""
        Nt, A, Do = dst.shape[:3]
        P = dst.size // (Nt * A * Do)
        self._launch("vol", "tile_to_vol", src.dtype, src.size, src, dst, src if bias is None else bias,
                     _i(bias is not None), _i(relu), _i(A), _i(Nt), _i(Dt), _i(Do), _i(P), _i(d0))

    def _vol_to_tile(self, src, d0, Dt):
        """src (Nt, A, Do, P...)[:, :, d0:d0+Dt] -> (A, Nt*Dt*P), contiguous."""
        Nt, A, Do = src.shape[:3]
        P = src.size // (Nt * A * Do)
        dst = self.xp.empty((A, Nt * Dt * P), dtype=src.dtype)
        self._launch("vol", "vol_to_tile", src.dtype, dst.size, src, dst, _i(A), _i(Nt), _i(Dt), _i(Do), _i(P),
                     _i(d0))
        return dst

    def _tiles(self, N, grid, K):
        """The tiles over (N, the window grid's depth) for a K-row column buffer: see vol_tiles."""
        Do, Ho, Wo = grid
        return vol_tiles(N, Do, K * Ho * Wo, int(self.vol_tile_elements))

    # -- conv3d -------------------------------------------------------------------------------------------
    def conv3d_forward(self, x, w, b, stride=1, padding=0, dilation=1, activation=None):
        """y = act(conv3d(x, w) + b). x (N, C, D, H, W), w (O, C, kd, kh, kw), b (O,) or None; activation
        None or 'relu' (fused) -> (y, cache). cache keeps x, not the columns."""
        dt = float_dtype(x, "conv3d_forward")
        if activation not in (None, "relu"):
            raise ValueError(f"conv3d_forward: activation must be None or 'relu', got {activation!r}")
        relu = activation == "relu"
        O, C = w.shape[:2]
        if x.shape[1] != C:
            raise ValueError(f"conv3d_forward: weight expects {C} input channels, got {x.shape[1]}")
        stride, dilation, pads, out = conv_geometry(x.shape, w.shape, stride, padding, dilation)
        x, w = self._c(x, dt), self._c(w, dt)
        b = None if b is None else self._c(b, dt)
        N = x.shape[0]
        kernel = tuple(w.shape[2:])
        geom = tuple(x.shape[1:]) + kernel + tuple(out) + tuple(stride) + tuple(p[0] for p in pads) + tuple(dilation)
        wm = w.reshape(O, -1)
        if kernel == (1, 1, 1) and stride == (1, 1, 1) and all(p == (0, 0) for p in pads):
            kind = "1x1"
            y3 = self._c(self._matmul(wm, x.reshape(N, C, -1)))                # (N, O, D*H*W): NCDHW
            if b is not None or relu:
                self._bias_act(y3, b, relu)
            y = y3.reshape((N, O) + tuple(out))
        else:
            kind = "cols"
            y = self.xp.empty((N, O) + tuple(out), dtype=dt)
            for n0, n1, d0, d1 in self._tiles(N, out, wm.shape[1]):
                cols = self._vol2col(x[n0:n1], geom, d0, d1 - d0)              # (C*kd*kh*kw, Mt)
                Y = self._c(self._matmul(wm, cols))                            # (O, Mt)
                del cols
                self._tile_to_vol(Y, y[n0:n1], d0, d1 - d0, bias=b, relu=relu)
        return y, (kind, x, w, b is not None, geom, y if relu else None)

    def conv3d_backward(self, dy, cache, input_grad=True):
        """dy (N, O, Do, Ho, Wo) -> dx (N, C, D, H, W), dw (O, C, kd, kh, kw), db (O,) or None.
        input_grad=False skips dx (returned as None): neither its GEMMs nor col2vol run."""
        kind, x, w, has_bias, geom, y_relu = cache
        N, C = x.shape[:2]
        O = w.shape[0]
        out = geom[7:10]
        dy = self._c(dy, x.dtype)
        if y_relu is not None:                     # the fused ReLU's backward: dy where y > 0
            dy = self._relu_mask(dy, y_relu)
        L = dy.size // (N * O)
        db = self._reduce(dy, N, O, L) if has_bias else None
        wm = w.reshape(O, -1)
        if kind == "1x1":
            dy3, x3 = dy.reshape(N, O, L), x.reshape(N, C, L)
            dw = self._c(self._matmul(dy3, x3.transpose(0, 2, 1)).sum(axis=0)).reshape(w.shape)  # sum_n dY_n X_n^T
            if not input_grad:
                return None, dw, db
            return self._c(self._matmul(wm.T, dy3)).reshape(x.shape), dw, db
        dw = None
        dx = self.xp.empty(x.shape, dtype=x.dtype) if input_grad else None
        for n0, n1, d0, d1 in self._tiles(N, out, wm.shape[1]):
            dyt = self._vol_to_tile(dy[n0:n1], d0, d1 - d0)                    # (O, Mt)
            cols_t = self._vol2col(x[n0:n1], geom, d0, d1 - d0, transposed=True)   # (Mt, C*kd*kh*kw)
            g = self._c(self._matmul(dyt, cols_t))                              # (O, C*kd*kh*kw)
            del cols_t
            dw = g if dw is None else dw + g
            if input_grad:
                dcols = self._c(self._matmul(wm.T, dyt))                       # (C*kd*kh*kw, Mt)
                self._col2vol(dcols, dx[n0:n1], geom, d0, d1 - d0)
        return dx, dw.reshape(w.shape), db

    # -- transposed convolution ---------------------------------------------------------------------------
    def conv_transpose3d_forward(self, x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
        """y = conv_transpose3d(x, w) + b. x (N, Cin, D, H, W), w (Cin, Cout, kd, kh, kw) -> (y, cache).
        The image of the vol2col/col2vol pair is y; the window grid is x's D x H x W."""
        dt = float_dtype(x, "conv_transpose3d_forward")
        Cin, Cout = w.shape[:2]
        if x.shape[1] != Cin:
            raise ValueError(f"conv_transpose3d_forward: weight expects {Cin} input channels, got {x.shape[1]}")
        stride, dilation, pads, out = transpose_geometry(x.shape, w.shape, stride, padding, output_padding,
                                                         dilation)
        x, w = self._c(x, dt), self._c(w, dt)
        b = None if b is None else self._c(b, dt)
        N = x.shape[0]
        grid = tuple(x.shape[2:])
        kernel = tuple(w.shape[2:])
        geom = (Cout,) + tuple(out) + kernel + grid + tuple(stride) + tuple(p[0] for p in pads) + tuple(dilation)
        wm = w.reshape(Cin, -1)
        if kernel == (1, 1, 1) and stride == (1, 1, 1) and all(p == (0, 0) for p in pads) and tuple(out) == grid:
            y3 = self._c(self._matmul(wm.T, x.reshape(N, Cin, -1)))          # (N, Cout, D*H*W)
            if b is not None:
                self._bias_act(y3, b)
            return y3.reshape((N, Cout) + tuple(out)), ("1x1", x, w, b is not None, geom)
        y = self.xp.empty((N, Cout) + tuple(out), dtype=dt)
        for n0, n1, d0, d1 in self._tiles(N, grid, wm.shape[1]):
            xt = self._vol_to_tile(x[n0:n1], d0, d1 - d0)                      # (Cin, Mt)
            dcols = self._c(self._matmul(wm.T, xt))                             # (Cout*kd*kh*kw, Mt)
            del xt
            self._col2vol(dcols, y[n0:n1], geom, d0, d1 - d0, bias=b)
        return y, ("cols", x, w, b is not None, geom)

    def conv_transpose3d_backward(self, dy, cache):
        """dy (N, Cout, Dy, Hy, Wy) -> dx (N, Cin, D, H, W), dw (Cin, Cout, kd, kh, kw), db (Cout,) or None."""
        kind, x, w, has_bias, geom = cache
        N, Cin = x.shape[:2]
        Cout = w.shape[1]
        grid = tuple(x.shape[2:])
        dy = self._c(dy, x.dtype)
        wm = w.reshape(Cin, -1)
        db = self._reduce(dy, N, Cout, dy.size // (N * Cout)) if has_bias else None
        if kind == "1x1":
            dy3, x3 = dy.reshape(N, Cout, -1), x.reshape(N, Cin, -1)
            dx = self._c(self._matmul(wm, dy3)).reshape(x.shape)                # (N, Cin, D*H*W)
            dw = self._c(self._matmul(x3, dy3.transpose(0, 2, 1)).sum(axis=0))  # (Cin, Cout)
            return dx, dw.reshape(w.shape), db
        dx = self.xp.empty(x.shape, dtype=x.dtype)
        dw = None
        for n0, n1, d0, d1 in self._tiles(N, grid, wm.shape[1]):
            # dW = X @ cols^T with the columns written transposed (contiguous), then the columns again
            # for dX = W @ cols: as conv_transpose2d_backward, one column buffer alive at a time
            xt = self._vol_to_tile(x[n0:n1], d0, d1 - d0)                      # (Cin, Mt)
            cols_t = self._vol2col(dy[n0:n1], geom, d0, d1 - d0, transposed=True)   # (Mt, Cout*kd*kh*kw)
            g = self._c(self._matmul(xt, cols_t))                               # (Cin, Cout*kd*kh*kw)
            del cols_t, xt
            dw = g if dw is None else dw + g
            cols = self._vol2col(dy[n0:n1], geom, d0, d1 - d0)                 # (Cout*kd*kh*kw, Mt)
            dxt = self._c(self._matmul(wm, cols))                               # (Cin, Mt)
            del cols
            self._tile_to_vol(dxt, dx[n0:n1], d0, d1 - d0)
        return dx, dw.reshape(w.shape), db

    # -- max-pooling --------------------------------------------------------------------------------------
    def maxpool3d_forward(self, x, kernel, stride, padding):
        """x (N, C, D, H, W) -> (y (N, C, Do, Ho, Wo), cache with the argmax (int32))."""
        kernel, stride = pair(kernel, "kernel", 3), pair(stride, "stride", 3)
        padding = pair(padding, "padding", 3)
        dt = float_dtype(x, "maxpool3d_forward")
        x = self._c(x)
        N, C, D, H, W = x.shape
        out = tuple(pool_output_size(n, k, s, p) for n, k, s, p in zip((D, H, W), kernel, stride, padding))
        y = self.xp.empty((N, C) + out, dtype=dt)
        arg = self.xp.empty((N, C) + out, dtype=np.int32)
        self._launch("pool", "maxpool3d_fwd", dt, y.size, x, y, arg, _i(N * C), _i(D), _i(H), _i(W),
                     *map(_i, out + kernel + stride + padding))
        return y, (arg, tuple(x.shape), kernel, stride, padding)

    def maxpool3d_backward(self, dy, cache):
        arg, shape, kernel, stride, padding = cache
        dt = float_dtype(dy, "maxpool3d_backward")
        dy = self._c(dy)
        N, C, D, H, W = shape
        dx = self.xp.empty(shape, dtype=dt)
        self._launch("pool", "maxpool3d_bwd", dt, dx.size, dy, arg, dx, _i(N * C), _i(D), _i(H), _i(W),
                     *map(_i, tuple(arg.shape[2:]) + kernel + stride + padding))
        return dx

    # -- upsampling ---------------------------------------------------------------------------------------
    def _up3d(self, name, src, shape, small, scale, *extra):
        """An upsample.cu kernel (trilinear3d_*, nearest3d_*) from src to a new array of ``shape``, one
        thread per voxel of the result; ``small`` is the (D, H, W) of the smaller volume (the forward's input, the backward's
        result), the kernels' geometry."""
        dt = float_dtype(src, name)
        src = self._c(src)
        out = self.xp.empty(shape, dtype=dt)
        N, C = shape[:2]
        self._launch("upsample", name, dt, out.size, src, out, _i(N * C), *map(_i, tuple(small) + tuple(scale)),
                     *extra)
        return out

    def upsample_trilinear3d_forward(self, x, scale, align_corners=False):
        """x (N, C, D, H, W) -> y (N, C, sd*D, sh*H, sw*W); align_corners as F.interpolate's."""
        scale = scale_pair(scale, dims=3)
        small = tuple(x.shape[2:])
        shape = tuple(x.shape[:2]) + tuple(s * n for s, n in zip(scale, small))
        y = self._up3d("trilinear3d_fwd", x, shape, small, scale, _i(bool(align_corners)))
        return y, (scale, bool(align_corners))

    def upsample_trilinear3d_backward(self, dy, cache):
        scale, align = cache
        small = tuple(n // s for s, n in zip(scale, dy.shape[2:]))
        return self._up3d("trilinear3d_bwd", dy, tuple(dy.shape[:2]) + small, small, scale, _i(align))

    def upsample_nearest3d_forward(self, x, scale):
        scale = scale_pair(scale, dims=3)
        small = tuple(x.shape[2:])
        shape = tuple(x.shape[:2]) + tuple(s * n for s, n in zip(scale, small))
        return self._up3d("nearest3d_fwd", x, shape, small, scale), scale

    def upsample_nearest3d_backward(self, dy, cache):
        small = tuple(n // s for s, n in zip(cache, dy.shape[2:]))
        return self._up3d("nearest3d_bwd", dy, tuple(dy.shape[:2]) + small, small, cache)

    # -- windows: centre crop (4-D and 5-D), constant and reflect padding of volumes ----------------------
    def _window3d(self, src, out_dhw, offsets, fill=0.0):
        """dst[..., z, h, w] = src[..., z + oz, h + oh, w + ow] inside src, else fill."""
        dt = np.dtype(src.dtype)
        dst = self.xp.empty(tuple(src.shape[:-3]) + tuple(out_dhw), dtype=dt)
        NC = src.size // int(np.prod(src.shape[-3:]))
        self._launch("vol", "window3d_copy", dt, dst.size, src, dst, _i(NC),
                     *map(_i, tuple(src.shape[-3:]) + tuple(out_dhw) + tuple(offsets)), dt.type(fill))
        return dst

    def center_crop_forward(self, x, size):
        """The centre (h, w) of the last two axes or (d, h, w) of the last three, as a copy."""
        float_dtype(x, "center_crop_forward")
        x = self._c(x)
        size = tuple(int(s) for s in size)
        full = tuple(x.shape[x.ndim - len(size):])
        offsets = tuple((n - m) // 2 for n, m in zip(full, size))
        if len(size) == 2:
            y = self._window(x, size, *offsets)
        else:
            y = self._window3d(x, size, offsets)
        return y, (tuple(x.shape), offsets)

    def center_crop_backward(self, dy, cache):
        shape, offsets = cache
        float_dtype(dy, "center_crop_backward")
        dy = self._c(dy)
        full = shape[len(shape) - len(offsets):]
        if len(offsets) == 2:
            return self._window(dy, full, -offsets[0], -offsets[1])
        return self._window3d(dy, full, tuple(-o for o in offsets))

    def pad3d_forward(self, x, pads, mode, value=0.0):
        """Pad the last three axes by pads = (left, right, top, bottom, front, back); mode 'constant'
        (the border is value) or 'reflect' (each pad smaller than its axis)."""
        l, r, t, b, f, k = (int(v) for v in pads)
        dt = float_dtype(x, "pad3d_forward")
        x = self._c(x)
        N, C, D, H, W = x.shape
        shape = (f + D + k, t + H + b, l + W + r)
        if mode == "constant":
            y = self._window3d(x, shape, (-f, -t, -l), fill=value)
        elif mode == "reflect":
            if min(pads) < 0 or max(l, r) >= W or max(t, b) >= H or max(f, k) >= D:
                raise ValueError(f"pad3d_forward: reflect padding must be >= 0 and smaller than the padded "
                                 f"dimension, got pads (left, right, top, bottom, front, back) = "
                                 f"{(l, r, t, b, f, k)} for an input of {D}x{H}x{W}")
            y = self.xp.empty((N, C) + shape, dtype=dt)
            self._launch("vol", "reflect3d_pad_fwd", dt, y.size, x, y, _i(N * C), _i(D), _i(H), _i(W), _i(f),
                         _i(k), _i(t), _i(b), _i(l), _i(r))
        else:
            raise ValueError(f"pad3d_forward: mode must be one of reflect, constant, got {mode!r}")
        return y, ((l, r, t, b, f, k), mode)

    def pad3d_backward(self, dy, cache):
        (l, r, t, b, f, k), mode = cache
        dt = float_dtype(dy, "pad3d_backward")
        dy = self._c(dy)
        N, C, Dp, Hp, Wp = dy.shape
        D, H, W = Dp - f - k, Hp - t - b, Wp - l - r
        if mode == "constant":
            return self._window3d(dy, (D, H, W), (f, t, l))
        dx = self.xp.empty((N, C, D, H, W), dtype=dt)
        self._launch("vol", "reflect3d_pad_bwd", dt, dx.size, dy, dx, _i(N * C), _i(D), _i(H), _i(W), _i(f),
                     _i(k), _i(t), _i(b), _i(l), _i(r))
        return dx

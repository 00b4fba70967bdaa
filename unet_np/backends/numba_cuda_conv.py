"""The convolutions of the numba-cuda backend (host side): which Numba-CUDA kernels run, around which
GEMMs. unet_np/backends/numba_cuda_backend.py puts them in its table.

NumPy reference: unet_np/nn/conv_reference.py (conv2d_forward_reference, conv2d_backward_reference,
conv_transpose2d_forward_reference, conv_transpose2d_backward_reference): same arguments, same
results. The twin on the cupy backend is kernels/cupy_conv.py.

    conv2d, 3x3, stride 1  Winograd F(4x4, 3x3), kernels/cuda_winograd.py (settings['winograd']):
                           the 36 position GEMMs as ONE cuda_gemm.gemm_batched launch
    conv2d, 1x1, stride 1  y[n] = W @ x[n]: one batched GEMM over the images (W shared, stride 0)
    conv2d, other          cols = im2col(x) (C*kh*kw, N*Ho*Wo);  y[n] = W @ cols[:, n-th block]
                           (one batched GEMM writing NCHW, bias and ReLU in its output pass);
                           dW = sum_n dY[n] @ cols[:, n-th block]^T (batched, summed over the images);
                           dx = col2im(dcols), dcols[:, n-th block] = W^T @ dy[n] (batched)
    transposed conv        its adjoint: y = col2im(W^T @ X) + b;  dx = W @ im2col(dy);  dW = X @ im2col(dy)^T

GEMMs: all cuda_gemm.gemm_batched (batched, layout-specialised, register-blocked), the operands
strided matrices per image; the weight gradients with sum_batch (partial products per image, then one
summing pass). cuda_gemm.gemm (the layout-tuple kernel) stays as the general, readable version. The
GEMM steps around the columns (pointwise_grads, column_grads, transpose_columns, transpose_grads) serve
the 3-D convolutions of numba_cuda_vol.py (vol2col / col2vol around the same GEMMs) as well.

activation='relu' (conv2d_forward only; not in the reference table's signature: a layer asks
``backend.supports('conv2d_relu')`` first): y = max(conv + b, 0) in the pass that writes y (the
Winograd output transform, or the GEMM's output pass), and the backward first masks dy where y <= 0
(the ReLU's backward: on the Winograd path inside the transforms that read dy, elsewhere in one pass),
so a Conv2d + ReLU pair writes its activation once.

A convolution's cache keeps its INPUT, never a column buffer: the backward rebuilds the columns with
one im2col pass (one buffer per layer would hold 15 GiB at batch 16, 256x256).
"""
from ..nn.shapes import padding_pairs, pair


def flat(d):
    """A device array as a flat (1-D) view: the kernels take flat arrays."""
    return d.reshape(-1)


class ConvOps:
    """conv2d_forward / conv2d_backward / conv_transpose2d_forward / conv_transpose2d_backward of the
    numba-cuda backend. dev: the backend's device-array helper (put, empty, get); settings: the
    backend's settings dict (read at every call: 'winograd' is 'auto', 'always' or 'never');
    channel_reduce(a, N, C, plane): per-channel sums of an (N, C, plane) device array."""

    def __init__(self, dev, settings, channel_reduce):
        from ..kernels import (cuda_conv, cuda_elementwise, cuda_gemm, cuda_launch,
                               cuda_winograd)
        self.dev, self.settings, self.channel_reduce = dev, settings, channel_reduce
        # modules, not their functions: the checks count launches by replacing module attributes
        self.kconv, self.ew, self.gemm, self.wino = cuda_conv, cuda_elementwise, cuda_gemm, cuda_winograd
        self.grid = cuda_launch.grid_1d

    def _launch(self, kernel, n, *args):
        blocks, threads = self.grid(n)
        kernel[blocks, threads](*args)

    # -- column passes -------------------------------------------------------------------------------
    def _im2col(self, x_d, N, C, H, W, kh, kw, Ho, Wo, stride, lead, dilation):
        cols = self.dev.empty((C * kh * kw, N * Ho * Wo), x_d.dtype)
        g = (N, C, H, W, kh, kw, Ho, Wo, stride[0], stride[1], lead[0], lead[1], dilation[0], dilation[1])
        self._launch(self.kconv.im2col_kernel, cols.size, flat(x_d), flat(cols), g)
        return cols

    def _col2im(self, dcols, shape, kh, kw, Ho, Wo, stride, lead, dilation, bias=None):
        N, C, H, W = shape
        out = self.dev.empty(shape, dcols.dtype)
        g = (N, C, H, W, kh, kw, Ho, Wo, stride[0], stride[1], lead[0], lead[1], dilation[0], dilation[1])
        self._launch(self.kconv.col2im_kernel, N * C * H * W, flat(dcols), flat(out), g,
                     bias if bias is not None else flat(out), bias is not None)
        return out

    def relu_mask(self, dy_d, y_d):
        """dy where y > 0, else dy * 0: the backward of a fused ReLU (relu_backward_kernel)."""
        dx = self.dev.empty(y_d.shape, y_d.dtype)
        self._launch(self.ew.relu_backward_kernel, dx.size, flat(dy_d), flat(y_d), flat(dx))
        return dx

    # -- the GEMM steps around the columns, shared with the 3-D convolutions (numba_cuda_vol.py) -------
    def pointwise_grads(self, dy_d, x_d, w_d, dw, N, O, C, P, input_grad):
        """A 1x1 (1x1x1) convolution's dW = sum_n dY[n] X[n]^T into dw; returns dX[n] = W^T dY[n] (shaped
        as x_d), or None when input_grad is False."""
        gm = self.gemm
        gm.gemm_batched(flat(dy_d), flat(x_d), flat(dw), O, C, P, batch=N, trans_b=True, sum_batch=True)
        if not input_grad:
            return None
        dx = self.dev.empty(x_d.shape, w_d.dtype)
        gm.gemm_batched(flat(w_d), flat(dy_d), flat(dx), C, P, O, batch=N, trans_a=True, sa=0)
        return dx

    def column_grads(self, dy_d, w_d, cols, dw, N, O, K, P, input_grad):
        """dW = sum_n dY[n] (O, P) @ cols[:, n-th block]^T (P, K) into dw (the columns read transposed);
        returns dcols (K, N*P), dcols[:, n-th block] = W^T @ dy[n], or None when input_grad is False."""
        gm = self.gemm
        gm.gemm_batched(flat(dy_d), flat(cols), flat(dw), O, K, P, batch=N, trans_b=True, ldb=N * P, sb=P,
                        sum_batch=True)
        if not input_grad:
            return None
        dcols = self.dev.empty((K, N * P), w_d.dtype)
        gm.gemm_batched(flat(w_d), flat(dy_d), flat(dcols), K, P, O, batch=N, trans_a=True, ldc=N * P,
                        sa=0, sc=P)
        return dcols

    def transpose_columns(self, w_d, x_d, N, Cin, R, P):
        """A transposed convolution's dcols (R, N*P), dcols[:, n-th block] = W^T @ x[n] (col2im / col2vol
        of it is the output)."""
        dcols = self.dev.empty((R, N * P), x_d.dtype)
        self.gemm.gemm_batched(flat(w_d), flat(x_d), flat(dcols), R, P, Cin, batch=N, trans_a=True,
                               ldc=N * P, sa=0, sc=P)
        return dcols

    def transpose_grads(self, w_d, x_d, cols, dx, dw, N, Cin, R, P):
        """A transposed convolution's dX[n] = W @ cols[:, n-th block] into dx and dW = sum_n X[n] @
        cols[:, n-th block]^T into dw, cols = im2col(dy) (or vol2col(dy)) (R, N*P)."""
        gm = self.gemm
        gm.gemm_batched(flat(w_d), flat(cols), flat(dx), Cin, P, R, batch=N, ldb=N * P, sa=0, sb=P)
        gm.gemm_batched(flat(x_d), flat(cols), flat(dw), Cin, R, P, batch=N, trans_b=True, ldb=N * P, sb=P,
                        sum_batch=True)

    @staticmethod
    def _pointwise(kh, kw, stride, pads):
        return (kh, kw) == (1, 1) and stride == (1, 1) and pads == ((0, 0), (0, 0))

    # -- conv2d ---------------------------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride=1, padding=0, dilation=1, activation=None):
        """y = act(conv2d(x, w) + b). x (N, C, H, W), w (O, C, kh, kw), b (O,) or None; activation None
        or 'relu' (fused) -> (y, cache)."""
        dev, gm = self.dev, self.gemm
        if activation not in (None, "relu"):
            raise ValueError(f"conv2d_forward: activation must be None or 'relu', got {activation!r}")
        relu = activation == "relu"
        stride, dilation, pads = pair(stride), pair(dilation), padding_pairs(padding)
        N, C, H, W = x.shape
        O, C2, kh, kw = w.shape
        if C2 != C:
            raise ValueError(f"conv2d_forward: weight expects {C2} input channels, got {C}")
        Ho = (H + sum(pads[0]) - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        Wo = (W + sum(pads[1]) - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if Ho < 1 or Wo < 1:
            raise ValueError(f"conv2d_forward: kernel {kh}x{kw} (dilation {dilation}) is larger than "
                             f"the padded input {H + sum(pads[0])}x{W + sum(pads[1])}")
        x_d, w_d = dev.put(x), dev.put(w, dtype=x.dtype)
        b_d = dev.put(b, dtype=x.dtype) if b is not None else None
        lead = (pads[0][0], pads[1][0])
        K, P = C * kh * kw, Ho * Wo
        if self.wino.use_winograd(self.settings["winograd"], kh, kw, stride, dilation, C, O):
            kind = "winograd"
            y = self.wino.conv(dev, x_d, self.wino.filter_transform(dev, w_d), O, b_d, Ho, Wo, lead,
                               relu=relu)
        elif self._pointwise(kh, kw, stride, pads):         # y[n] (O, HW) = W (O, C) @ x[n] (C, HW)
            kind = "1x1"
            y = dev.empty((N, O, Ho, Wo), x_d.dtype)
            gm.gemm_batched(flat(w_d), flat(x_d), flat(y), O, P, C, batch=N, sa=0, bias=b_d, relu=relu)
        else:                                               # y[n] = W (O, K) @ cols[:, n*P:(n+1)*P]
            kind = "cols"
            cols = self._im2col(x_d, N, C, H, W, kh, kw, Ho, Wo, stride, lead, dilation)
            y = dev.empty((N, O, Ho, Wo), x_d.dtype)
            gm.gemm_batched(flat(w_d), flat(cols), flat(y), O, P, K, batch=N, ldb=N * P, sa=0, sb=P,
                            bias=b_d, relu=relu)
            del cols                                        # the backward rebuilds it (see below)
        cache = (x_d, w_d, (N, C, H, W), (Ho, Wo), stride, lead, dilation, b is not None, kind,
                 y if relu else None)
        return dev.get(y), cache

    def conv2d_backward(self, dy, cache, input_grad=True):
        """dy (N, O, Ho, Wo) -> (dx, dw, db); input_grad=False skips dx (None): neither its GEMM nor
        its col2im runs."""
        dev, wino = self.dev, self.wino
        x_d, w_d, (N, C, H, W), (Ho, Wo), stride, lead, dilation, has_bias, kind, y_relu = cache
        O, _, kh, kw = w_d.shape
        K, P = C * kh * kw, Ho * Wo
        dy_d = dev.put(dy, dtype=w_d.dtype)
        if kind == "winograd":                              # 3x3 stride 1: kernels/cuda_winograd.py
            # a fused ReLU's mask is applied where the transforms read dy; db sums Z[7]
            dw, z7 = wino.weight_grad(dev, x_d, dy_d, lead, mask=y_relu)
            TP = z7.size // O
            db = dev.get(self.channel_reduce(z7, 1, O, TP)) if has_bias else None
            if not input_grad:
                return None, dev.get(dw), db
            # dx: the forward of dy with w flipped and transposed, leading padding 2 - p
            dx = wino.conv(dev, dy_d, wino.filter_transform(dev, w_d, flip=True), C, None, H, W,
                           (2 - lead[0], 2 - lead[1]), mask=y_relu)
            return dev.get(dx), dev.get(dw), db
        if y_relu is not None:                              # the fused ReLU's backward
            dy_d = self.relu_mask(dy_d, y_relu)
        db = dev.get(self.channel_reduce(dy_d, N, O, P)) if has_bias else None
        dw = dev.empty((O, C, kh, kw), w_d.dtype)
        if kind == "1x1":                                   # dW = sum_n dY[n] X[n]^T, dX[n] = W^T dY[n]
            dx = self.pointwise_grads(dy_d, x_d, w_d, dw, N, O, C, P, input_grad)
            return (dev.get(dx) if input_grad else None), dev.get(dw), db
        # The forward kept its input, not its column buffer: one im2col pass rebuilds it.
        cols = self._im2col(x_d, N, C, H, W, kh, kw, Ho, Wo, stride, lead, dilation)
        dcols = self.column_grads(dy_d, w_d, cols, dw, N, O, K, P, input_grad)
        del cols
        if not input_grad:
            return None, dev.get(dw), db
        dx = self._col2im(dcols, (N, C, H, W), kh, kw, Ho, Wo, stride, lead, dilation)
        return dev.get(dx), dev.get(dw), db

    # -- transposed convolution -------------------------------------------------------------------------
    def conv_transpose2d_forward(self, x, w, b, stride=1, padding=0, output_padding=0, dilation=1):
        """y = conv_transpose2d(x, w) + b. x (N, Cin, H, W), w (Cin, Cout, kh, kw) -> (y, cache)."""
        dev, gm = self.dev, self.gemm
        stride, dilation, pads = pair(stride), pair(dilation), padding_pairs(padding)
        op = pair(output_padding)
        N, Cin, H, W = x.shape
        Cin2, Cout, kh, kw = w.shape
        if Cin2 != Cin:
            raise ValueError(f"conv_transpose2d_forward: weight expects {Cin2} input channels, got {Cin}")
        Hy = (H - 1) * stride[0] - sum(pads[0]) + dilation[0] * (kh - 1) + op[0] + 1
        Wy = (W - 1) * stride[1] - sum(pads[1]) + dilation[1] * (kw - 1) + op[1] + 1
        if Hy < 1 or Wy < 1:
            raise ValueError(f"conv_transpose2d_forward: the output would be {Hy}x{Wy}; the padding "
                             f"{pads} removes more than the {Hy + sum(pads[0])}x{Wy + sum(pads[1])} "
                             f"full output")
        x_d, w_d = dev.put(x), dev.put(w, dtype=x.dtype)
        b_d = dev.put(b, dtype=x.dtype) if b is not None else None
        lead = (pads[0][0], pads[1][0])
        R, P = Cout * kh * kw, H * W
        if self._pointwise(kh, kw, stride, pads) and (Hy, Wy) == (H, W):   # y[n] = W^T @ x[n] + b
            y = dev.empty((N, Cout, H, W), x_d.dtype)
            gm.gemm_batched(flat(w_d), flat(x_d), flat(y), Cout, P, Cin, batch=N, trans_a=True, sa=0,
                            bias=b_d)
            kind = "1x1"
        else:                                              # y = col2im(W^T X) + b
            dcols = self.transpose_columns(w_d, x_d, N, Cin, R, P)
            y = self._col2im(dcols, (N, Cout, Hy, Wy), kh, kw, H, W, stride, lead, dilation, bias=b_d)
            kind = "cols"
        return dev.get(y), (x_d, w_d, (N, Cin, H, W), (Hy, Wy), stride, lead, dilation, b is not None,
                            kind)

    def conv_transpose2d_backward(self, dy, cache):
        """dy (N, Cout, Hy, Wy) -> dx (N, Cin, H, W), dw (Cin, Cout, kh, kw), db (Cout,) or None."""
        dev, gm = self.dev, self.gemm
        x_d, w_d, (N, Cin, H, W), (Hy, Wy), stride, lead, dilation, has_bias, kind = cache
        _, Cout, kh, kw = w_d.shape
        R, P = Cout * kh * kw, H * W
        dy_d = dev.put(dy, dtype=w_d.dtype)
        db = dev.get(self.channel_reduce(dy_d, N, Cout, Hy * Wy)) if has_bias else None
        dx = dev.empty((N, Cin, H, W), w_d.dtype)
        dw = dev.empty((Cin, Cout, kh, kw), w_d.dtype)
        if kind == "1x1":                                  # dX[n] = W dY[n], dW = sum_n X[n] dY[n]^T
            gm.gemm_batched(flat(w_d), flat(dy_d), flat(dx), Cin, P, Cout, batch=N, sa=0)
            gm.gemm_batched(flat(x_d), flat(dy_d), flat(dw), Cin, Cout, P, batch=N, trans_b=True,
                            sum_batch=True)
            return dev.get(dx), dev.get(dw), db
        cols = self._im2col(dy_d, N, Cout, Hy, Wy, kh, kw, H, W, stride, lead, dilation)   # (R, N*P)
        self.transpose_grads(w_d, x_d, cols, dx, dw, N, Cin, R, P)
        return dev.get(dx), dev.get(dw), db


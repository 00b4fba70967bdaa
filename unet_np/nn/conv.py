"""Convolution layers: Conv2d and ConvTranspose2d.

The maths lives in two modules beside this one: conv_reference.py (the plain version: im2col, one
GEMM, col2im, with the derivation of every gradient) and conv_fast.py (tiled drivers and Winograd, the
default numpy primitives). A layer calls its backend's primitives (``self.ops``) and knows nothing of
how they are computed; the names below are re-exported so ``unet_np.nn.conv.conv2d_forward`` etc. keep
working.
"""
from . import init as _init
from .conv_fast import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,  # noqa: F401
                        conv_transpose2d_forward, make_conv_primitives)
from .conv_reference import (OPS, conv2d_backward_reference, conv2d_forward_reference,  # noqa: F401
                             conv_output_size, conv_transpose2d_backward_reference,
                             conv_transpose2d_forward_reference, conv_transpose_output_size)
from .module import Module, Parameter, check_input
from .shapes import check_int, check_pair


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------
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
        self.in_channels = check_int(name, "in_channels", in_channels, 1)
        self.out_channels = check_int(name, "out_channels", out_channels, 1)
        self.kernel_size = check_pair(name, "kernel_size", kernel_size, 1)
        self.stride = check_pair(name, "stride", stride, 1)
        self.dilation = check_pair(name, "dilation", dilation, 1)
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
            ph, pw = check_pair(name, "padding", padding, 0)
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
        self.in_channels = check_int(name, "in_channels", in_channels, 1)
        self.out_channels = check_int(name, "out_channels", out_channels, 1)
        self.kernel_size = check_pair(name, "kernel_size", kernel_size, 1)
        self.stride = check_pair(name, "stride", stride, 1)
        self.dilation = check_pair(name, "dilation", dilation, 1)
        if isinstance(padding, str):
            raise ValueError(f"{name}: padding must be an int or a pair (ph, pw), got {padding!r}")
        self.padding = check_pair(name, "padding", padding, 0)
        self.output_padding = check_pair(name, "output_padding", output_padding, 0)
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


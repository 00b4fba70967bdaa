"""Convolution layers: Conv2d, ConvTranspose2d, Conv3d and ConvTranspose3d.

The maths lives in modules beside this one: conv_reference.py (the plain 2-D version: im2col, one
GEMM, col2im, with the derivation of every gradient), conv_fast.py (tiled drivers and Winograd, the
default numpy primitives), and for volumes conv3d_reference.py (vol2col / col2vol for any number of
spatial axes) and conv3d_fast.py (its tiled driver). A layer calls its backend's primitives
(``self.ops``) and knows nothing of how they are computed; the names below are re-exported so
``unet_np.nn.conv.conv2d_forward`` etc. keep working.
"""
import numpy as np

from . import conv3d_reference as _ref3
from . import conv_reference as _ref2
from . import init as _init
from .conv3d_fast import (conv3d_backward, conv3d_forward, conv_transpose3d_backward,  # noqa: F401
                          conv_transpose3d_forward, make_conv3d_primitives)
from .conv3d_reference import (conv3d_backward_reference, conv3d_forward_reference,  # noqa: F401
                               conv_transpose3d_backward_reference,
                               conv_transpose3d_forward_reference)
from .conv_fast import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,  # noqa: F401
                        conv_transpose2d_forward, make_conv_primitives)
from .conv_reference import (conv2d_backward_reference, conv2d_forward_reference,  # noqa: F401
                             conv_output_size, conv_transpose2d_backward_reference,
                             conv_transpose2d_forward_reference, conv_transpose_output_size)
from .module import Module, Parameter, check_input
from .shapes import check_int, check_pair

# The primitives of this family, 2-D then 3-D (the numpy backend's table is built from OPS).
OPS = _ref2.OPS + _ref3.OPS


def check_input_nd(owner, x, spatial_dims, instead=None, channels=None, xp=np, dtype=None):
    """check_input for a layer of ``spatial_dims`` spatial axes (2: (N, C, H, W), 3: (N, C, D, H, W)).
    An array of the other rank is refused with the layout expected and, when ``instead`` names it,
    the layer meant for that rank (a 4-D image given to Conv3d: "use Conv2d")."""
    layouts = {2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}
    ndim = getattr(x, "ndim", None)
    if isinstance(ndim, int) and ndim != spatial_dims + 2 and hasattr(x, "dtype"):
        what = {4: "an image (N, C, H, W)", 5: "a volume (N, C, D, H, W)"}.get(ndim)
        hint = f" (for {what} use {instead})" if instead and what else ""
        raise ValueError(f"{owner}: expected a {spatial_dims + 2}-D array {layouts[spatial_dims]}, got "
                         f"{ndim}-D with shape {tuple(x.shape)}{hint}")
    return check_input(owner, x, ndim=None, channels=channels, xp=xp, dtype=dtype)


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


def _same_pads(layer, kernel, stride, dilation):
    """padding='same' per axis: total d (k - 1), the odd extra row/voxel after (PyTorch's choice)."""
    if any(st != 1 for st in stride):
        raise ValueError(f"{layer}: padding='same' needs stride 1, got stride {stride}")
    return tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation))


def _size(values):
    return "x".join(map(str, values))


def _set_sizes(layer, in_channels, out_channels, kernel_size, stride, dilation):
    """The hyper-parameters every convolution layer checks and keeps: channels (ints >= 1) and
    kernel_size, stride, dilation (an int or one per spatial axis, each >= 1)."""
    name, dims = type(layer).__name__, layer.DIMS
    layer.in_channels = check_int(name, "in_channels", in_channels, 1)
    layer.out_channels = check_int(name, "out_channels", out_channels, 1)
    layer.kernel_size = check_pair(name, "kernel_size", kernel_size, 1, dims=dims)
    layer.stride = check_pair(name, "stride", stride, 1, dims=dims)
    layer.dilation = check_pair(name, "dilation", dilation, 1, dims=dims)


class _ConvNd(Module):
    """What Conv2d and Conv3d share; a subclass sets DIMS, the primitives' names and OTHER (the
    layer for the other rank, named in errors). The maths: conv_reference.py / conv3d_reference.py."""

    DIMS, FORWARD, BACKWARD, OTHER = 2, "conv2d_forward", "conv2d_backward", "Conv3d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        name, dims = type(self).__name__, self.DIMS
        _set_sizes(self, in_channels, out_channels, kernel_size, stride, dilation)
        _check_init(name, init)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                what = "a pair" if dims == 2 else "a triple"
                raise ValueError(f"{name}: padding must be an int, {what}, 'same' or 'valid', got "
                                 f"{padding!r}")
            pads = (((0, 0),) * dims if padding == "valid"
                    else _same_pads(name, self.kernel_size, self.stride, self.dilation))
            self.padding = padding
        else:
            self.padding = check_pair(name, "padding", padding, 0, dims=dims)
            pads = tuple((p, p) for p in self.padding)
        self._pads = pads                        # (before, after) per spatial axis
        fan_in = self.in_channels * int(np.prod(self.kernel_size))
        w, b = _init.init_weight_and_bias((self.out_channels, self.in_channels) + self.kernel_size,
                                          self.out_channels if bias else None, fan_in, init, self.dtype)
        _set_parameters(self, w, b)

    def output_shape(self, input_shape):
        """(N, out_channels, *out_size) for an input (N, C, *size); ValueError when the kernel does
        not fit in the padded input."""
        N, _, *size = input_shape
        spans = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]
        padded = [n + sum(p) for n, p in zip(size, self._pads)]
        if any(e > n for e, n in zip(spans, padded)):
            unit = "pixels" if self.DIMS == 2 else "voxels"
            raise ValueError(f"{type(self).__name__}: the kernel spans {_size(spans)} {unit} (kernel "
                             f"{_size(self.kernel_size)}, dilation {_size(self.dilation)}), larger than "
                             f"the padded input {_size(padded)} (input {_size(size)}, padding "
                             f"{self._pads})")
        return (N, self.out_channels) + tuple(
            conv_output_size(n, k, st, sum(p), d) for n, k, st, p, d in
            zip(size, self.kernel_size, self.stride, self._pads, self.dilation))

    def forward(self, x):
        x = check_input_nd(type(self).__name__, x, self.DIMS, self.OTHER, channels=self.in_channels,
                           xp=self.xp, dtype=self.dtype)
        out_shape = self.output_shape(x.shape)
        b = self.bias.data if self.bias is not None else None
        y, cache = getattr(self.ops, self.FORWARD)(x, self.weight.data, b, self.stride, self._pads,
                                          self.dilation)
        self._keep((cache, out_shape))
        return y

    # False: backward computes no input gradient and returns None (a model's first convolution,
    # whose input is the image, sets it for a training step; see UNet.backward(input_grad=False)).
    needs_input_grad = True

    def backward(self, dy):
        cache, out_shape = self._take()
        dy = _check_dy(type(self).__name__, dy, out_shape, self.xp, self.dtype)
        dx, dw, db = getattr(self.ops, self.BACKWARD)(dy, cache, input_grad=self.needs_input_grad)
        _add_grads(self, dw, db)
        self._release()
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")


class Conv2d(_ConvNd):
    """2-D convolution (cross-correlation, as PyTorch's) over NCHW input.

    padding: an int, a pair (ph, pw), 'valid' (no padding) or 'same' (output as large as the input;
    stride 1 only; when the total padding d (k - 1) is odd the extra row/column goes on the
    bottom/right, as in PyTorch). weight: (out_channels, in_channels, kh, kw), bias: (out_channels,).
    init: 'torch' (PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias) or 'he'
    (He-normal weight, std sqrt(2 / fan_in), zero bias); fan_in = in_channels * kh * kw.
    """

    DIMS, FORWARD, BACKWARD, OTHER = 2, "conv2d_forward", "conv2d_backward", "Conv3d"


class Conv3d(_ConvNd):
    """3-D convolution (cross-correlation, as PyTorch's) over (N, C, D, H, W) input.

    kernel_size, stride, dilation: an int or a triple (d, h, w), e.g. (1, 3, 3) for an in-plane
    kernel on thin-slice volumes; padding: an int, a triple, 'valid' or 'same' (stride 1; an odd
    total padding puts the extra voxel after, as PyTorch). weight: (out, in, kd, kh, kw), bias:
    (out,). init as Conv2d, with fan_in = in_channels * kd * kh * kw. Maths: conv3d_reference.py.
    """

    DIMS, FORWARD, BACKWARD, OTHER = 3, "conv3d_forward", "conv3d_backward", "Conv2d"


class _ConvTransposeNd(Module):
    """What ConvTranspose2d and ConvTranspose3d share (see ConvTranspose2d)."""

    DIMS, FORWARD, BACKWARD, OTHER = (2, "conv_transpose2d_forward", "conv_transpose2d_backward",
                                      "ConvTranspose3d")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, bias=True, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        name, dims = type(self).__name__, self.DIMS
        _set_sizes(self, in_channels, out_channels, kernel_size, stride, dilation)
        if isinstance(padding, str):
            what = "a pair (ph, pw)" if dims == 2 else "a triple (pd, ph, pw)"
            raise ValueError(f"{name}: padding must be an int or {what}, got {padding!r}")
        self.padding = check_pair(name, "padding", padding, 0, dims=dims)
        self.output_padding = check_pair(name, "output_padding", output_padding, 0, dims=dims)
        for op, st, d in zip(self.output_padding, self.stride, self.dilation):
            if op >= max(st, d):
                raise ValueError(f"{name}: output_padding must be smaller than the stride or the "
                                 f"dilation, got output_padding {self.output_padding}, stride "
                                 f"{self.stride}, dilation {self.dilation}")
        _check_init(name, init)
        kvol = int(np.prod(self.kernel_size))
        if init == "he":
            fan_in = self.in_channels * kvol / int(np.prod(self.stride))
        else:
            fan_in = self.out_channels * kvol
        w, b = _init.init_weight_and_bias((self.in_channels, self.out_channels) + self.kernel_size,
                                          self.out_channels if bias else None, fan_in, init, self.dtype)
        _set_parameters(self, w, b)

    def output_shape(self, input_shape):
        """(N, out_channels, *out_size) for an input (N, C, *size); ValueError when not positive."""
        N, _, *size = input_shape
        out = tuple(conv_transpose_output_size(n, k, st, 2 * p, op, d) for n, k, st, p, op, d in
                    zip(size, self.kernel_size, self.stride, self.padding, self.output_padding,
                        self.dilation))
        if min(out) < 1:
            full = [o + 2 * p for o, p in zip(out, self.padding)]
            raise ValueError(f"{type(self).__name__}: the output would be {_size(out)} for an input "
                             f"{_size(size)}: the padding {self.padding} crops more than the "
                             f"{_size(full)} full output (kernel {self.kernel_size}, stride "
                             f"{self.stride}, dilation {self.dilation})")
        return (N, self.out_channels) + out

    def forward(self, x):
        x = check_input_nd(type(self).__name__, x, self.DIMS, self.OTHER, channels=self.in_channels,
                           xp=self.xp, dtype=self.dtype)
        out_shape = self.output_shape(x.shape)
        b = self.bias.data if self.bias is not None else None
        y, cache = getattr(self.ops, self.FORWARD)(x, self.weight.data, b, self.stride, self.padding,
                                          self.output_padding, self.dilation)
        self._keep((cache, out_shape))
        return y

    def backward(self, dy):
        cache, out_shape = self._take()
        dy = _check_dy(type(self).__name__, dy, out_shape, self.xp, self.dtype)
        dx, dw, db = getattr(self.ops, self.BACKWARD)(dy, cache)
        _add_grads(self, dw, db)
        self._release()
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, dtype={self.dtype}")


class ConvTranspose2d(_ConvTransposeNd):
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

    DIMS, FORWARD, BACKWARD, OTHER = (2, "conv_transpose2d_forward", "conv_transpose2d_backward",
                                      "ConvTranspose3d")


class ConvTranspose3d(_ConvTransposeNd):
    """3-D transposed convolution over (N, C, D, H, W): the adjoint of Conv3d with the same weight.

    Every hyper-parameter is an int or a triple (d, h, w); weight: (in, out, kd, kh, kw), PyTorch's
    layout; output size and init per axis as ConvTranspose2d.
    """

    DIMS, FORWARD, BACKWARD, OTHER = (3, "conv_transpose3d_forward", "conv_transpose3d_backward",
                                      "ConvTranspose2d")

"""Max-pooling: MaxPool2d and MaxPool3d.

Primitives (plain NumPy, hyper-parameters as ints or (h, w) pairs):

    maxpool2d_forward(x, kernel, stride, padding) -> (y, cache)
    maxpool2d_backward(dy, cache) -> dx
    maxpool3d_forward(x, kernel, stride, padding) -> (y, cache)     x: (N, C, D, H, W), triples
    maxpool3d_backward(dy, cache) -> dx

The forward keeps, for every output pixel, which window position held the maximum (a compact
integer index in row-major window order, uint8 for windows of up to 255 positions). A tie goes to
the FIRST maximum in that order, as PyTorch does. (A NaN propagates to the output value, as in
PyTorch; which position it routes the gradient to is not specified.) The U-Net's 2x2 stride-2
unpadded case has its own fast path (four strided views, three compares); the general path loops
over the kernel offsets only.
Derivation in long form: docs/backprop.md#max-pool-routes-the-gradient-to-the-argmax.
"""
import itertools

import numpy as np

from .module import Module, check_input
from .shapes import pair

OPS = ("maxpool2d_forward", "maxpool2d_backward", "maxpool3d_forward", "maxpool3d_backward")


def _index_dtype(positions):
    return np.uint8 if positions <= 255 else (np.uint16 if positions <= 65535 else np.int64)


def pool_output_size(size, kernel, stride, padding):
    """floor((size + 2 padding - kernel) / stride) + 1, PyTorch's rule (ceil_mode=False)."""
    return (size + 2 * padding - kernel) // stride + 1


def maxpool2d_forward(x, kernel, stride, padding):
    """y[n, c, i, j] = max over the window at (i*sh - ph, j*sw - pw) of size (kh, kw).

    x: (N, C, H, W) -> y: (N, C, Ho, Wo), Ho = floor((H + 2 ph - kh) / sh) + 1 (likewise Wo).
    Padding counts as -inf (never a maximum). cache: (argmax, x.shape, kernel, stride, padding)
    where argmax (N, C, Ho, Wo) holds the winning window position k = a*kw + b (row-major), the first
    one on a tie.
    """
    kernel, stride, padding = pair(kernel), pair(stride), pair(padding)
    if kernel == (2, 2) and stride == (2, 2) and padding == (0, 0):
        y, arg = _maxpool2x2_forward(x)
    else:
        y, arg = _maxpool_windows_forward(x, kernel, stride, padding)
    return y, (arg, x.shape, kernel, stride, padding)


def maxpool2d_backward(dy, cache):
    """dx = dy routed to the argmax of each window (summed where overlapping windows share it).

    dy: (N, C, Ho, Wo), cache from maxpool2d_forward -> dx: (N, C, H, W), dtype of dy.
    y = x[argmax] is locally a selection, so dy/dx is 1 at the chosen input and 0 elsewhere; an
    input chosen by several windows (stride < kernel) collects the sum of their gradients.
    Long form: docs/backprop.md#max-pool-routes-the-gradient-to-the-argmax.
    """
    arg, shape, kernel, stride, padding = cache
    if kernel == (2, 2) and stride == (2, 2) and padding == (0, 0):
        return _maxpool2x2_backward(dy, arg, shape)
    return _maxpool_windows_backward(dy, arg, shape, kernel, stride, padding)


# -- general path: a loop over the kh*kw window offsets, each step vectorised over everything --------
def _maxpool_windows_forward(x, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, W = x.shape
    Ho, Wo = pool_output_size(H, kh, sh, ph), pool_output_size(W, kw, sw, pw)
    if ph or pw:
        xp = np.full((N, C, H + 2 * ph, W + 2 * pw), -np.inf, dtype=x.dtype)
        xp[:, :, ph:ph + H, pw:pw + W] = x
    else:
        xp = x
    y = None
    arg = np.zeros((N, C, Ho, Wo), dtype=_index_dtype(kh * kw))
    for a in range(kh):
        for b in range(kw):
            v = xp[:, :, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw]
            if y is None:
                y = v.copy()
                continue
            better = v > y                      # strict: an equal later value does not win
            np.copyto(arg, a * kw + b, where=better)
            np.maximum(y, v, out=y)             # (propagates NaN like PyTorch's value)
    return y, arg


def _maxpool_windows_backward(dy, arg, shape, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, W = shape
    Ho, Wo = arg.shape[2:]
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=dy.dtype)
    hit = np.empty(arg.shape, dtype=bool)
    disjoint = sh >= kh and sw >= kw            # no two windows share an input: plain writes
    for a in range(kh):
        for b in range(kw):
            np.equal(arg, a * kw + b, out=hit)
            view = dxp[:, :, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw]
            if disjoint:
                np.copyto(view, dy, where=hit)
            else:
                view += np.where(hit, dy, 0)
    if ph or pw:
        return dxp[:, :, ph:ph + H, pw:pw + W]
    return dxp


# -- fast path: 2x2 windows, stride 2, no padding (odd sizes drop the last row/column) --------------
def _maxpool2x2_forward(x):
    N, C, H, W = x.shape
    Ho, Wo = H // 2, W // 2
    # The four corners of every window, as strided views (no copy): p q / r s, positions 0 1 / 2 3.
    p = x[:, :, 0:2 * Ho:2, 0:2 * Wo:2]
    q = x[:, :, 0:2 * Ho:2, 1:2 * Wo:2]
    r = x[:, :, 1:2 * Ho:2, 0:2 * Wo:2]
    s = x[:, :, 1:2 * Ho:2, 1:2 * Wo:2]
    top_right = q > p                           # 1 if q wins the top pair (p wins a tie)
    bottom_right = s > r                        # 1 if s wins the bottom pair (r wins a tie)
    top = np.maximum(p, q)
    bottom = np.maximum(r, s)
    use_bottom = bottom > top                   # the top pair wins a tie: it comes first
    y = np.maximum(top, bottom, out=top)
    # argmax = 2*use_bottom + (bottom_right if use_bottom else top_right)
    arg = np.where(use_bottom, bottom_right, top_right).view(np.uint8)
    arg |= use_bottom.view(np.uint8) << np.uint8(1)
    return y, arg


def _maxpool2x2_backward(dy, arg, shape):
    N, C, H, W = shape
    Ho, Wo = arg.shape[2:]
    dx = np.zeros(shape, dtype=dy.dtype)
    hit = np.empty(arg.shape, dtype=bool)
    for k, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        np.equal(arg, k, out=hit)
        np.copyto(dx[:, :, a:2 * Ho:2, b:2 * Wo:2], dy, where=hit)
    return dx


# -- volumes (and any number of spatial axes): the same loop over the window offsets ---------------
def maxpool3d_forward(x, kernel, stride, padding):
    """y[n, c, od, oh, ow] = max over the window at (od*sd - pd, oh*sh - ph, ow*sw - pw).

    x: (N, C, D, H, W) -> y: (N, C, Do, Ho, Wo), Do = floor((D + 2 pd - kd) / sd) + 1 (likewise).
    kernel, stride, padding: ints or (d, h, w) triples. Padding counts as -inf. The loop runs over
    the kd*kh*kw window offsets in row-major order, each step vectorised over every window; a later
    offset wins only if strictly larger, so a tie keeps the first maximum, as PyTorch.
    cache: (argmax, x.shape, kernel, stride, padding), argmax (N, C, Do, Ho, Wo) the winning offset
    k = (i*kh + j)*kw + l.
    """
    dims = x.ndim - 2
    kernel, stride = pair(kernel, "kernel", dims), pair(stride, "stride", dims)
    padding = pair(padding, "padding", dims)
    size = x.shape[2:]
    out = tuple(pool_output_size(n, k, s, p) for n, k, s, p in zip(size, kernel, stride, padding))
    if any(padding):
        xp = np.full(x.shape[:2] + tuple(n + 2 * p for n, p in zip(size, padding)), -np.inf,
                     dtype=x.dtype)
        xp[(slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(padding, size))] = x
    else:
        xp = x
    y = None
    arg = np.zeros(x.shape[:2] + out, dtype=_index_dtype(int(np.prod(kernel))))
    for k, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        v = xp[_window_view(offset, stride, out)]
        if y is None:
            y = v.copy()
            continue
        better = v > y                          # strict: an equal later value does not win
        np.copyto(arg, k, where=better)
        np.maximum(y, v, out=y)                 # (propagates NaN like PyTorch's value)
    return y, (arg, x.shape, kernel, stride, padding)


def maxpool3d_backward(dy, cache):
    """dx = dy routed to the argmax of each window, summed where windows overlap.

    dy: (N, C, Do, Ho, Wo) -> dx: (N, C, D, H, W). As in 2-D, y = x[argmax] is a selection: dy/dx
    is 1 at the chosen voxel and 0 elsewhere (docs/backprop.md#max-pool-routes-the-gradient-to-the-argmax).
    """
    arg, shape, kernel, stride, padding = cache
    size = shape[2:]
    out = arg.shape[2:]
    dxp = np.zeros(shape[:2] + tuple(n + 2 * p for n, p in zip(size, padding)), dtype=dy.dtype)
    hit = np.empty(arg.shape, dtype=bool)
    disjoint = all(s >= k for s, k in zip(stride, kernel))   # no two windows share a voxel
    for k, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        np.equal(arg, k, out=hit)
        view = dxp[_window_view(offset, stride, out)]
        if disjoint:
            np.copyto(view, dy, where=hit)
        else:
            view += np.where(hit, dy, 0)
    if any(padding):
        return dxp[(slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(padding, size))]
    return dxp


def _window_view(offset, stride, out):
    """The index of the (padded) input voxels at window offset ``offset`` of every window."""
    return (slice(None), slice(None)) + tuple(slice(i, i + s * (o - 1) + 1, s)
                                              for i, s, o in zip(offset, stride, out))


class MaxPool2d(Module):
    """2-D max-pooling over (N, C, H, W) input, as torch.nn.MaxPool2d (dilation 1, floor mode).

    kernel_size, stride (None: the kernel), padding: ints or (h, w) pairs. Padding counts as -inf and
    may be at most half the kernel (PyTorch's rule). Parameter-free: the input's float dtype is kept.
    """

    def __init__(self, kernel_size, stride=None, padding=0, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        self.kernel_size = pair(kernel_size, "MaxPool2d: kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "MaxPool2d: stride")
        self.padding = pair(padding, "MaxPool2d: padding")
        if min(self.kernel_size) < 1:
            raise ValueError(f"MaxPool2d: kernel_size must be positive, got {kernel_size!r}")
        if min(self.stride) < 1:
            raise ValueError(f"MaxPool2d: stride must be positive, got {stride!r}")
        if min(self.padding) < 0:
            raise ValueError(f"MaxPool2d: padding must be >= 0, got {padding!r}")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"MaxPool2d: padding must be at most half the kernel size, got padding "
                             f"{self.padding} for kernel_size {self.kernel_size}")

    def output_shape(self, shape):
        N, C, H, W = shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return N, C, pool_output_size(H, kh, sh, ph), pool_output_size(W, kw, sw, pw)

    def forward(self, x):
        if getattr(x, "ndim", 4) == 5:
            raise ValueError(f"MaxPool2d: expected a 4-D array (N, C, H, W), got 5-D with shape "
                             f"{tuple(x.shape)} (for a volume (N, C, D, H, W) use MaxPool3d)")
        x = check_input("MaxPool2d", x, xp=self.xp)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        H, W = x.shape[2:]
        if H + 2 * ph < kh or W + 2 * pw < kw:
            raise ValueError(f"MaxPool2d: input of spatial size {H}x{W} (padded "
                             f"{H + 2 * ph}x{W + 2 * pw}) is smaller than the kernel {kh}x{kw}")
        y, cache = self.ops.maxpool2d_forward(x, self.kernel_size, self.stride, self.padding)
        self._keep(cache)
        return y

    def backward(self, dy):
        cache = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != tuple(cache[0].shape):
            raise ValueError(f"MaxPool2d: backward expected dy of shape {tuple(cache[0].shape)}, "
                             f"got {tuple(dy.shape)}")
        dx = self.ops.maxpool2d_backward(dy, cache)
        self._release()
        return dx

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool3d(Module):
    """3-D max-pooling over (N, C, D, H, W) input, as torch.nn.MaxPool3d (dilation 1, floor mode).

    kernel_size, stride (None: the kernel), padding: ints or (d, h, w) triples, e.g. (1, 2, 2) to
    pool in-plane only on thin-slice volumes. Padding counts as -inf and may be at most half the
    kernel. A tie sends the gradient to the first maximum in row-major window order, as PyTorch.
    """

    def __init__(self, kernel_size, stride=None, padding=0, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        self.kernel_size = pair(kernel_size, "MaxPool3d: kernel_size", dims=3)
        self.stride = self.kernel_size if stride is None else pair(stride, "MaxPool3d: stride", dims=3)
        self.padding = pair(padding, "MaxPool3d: padding", dims=3)
        if min(self.kernel_size) < 1:
            raise ValueError(f"MaxPool3d: kernel_size must be positive, got {kernel_size!r}")
        if min(self.stride) < 1:
            raise ValueError(f"MaxPool3d: stride must be positive, got {stride!r}")
        if min(self.padding) < 0:
            raise ValueError(f"MaxPool3d: padding must be >= 0, got {padding!r}")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"MaxPool3d: padding must be at most half the kernel size, got padding "
                             f"{self.padding} for kernel_size {self.kernel_size}")

    def output_shape(self, shape):
        N, C, *size = shape
        return (N, C) + tuple(pool_output_size(n, k, s, p) for n, k, s, p in
                              zip(size, self.kernel_size, self.stride, self.padding))

    def forward(self, x):
        if getattr(x, "ndim", 5) == 4:
            raise ValueError(f"MaxPool3d: expected a 5-D array (N, C, D, H, W), got 4-D with shape "
                             f"{tuple(x.shape)} (for an image (N, C, H, W) use MaxPool2d)")
        x = check_input("MaxPool3d", x, ndim=None, xp=self.xp)
        if x.ndim != 5:
            raise ValueError(f"MaxPool3d: expected a 5-D array (N, C, D, H, W), got {x.ndim}-D with "
                             f"shape {tuple(x.shape)}")
        size = x.shape[2:]
        if any(n + 2 * p < k for n, p, k in zip(size, self.padding, self.kernel_size)):
            raise ValueError(f"MaxPool3d: input of spatial size {tuple(size)} (padding {self.padding}) "
                             f"is smaller than the kernel {self.kernel_size}")
        y, cache = self.ops.maxpool3d_forward(x, self.kernel_size, self.stride, self.padding)
        self._keep((cache, tuple(y.shape)))
        return y

    def backward(self, dy):
        cache, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"MaxPool3d: backward expected dy of shape {shape}, got {tuple(dy.shape)}")
        dx = self.ops.maxpool3d_backward(dy, cache)
        self._release()
        return dx

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

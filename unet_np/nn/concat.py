"""Concatenation, centre-cropping and padding: Concat, CenterCrop, Pad2d, Pad3d.

These move values without arithmetic, so each backward is the same move run the other way:
concatenation splits the gradient, cropping zero-pads it back, padding crops it (and, for reflect
padding, folds the mirrored border back onto the pixels it copied).

Primitives (plain NumPy):

    concat_forward(xs, axis) -> (y, cache)            concat_backward(dy, cache) -> tuple of dx
    center_crop_forward(x, size) -> (y, cache)        center_crop_backward(dy, cache) -> dx
    pad2d_forward(x, pads, mode, value=0.0) -> (y, cache)
                                                      pad2d_backward(dy, cache) -> dx
    pad3d_forward(x, pads, mode, value=0.0) -> (y, cache)
                                                      pad3d_backward(dy, cache) -> dx

``size`` is (h, w) or (d, h, w) (the trailing axes cropped); ``pads`` is (left, right, top, bottom)
for 2-D and (left, right, top, bottom, front, back) for 3-D, the order of torch.nn.functional.pad.
Concat works on any rank, CenterCrop on 4-D and 5-D arrays.
Views: center_crop_forward returns a view of x, concat_backward and the constant-mode
pad2d_backward return views of dy (no copy); treat them as read-only.
Derivation in long form: docs/backprop.md#concatenation-cropping-and-padding.
"""
import numpy as np

from .module import Module, check_input
from .shapes import size_pair

OPS = ("concat_forward", "concat_backward", "center_crop_forward", "center_crop_backward",
       "pad2d_forward", "pad2d_backward", "pad3d_forward", "pad3d_backward")

PAD_MODES = ("reflect", "constant")


# -- concatenation ------------------------------------------------------------------------------
def concat_forward(xs, axis):
    """y = [x0, x1, ...] joined along ``axis``.

    xs: arrays equal in every dimension but ``axis`` -> y: the sum of their sizes along it.
    cache: (axis, the sizes along axis).
    """
    return np.concatenate(xs, axis=axis), (axis, tuple(x.shape[axis] for x in xs))


def concat_backward(dy, cache):
    """Each input's gradient is its own slab of dy: y's slab k is a copy of x_k, so dL/dx_k is
    dL/dy restricted to that slab.  dy: the output's shape -> tuple of dx_k (views of dy).
    Long form: docs/backprop.md#concatenation-cropping-and-padding."""
    axis, sizes = cache
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.split(dy, bounds, axis=axis))


# -- centre crop -----------------------------------------------------------------------------------
def center_crop_forward(x, size):
    """y = x[:, :, t:t+h, l:l+w] with t = (H - h) // 2, l = (W - w) // 2 (when H - h or W - w is
    odd, the extra row/column dropped is the bottom/right one). A size (d, h, w) crops the last three
    axes of a volume the same way (front offset (D - d) // 2).

    x: (N, C, H, W), size (h, w) with h <= H, w <= W -> y: (N, C, h, w), a view of x.
    cache: (x.shape, the offsets, one per cropped axis).
    """
    full = x.shape[x.ndim - len(size):]
    offsets = tuple((n - m) // 2 for n, m in zip(full, size))
    return x[(Ellipsis,) + tuple(slice(o, o + m) for o, m in zip(offsets, size))], (x.shape, offsets)


def center_crop_backward(dy, cache):
    """dx is dy placed back where the crop came from, zero elsewhere (the dropped border did not
    reach the output).  dy: (N, C, h, w) -> dx: (N, C, H, W) (likewise for volumes).
    Long form: docs/backprop.md#concatenation-cropping-and-padding."""
    shape, offsets = cache
    size = dy.shape[dy.ndim - len(offsets):]
    dx = np.zeros(shape, dtype=dy.dtype)
    dx[(Ellipsis,) + tuple(slice(o, o + m) for o, m in zip(offsets, size))] = dy
    return dx


# -- padding -----------------------------------------------------------------------------------
def _down(start, count):
    """The slice start, start-1, ..., start-count+1 (a stop of -1 would mean 'the end')."""
    stop = start - count
    return slice(start, stop if stop >= 0 else None, -1)


def pad2d_forward(x, pads, mode, value=0.0):
    """Pad the last two axes by pads = (left, right, top, bottom).

    mode 'constant': the border is ``value``. mode 'reflect': mirrored about the edge pixel without
    repeating it (x[.., -1] := x[.., 1]), as torch's F.pad(mode='reflect'); each pad must be smaller
    than the padded dimension. Corners are reflected in both directions.
    x: (N, C, H, W) -> y: (N, C, top+H+bottom, left+W+right). cache: (pads, mode).
    """
    l, r, t, b = pads
    N, C, H, W = x.shape
    y = np.empty((N, C, t + H + b, l + W + r), dtype=x.dtype)
    y[:, :, t:t + H, l:l + W] = x
    if mode == "constant":
        y[:, :, :t] = value
        y[:, :, t + H:] = value
        y[:, :, t:t + H, :l] = value
        y[:, :, t:t + H, l + W:] = value
    elif mode == "reflect":
        # columns of the middle band first, then whole rows (which carries the corners along)
        if l:
            y[:, :, t:t + H, :l] = x[:, :, :, l:0:-1]
        if r:
            y[:, :, t:t + H, l + W:] = x[:, :, :, _down(W - 2, r)]
        if t:
            y[:, :, :t] = y[:, :, 2 * t:t:-1]
        if b:
            y[:, :, t + H:] = y[:, :, _down(t + H - 2, b)]
    else:
        raise ValueError(f"pad2d_forward: mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    return y, ((l, r, t, b), mode)


def pad2d_backward(dy, cache):
    """dy: (N, C, top+H+bottom, left+W+right) -> dx: (N, C, H, W).

    constant: the border is not a function of x, so dx is dy's middle (a view of dy).
    reflect: y = R_rows R_cols x where each R copies the pixel at distance k from the edge to the
    pad at distance k on the other side; the adjoint keeps the middle and adds every pad's gradient
    back onto the pixel it copied: rows first (undoing the last step), then columns.
    Long form: docs/backprop.md#concatenation-cropping-and-padding.
    """
    (l, r, t, b), mode = cache
    Hp, Wp = dy.shape[-2:]
    H, W = Hp - t - b, Wp - l - r
    if mode == "constant":
        return dy[:, :, t:t + H, l:l + W]
    dz = dy[:, :, t:t + H].copy()                     # (N, C, H, Wp): the column-padded rows
    if t:                                             # y row i < t copied z row t - i
        dz[:, :, t:0:-1] += dy[:, :, :t]
    if b:                                             # y row t+H+j copied z row H-2-j
        dz[:, :, _down(H - 2, b)] += dy[:, :, t + H:]
    dx = dz[:, :, :, l:l + W].copy()
    if l:                                             # z column j < l copied x column l - j
        dx[:, :, :, l:0:-1] += dz[:, :, :, :l]
    if r:                                             # z column l+W+j copied x column W-2-j
        dx[:, :, :, _down(W - 2, r)] += dz[:, :, :, l + W:]
    return dx


def _reflect_axis(y, axis, before, after, n):
    """Fill the ``before`` / ``after`` pads of ``axis`` of y (whose middle n entries hold the data)
    by mirroring about the edge entry, in place."""
    def at(sl):
        idx = [slice(None)] * y.ndim
        idx[axis] = sl
        return tuple(idx)
    if before:                                        # y[before - k] := y[before + k]
        y[at(slice(0, before))] = y[at(slice(2 * before, before, -1))]
    if after:                                         # y[before + n - 1 + k] := y[before + n - 1 - k]
        y[at(slice(before + n, None))] = y[at(_down(before + n - 2, after))]


def _reflect_axis_adjoint(dy, axis, before, after):
    """The adjoint of _reflect_axis followed by dropping the pads: dy (.., before + n + after, ..)
    -> (.., n, ..), each pad entry's gradient added onto the entry it copied."""
    n = dy.shape[axis] - before - after

    def at(a, sl):
        idx = [slice(None)] * a.ndim
        idx[axis] = sl
        return tuple(idx)
    dx = dy[at(dy, slice(before, before + n))].copy()
    if before:                                        # pad entry k < before copied middle entry before - k
        dx[at(dx, slice(before, 0, -1))] += dy[at(dy, slice(0, before))]
    if after:                                         # pad entry before+n+k copied middle entry n-2-k
        dx[at(dx, _down(n - 2, after))] += dy[at(dy, slice(before + n, None))]
    return dx


def pad3d_forward(x, pads, mode, value=0.0):
    """Pad the last three axes by pads = (left, right, top, bottom, front, back), torch's F.pad
    order (last axis first).

    x: (N, C, D, H, W) -> y: (N, C, front+D+back, top+H+bottom, left+W+right). mode 'constant'
    fills ``value``; 'reflect' mirrors about the edge voxel, one axis after the other (W, H, then D;
    each later axis copies the earlier axes' pads along, which fills edges and corners as torch).
    cache: (pads, mode).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad3d_forward: mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
    l, r, t, b, f, k = pads
    N, C, D, H, W = x.shape
    y = np.empty((N, C, f + D + k, t + H + b, l + W + r), dtype=x.dtype)
    middle = (slice(None), slice(None), slice(f, f + D), slice(t, t + H), slice(l, l + W))
    if mode == "constant":
        y[...] = value
        y[middle] = x
    else:
        y[middle] = x
        _reflect_axis(y[:, :, f:f + D, t:t + H], 4, l, r, W)
        _reflect_axis(y[:, :, f:f + D], 3, t, b, H)
        _reflect_axis(y, 2, f, k, D)
    return y, (tuple(pads), mode)


def pad3d_backward(dy, cache):
    """dy: (N, C, front+D+back, top+H+bottom, left+W+right) -> dx: (N, C, D, H, W).

    constant: dx is dy's middle (a view). reflect: the forward is y = R_d R_h R_w x, so
    dx = R_w^T R_h^T R_d^T dy: undo the axes in the reverse order (D, H, then W), each adding its
    pads' gradients back onto the entries they copied.
    Long form: docs/backprop.md#concatenation-cropping-and-padding."""
    (l, r, t, b, f, k), mode = cache
    if mode == "constant":
        Dp, Hp, Wp = dy.shape[2:]
        return dy[:, :, f:Dp - k, t:Hp - b, l:Wp - r]
    dz = _reflect_axis_adjoint(dy, 2, f, k)
    dz = _reflect_axis_adjoint(dz, 3, t, b)
    return _reflect_axis_adjoint(dz, 4, l, r)


# -- layers ------------------------------------------------------------------------------------
def _checked_backward(layer, name, dy, primitive):
    """The backward shared by the copy layers: dy must have the shape of the forward's output."""
    cache, shape = layer._take()
    dy = layer.xp.asarray(dy)
    if _shape(dy) != shape:
        raise ValueError(f"{name}: backward expected dy of shape {shape}, got {_shape(dy)}")
    grads = primitive(dy, cache)
    layer._release()
    return grads


def _shape(x):
    return tuple(x.shape)


class Concat(Module):
    """Joins its inputs along ``axis`` (channels by default): ``forward(*xs)``; ``backward(dy)``
    returns a tuple with one gradient per input, in the inputs' order. Inputs must have the same
    rank, the same float dtype, and equal sizes on every other axis."""

    def __init__(self, axis=1, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"Concat: axis must be an int, got {axis!r}")
        self.axis = int(axis)

    def forward(self, *xs):
        if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
            xs = tuple(xs[0])
        if not xs:
            raise ValueError("Concat: expected at least one input array, got none")
        xs = [check_input(f"Concat (input {i})", x, ndim=None, xp=self.xp) for i, x in enumerate(xs)]
        ref = xs[0]
        ndim = ref.ndim
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"Concat: axis {self.axis} is out of range for {ndim}-D inputs "
                             f"(input 0 has shape {_shape(ref)})")
        axis = self.axis % ndim
        for i, x in enumerate(xs[1:], start=1):
            if x.dtype != ref.dtype:
                raise TypeError(f"Concat: input {i} has dtype {x.dtype}, expected {ref.dtype} "
                                f"like input 0")
            if x.ndim != ndim:
                raise ValueError(f"Concat: input {i} is {x.ndim}-D with shape {_shape(x)}, expected "
                                 f"{ndim}-D like input 0 with shape {_shape(ref)}")
            if any(a != b for k, (a, b) in enumerate(zip(x.shape, ref.shape)) if k != axis):
                raise ValueError(f"Concat: input {i} has shape {_shape(x)}, which differs from input "
                                 f"0's shape {_shape(ref)} outside axis {axis}; every other axis "
                                 f"must match")
        y, cache = self.ops.concat_forward(xs, axis)
        self._keep((cache, _shape(y)))
        return y

    def backward(self, dy):
        return _checked_backward(self, "Concat", dy, self.ops.concat_backward)

    def extra_repr(self):
        return f"axis={self.axis}"


class CenterCrop(Module):
    """Crops (N, C, H, W) to its central (h, w), offset ((H - h) // 2, (W - w) // 2): the U-Net
    article's crop of a skip connection; a volume (N, C, D, H, W) to its central (d, h, w) likewise.
    ``size`` (an int for every spatial axis, (h, w), (d, h, w), or an array whose trailing spatial
    dimensions give it) is taken from ``forward(x, size)`` or else from the constructor. The output
    is a view of x."""

    def __init__(self, size=None, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        dims = 3 if isinstance(size, (tuple, list)) and len(size) == 3 else 2
        self.size = None if size is None else size_pair(size, "CenterCrop", dims=dims)
        self._size_any_rank = size if size is None or not isinstance(size, (tuple, list)) else None

    def forward(self, x, size=None):
        if getattr(x, "ndim", 4) not in (4, 5):
            raise ValueError(f"CenterCrop: expected a 4-D array (N, C, H, W) or a 5-D volume "
                             f"(N, C, D, H, W), got {x.ndim}-D with shape {_shape(x)}")
        x = check_input("CenterCrop", x, ndim=None, xp=self.xp)
        dims = x.ndim - 2
        if size is None:
            size = self._size_any_rank if self._size_any_rank is not None else self.size
        if size is None:
            raise ValueError("CenterCrop: no size given (pass size= to the constructor or forward)")
        if isinstance(size, (tuple, list)) and len(size) != dims:
            raise ValueError(f"CenterCrop: a {x.ndim}-D input needs a crop size of {dims} entries, "
                             f"got {tuple(size)} (input shape {_shape(x)})")
        crop = size_pair(size, "CenterCrop", dims=dims)
        full = tuple(x.shape[2:])
        if any(c > n for c, n in zip(crop, full)):
            raise ValueError(f"CenterCrop: crop size {'x'.join(map(str, crop))} is larger than the "
                             f"input's spatial size {'x'.join(map(str, full))} (input shape {_shape(x)})")
        y, cache = self.ops.center_crop_forward(x, crop)
        self._keep((cache, _shape(y)))
        return y

    def backward(self, dy):
        return _checked_backward(self, "CenterCrop", dy, self.ops.center_crop_backward)

    def extra_repr(self):
        return f"size={self.size}"


class Pad2d(Module):
    """Pads the last two axes of (N, C, H, W): padding is an int (all four sides), a pair (h, w)
    (top = bottom = h, left = right = w) or (left, right, top, bottom) as torch's F.pad.
    mode 'reflect' (default; as F.pad(mode='reflect'), each pad smaller than the padded dimension)
    or 'constant' (filled with ``value``). Parameter-free: the input's float dtype is kept."""

    def __init__(self, padding, mode="reflect", value=0.0, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if mode not in PAD_MODES:
            raise ValueError(f"Pad2d: mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
        vals = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)
        if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in vals):
            raise TypeError(f"Pad2d: padding must be an int or a tuple of ints, got {padding!r}")
        if len(vals) == 1:
            vals = vals * 4
        elif len(vals) == 2:
            vals = (vals[1], vals[1], vals[0], vals[0])
        elif len(vals) != 4:
            raise ValueError(f"Pad2d: padding must be an int, (h, w) or (left, right, top, bottom), "
                             f"got {padding!r}")
        if min(vals) < 0:
            raise ValueError(f"Pad2d: padding must be >= 0, got {padding!r}")
        self.padding = tuple(int(v) for v in vals)
        self.mode = mode
        self.value = float(value)

    def forward(self, x):
        if getattr(x, "ndim", 4) == 5:
            raise ValueError(f"Pad2d: expected a 4-D array (N, C, H, W), got 5-D with shape "
                             f"{_shape(x)} (for a volume (N, C, D, H, W) use Pad3d)")
        x = check_input("Pad2d", x, xp=self.xp)
        l, r, t, b = self.padding
        H, W = x.shape[-2:]
        if self.mode == "reflect" and (max(t, b) >= H or max(l, r) >= W):
            raise ValueError(f"Pad2d: reflect padding (left, right, top, bottom) = {self.padding} "
                             f"must be smaller than the input's spatial size {H}x{W} in each "
                             f"direction (input shape {_shape(x)})")
        y, cache = self.ops.pad2d_forward(x, self.padding, self.mode, self.value)
        self._keep((cache, _shape(y)))
        return y

    def backward(self, dy):
        return _checked_backward(self, "Pad2d", dy, self.ops.pad2d_backward)

    def extra_repr(self):
        return f"padding={self.padding}, mode={self.mode!r}"


class Pad3d(Module):
    """Pads the last three axes of (N, C, D, H, W): padding is an int (all six sides), a triple
    (d, h, w) (front = back = d, top = bottom = h, left = right = w) or (left, right, top, bottom,
    front, back) as torch's F.pad. mode 'reflect' (default; each pad smaller than the padded
    dimension) or 'constant' (filled with ``value``). Parameter-free: the input's dtype is kept."""

    def __init__(self, padding, mode="reflect", value=0.0, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if mode not in PAD_MODES:
            raise ValueError(f"Pad3d: mode must be one of {', '.join(PAD_MODES)}, got {mode!r}")
        vals = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,)
        if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in vals):
            raise TypeError(f"Pad3d: padding must be an int or a tuple of ints, got {padding!r}")
        if len(vals) == 1:
            vals = vals * 6
        elif len(vals) == 3:
            vals = (vals[2], vals[2], vals[1], vals[1], vals[0], vals[0])
        elif len(vals) != 6:
            raise ValueError(f"Pad3d: padding must be an int, (d, h, w) or (left, right, top, bottom, "
                             f"front, back), got {padding!r}")
        if min(vals) < 0:
            raise ValueError(f"Pad3d: padding must be >= 0, got {padding!r}")
        self.padding = tuple(int(v) for v in vals)
        self.mode = mode
        self.value = float(value)

    def forward(self, x):
        if getattr(x, "ndim", 5) == 4:
            raise ValueError(f"Pad3d: expected a 5-D array (N, C, D, H, W), got 4-D with shape "
                             f"{_shape(x)} (for an image (N, C, H, W) use Pad2d)")
        x = check_input("Pad3d", x, ndim=None, xp=self.xp)
        if x.ndim != 5:
            raise ValueError(f"Pad3d: expected a 5-D array (N, C, D, H, W), got {x.ndim}-D with "
                             f"shape {_shape(x)}")
        l, r, t, b, f, k = self.padding
        D, H, W = x.shape[2:]
        if self.mode == "reflect" and (max(f, k) >= D or max(t, b) >= H or max(l, r) >= W):
            raise ValueError(f"Pad3d: reflect padding (left, right, top, bottom, front, back) = "
                             f"{self.padding} must be smaller than the input's spatial size "
                             f"{D}x{H}x{W} in each direction (input shape {_shape(x)})")
        y, cache = self.ops.pad3d_forward(x, self.padding, self.mode, self.value)
        self._keep((cache, _shape(y)))
        return y

    def backward(self, dy):
        return _checked_backward(self, "Pad3d", dy, self.ops.pad3d_backward)

    def extra_repr(self):
        return f"padding={self.padding}, mode={self.mode!r}"

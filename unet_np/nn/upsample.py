"""Upsampling by an integer factor: Upsample (bilinear, trilinear or nearest).

Primitives (plain NumPy; ``scale`` is an int or an (sh, sw) pair of ints):

    upsample_bilinear2d_forward(x, scale) -> (y, cache)
    upsample_bilinear2d_backward(dy, cache) -> dx
    upsample_nearest2d_forward(x, scale) -> (y, cache)
    upsample_nearest2d_backward(dy, cache) -> dx
    upsample_trilinear3d_forward(x, scale, align_corners=False) -> (y, cache)   x: (N, C, D, H, W)
    upsample_trilinear3d_backward(dy, cache) -> dx
    upsample_nearest3d_forward(x, scale) -> (y, cache)
    upsample_nearest3d_backward(dy, cache) -> dx

Bilinear matches PyTorch's F.interpolate(mode='bilinear', align_corners=False). It is separable:
y = A_h x A_w^T with interpolation matrices A_h (sh*H x H) and A_w (sw*W x W) of two non-zeros per
row, and the backward is the adjoint dx = A_h^T dy A_w. The matrices are never formed: for an integer
factor s, output o = s*i + r (phase r) reads the inputs i and i+1 (or i-1 and i) with weights that
depend on r only, so each phase is two strided slices and one multiply-add, and the adjoint is the
same slices with the adds reversed. Work is O(output size), not O(H^2 W) as dense GEMMs would be.
Derivation in long form: docs/backprop.md#bilinear-upsampling-and-its-adjoint.
"""
import numpy as np

from .module import Module, check_input
from .shapes import scale_pair

OPS = ("upsample_bilinear2d_forward", "upsample_bilinear2d_backward",
       "upsample_nearest2d_forward", "upsample_nearest2d_backward",
       "upsample_trilinear3d_forward", "upsample_trilinear3d_backward",
       "upsample_nearest3d_forward", "upsample_nearest3d_backward")


def _phase_offset(r, s):
    """Source position minus i for output s*i + r: (r + 0.5)/s - 0.5, in (-1/2, 1/2)."""
    return (2 * r + 1 - s) / (2 * s)


def _interp_axis(x, s, axis):
    """Linear interpolation by the integer factor s along ``axis`` (align_corners=False).

    x: (..., L, ...) -> (..., s*L, ...). Output o = s*i + r sits at source position i + d_r with
    d_r = (r + 1/2)/s - 1/2. For d_r < 0 it mixes x[i-1] (weight -d_r) and x[i] (1 + d_r); for
    d_r >= 0, x[i] (1 - d_r) and x[i+1] (d_r). Beyond the edges PyTorch clamps the source index, so
    the first (last) output rows of a phase copy x[0] (x[L-1]).
    """
    if s == 1:
        return x
    L = x.shape[axis]
    shape = list(x.shape)
    shape[axis] = s * L
    y = np.empty(shape, dtype=x.dtype)

    def sl(a, start, stop, step=None):  # a[..., start:stop:step, ...] along axis
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(start, stop, step)
        return a[tuple(idx)]

    lo, hi = sl(x, 0, L - 1), sl(x, 1, L)          # x[i], x[i+1] for i < L-1
    for r in range(s):
        d = _phase_offset(r, s)
        phase = sl(y, r, None, s)                  # y[s*i + r], i = 0..L-1
        if d < 0:                                  # i >= 1 mixes x[i-1], x[i]; i = 0 copies x[0]
            inner, edge, edge_src = sl(phase, 1, None), sl(phase, 0, 1), sl(x, 0, 1)
            np.multiply(lo, -d, out=inner)
            inner += (1 + d) * hi
        else:                                      # i <= L-2 mixes x[i], x[i+1]; i = L-1 copies x[L-1]
            inner, edge, edge_src = sl(phase, 0, L - 1), sl(phase, L - 1, L), sl(x, L - 1, L)
            np.multiply(lo, 1 - d, out=inner)
            if d:
                inner += d * hi
        edge[...] = edge_src
    return y


def _interp_axis_adjoint(dy, s, axis):
    """The transpose of _interp_axis: dy (..., s*L, ...) -> dx (..., L, ...)."""
    if s == 1:
        return dy
    L = dy.shape[axis] // s
    shape = list(dy.shape)
    shape[axis] = L
    dx = np.zeros(shape, dtype=dy.dtype)

    def sl(a, start, stop, step=None):
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(start, stop, step)
        return a[tuple(idx)]

    lo, hi = sl(dx, 0, L - 1), sl(dx, 1, L)
    for r in range(s):
        d = _phase_offset(r, s)
        g = sl(dy, r, None, s)
        if d < 0:
            inner = sl(g, 1, None)
            lo += -d * inner
            hi += (1 + d) * inner
            sl(dx, 0, 1)[...] += sl(g, 0, 1)
        else:
            inner = sl(g, 0, L - 1)
            lo += (1 - d) * inner
            if d:
                hi += d * inner
            sl(dx, L - 1, L)[...] += sl(g, L - 1, L)
    return dx


def upsample_bilinear2d_forward(x, scale):
    """y = A_h x A_w^T per (n, c) plane, applied as two separable 1-D passes (W, then H).

    x: (N, C, H, W) -> y: (N, C, sh*H, sw*W), same dtype.  cache: (sh, sw).
    """
    sh, sw = scale_pair(scale)
    y = _interp_axis(_interp_axis(x, sw, 3), sh, 2)
    if y is x:
        y = x.copy()
    return y, (sh, sw)


def upsample_bilinear2d_backward(dy, cache):
    """dx = A_h^T dy A_w: the adjoint of the forward's linear map.

    dy: (N, C, sh*H, sw*W) -> dx: (N, C, H, W).  Since y = A_h x A_w^T is linear in x,
    dL/dx_ij = sum_ab dL/dy_ab A_h[a,i] A_w[b,j], i.e. A_h^T dy A_w; each 1-D pass is transposed:
    every output row's weights are added back into the two inputs it read.
    Long form: docs/backprop.md#bilinear-upsampling-and-its-adjoint.
    """
    sh, sw = cache
    dx = _interp_axis_adjoint(_interp_axis_adjoint(dy, sh, 2), sw, 3)
    if dx is dy:
        dx = dy.copy()
    return dx


def upsample_nearest2d_forward(x, scale):
    """y[n, c, a, b] = x[n, c, a // sh, b // sw].  x: (N, C, H, W) -> y: (N, C, sh*H, sw*W).
    cache: (sh, sw)."""
    sh, sw = scale_pair(scale)
    N, C, H, W = x.shape
    y = np.empty((N, C, H, sh, W, sw), dtype=x.dtype)
    y[...] = x[:, :, :, None, :, None]
    return y.reshape(N, C, H * sh, W * sw), (sh, sw)


def upsample_nearest2d_backward(dy, cache):
    """dx[n, c, i, j] = sum of dy over the sh x sw block that copied x[n, c, i, j].
    dy: (N, C, sh*H, sw*W) -> dx: (N, C, H, W).  Each output is a copy of one input (a 0/1 matrix
    with one 1 per row), so the adjoint adds every output's gradient to the input it copied.
    Long form: docs/backprop.md#bilinear-upsampling-and-its-adjoint."""
    sh, sw = cache
    N, C, Ho, Wo = dy.shape
    return dy.reshape(N, C, Ho // sh, sh, Wo // sw, sw).sum(axis=(3, 5))


def align_corners_matrix(L, s, xp=np, dtype=np.float64):
    """(s*L, L) linear-interpolation matrix with align_corners=True: output o reads the source
    position o * (L - 1) / (s*L - 1), so the first and last outputs are exactly x[0] and x[L-1];
    row o holds 1 - w at floor(pos) and w at floor(pos) + 1 (two non-zeros, summing to 1)."""
    So = s * L
    A = np.zeros((So, L), dtype=np.float64)
    if L == 1:
        A[:, 0] = 1.0
    else:
        pos = np.arange(So) * ((L - 1) / (So - 1))
        i0 = np.minimum(np.floor(pos).astype(np.int64), L - 2)
        w = pos - i0
        A[np.arange(So), i0] = 1 - w
        A[np.arange(So), i0 + 1] += w
    return xp.asarray(A.astype(dtype))


def linear_align_corners_forward(x, scale, xp=np):
    """Bilinear (or trilinear: one pass per spatial axis) upsampling with align_corners=True, as
    torch's F.interpolate(..., align_corners=True). x: (N, C, *S) -> y: (N, C, *(s_k S_k)).
    Each axis is one matmul with its (s L, L) matrix A: y = A x along that axis. cache: the matrices.
    Written with the array module ``xp``, so it runs on any backend."""
    mats = []
    y = x
    for k, s in enumerate(scale):
        axis = 2 + k
        A = align_corners_matrix(x.shape[axis], int(s), xp, x.dtype)            # (sL, L)
        y = xp.moveaxis(xp.moveaxis(y, axis, -1) @ A.T, -1, axis)
        mats.append(A)
    return xp.ascontiguousarray(y), mats


def linear_align_corners_backward(dy, mats, xp=np):
    """The adjoint: dx = A^T dy along each axis (in the forward: y = A x, so dx = A^T dy)."""
    dx = dy
    for k in reversed(range(len(mats))):
        axis = 2 + k
        dx = xp.moveaxis(xp.moveaxis(dx, axis, -1) @ mats[k], -1, axis)
    return xp.ascontiguousarray(dx)


# -- volumes: the same 1-D interpolation, once per axis ------------------------------------------------
def upsample_trilinear3d_forward(x, scale, align_corners=False):
    """Trilinear upsampling, as F.interpolate(mode='trilinear'): separable, one 1-D linear
    interpolation per axis (W, then H, then D), y = A_d A_h A_w x.

    x: (N, C, D, H, W) -> y: (N, C, sd*D, sh*H, sw*W), same dtype. align_corners=False runs the
    phase-wise strided passes of the bilinear case (O(output)); True the (s L, L) matrices of
    linear_align_corners_forward. cache: (scale triple, align_corners, those matrices or None).
    """
    scale = scale_pair(scale, dims=3)
    if align_corners:
        y, mats = linear_align_corners_forward(x, scale)
        return y, (scale, True, mats)
    y = _interp_axis(_interp_axis(_interp_axis(x, scale[2], 4), scale[1], 3), scale[0], 2)
    if y is x:
        y = x.copy()
    return y, (scale, False, None)


def upsample_trilinear3d_backward(dy, cache):
    """dx = A_w^T A_h^T A_d^T dy: the forward is linear and separable, so its adjoint runs the
    transposed 1-D passes in the reverse order (D, then H, then W); each output's weights are added
    back into the inputs it read. dy: (N, C, sd*D, sh*H, sw*W) -> dx: (N, C, D, H, W).
    Long form: docs/backprop.md#what-changes-in-3-d."""
    (sd, sh, sw), align_corners, mats = cache
    if align_corners:
        return linear_align_corners_backward(dy, mats)
    dx = _interp_axis_adjoint(_interp_axis_adjoint(_interp_axis_adjoint(dy, sd, 2), sh, 3), sw, 4)
    if dx is dy:
        dx = dy.copy()
    return dx


def upsample_nearest3d_forward(x, scale):
    """y[n, c, a, b, e] = x[n, c, a // sd, b // sh, e // sw].
    x: (N, C, D, H, W) -> y: (N, C, sd*D, sh*H, sw*W). cache: (sd, sh, sw)."""
    sd, sh, sw = scale_pair(scale, dims=3)
    N, C, D, H, W = x.shape
    y = np.empty((N, C, D, sd, H, sh, W, sw), dtype=x.dtype)
    y[...] = x[:, :, :, None, :, None, :, None]
    return y.reshape(N, C, D * sd, H * sh, W * sw), (sd, sh, sw)


def upsample_nearest3d_backward(dy, cache):
    """dx = the sum of dy over the sd x sh x sw block that copied each voxel (a copy's adjoint adds).
    dy: (N, C, sd*D, sh*H, sw*W) -> dx: (N, C, D, H, W)."""
    sd, sh, sw = cache
    N, C, Do, Ho, Wo = dy.shape
    return dy.reshape(N, C, Do // sd, sd, Ho // sh, sh, Wo // sw, sw).sum(axis=(3, 5, 7))


class Upsample(Module):
    """Upsampling by an integer factor, as torch.nn.Upsample. mode: 'bilinear' (default) on
    (N, C, H, W), 'trilinear' on (N, C, D, H, W), 'nearest' on either; scale_factor an int or one
    integer per spatial axis. align_corners (bilinear, trilinear) as in PyTorch. Parameter-free: the
    input's float dtype is kept."""

    MODES = ("bilinear", "nearest", "trilinear")

    def __init__(self, scale_factor=2, mode="bilinear", align_corners=False, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if mode not in self.MODES:
            raise ValueError(f"Upsample: mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if align_corners and mode == "nearest":
            raise ValueError("Upsample: align_corners=True needs mode='bilinear' or 'trilinear' (as "
                             "PyTorch)")
        # a triple (or mode 'trilinear') scales volumes; an int serves 'nearest' on either rank
        three = mode == "trilinear" or (mode == "nearest" and isinstance(scale_factor, (tuple, list))
                                        and len(scale_factor) == 3)
        self.scale_factor = scale_pair(scale_factor, dims=3 if three else 2)
        self._scale_any_rank = None if isinstance(scale_factor, (tuple, list)) else scale_factor
        self.mode = mode
        self.align_corners = bool(align_corners)  # True: linear_align_corners_forward, any backend

    def _volume_scale(self, x):
        """The (sd, sh, sw) factors for a 5-D input; an error for the wrong rank."""
        if getattr(x, "ndim", None) == 5 and self.mode != "bilinear":
            if len(self.scale_factor) == 3:
                return self.scale_factor
            if self._scale_any_rank is not None:
                return scale_pair(self._scale_any_rank, dims=3)
            raise ValueError(f"Upsample: a volume (N, C, D, H, W) needs a scale_factor triple "
                             f"(d, h, w), got {self.scale_factor}")
        if self.mode == "trilinear" or len(self.scale_factor) == 3:
            raise ValueError(f"Upsample: mode {self.mode!r} with scale_factor {self.scale_factor} "
                             f"expects a 5-D array (N, C, D, H, W), got shape "
                             f"{tuple(getattr(x, 'shape', ()))}" + (" (for an image use "
                             "mode='bilinear')" if self.mode == "trilinear" else ""))
        if getattr(x, "ndim", None) == 5:
            raise ValueError(f"Upsample: mode 'bilinear' expects a 4-D array (N, C, H, W), got shape "
                             f"{tuple(x.shape)} (for a volume use mode='trilinear')")
        return None

    def forward(self, x):
        scale3 = self._volume_scale(x)
        if scale3 is not None:
            x = check_input("Upsample", x, ndim=5, xp=self.xp)
            if self.mode == "trilinear":
                y, cache = self.ops.upsample_trilinear3d_forward(x, scale3, self.align_corners)
            else:
                y, cache = self.ops.upsample_nearest3d_forward(x, scale3)
            self._keep((("3d", cache), tuple(y.shape)))
            return y
        x = check_input("Upsample", x, xp=self.xp)
        if self.align_corners:
            y, mats = linear_align_corners_forward(x, self.scale_factor, self.xp)
            self._keep((("align_corners", mats), tuple(y.shape)))
            return y
        fwd = self.ops.upsample_bilinear2d_forward if self.mode == "bilinear" else \
            self.ops.upsample_nearest2d_forward
        y, cache = fwd(x, self.scale_factor)
        self._keep((cache, tuple(y.shape)))
        return y

    def backward(self, dy):
        cache, shape = self._take()
        dy = self.xp.asarray(dy)
        if tuple(dy.shape) != shape:
            raise ValueError(f"Upsample: backward expected dy of shape {shape}, got {tuple(dy.shape)}")
        if isinstance(cache, tuple) and cache and cache[0] == "3d":
            bwd = self.ops.upsample_trilinear3d_backward if self.mode == "trilinear" else \
                self.ops.upsample_nearest3d_backward
            dx = bwd(dy, cache[1])
            self._release()
            return dx
        if isinstance(cache, tuple) and cache and cache[0] == "align_corners":
            dx = linear_align_corners_backward(dy, cache[1], self.xp)
            self._release()
            return dx
        bwd = self.ops.upsample_bilinear2d_backward if self.mode == "bilinear" else \
            self.ops.upsample_nearest2d_backward
        dx = bwd(dy, cache)
        self._release()
        return dx

    def extra_repr(self):
        s = self.scale_factor
        corners = ", align_corners=True" if self.align_corners else ""
        return f"scale_factor={s[0] if len(set(s)) == 1 else s}, mode={self.mode!r}{corners}"

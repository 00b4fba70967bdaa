"""Upsampling by an integer factor: Upsample (bilinear or nearest).

Primitives (plain NumPy; ``scale`` is an int or an (sh, sw) pair of ints):

    upsample_bilinear2d_forward(x, scale) -> (y, cache)
    upsample_bilinear2d_backward(dy, cache) -> dx
    upsample_nearest2d_forward(x, scale) -> (y, cache)
    upsample_nearest2d_backward(dy, cache) -> dx

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
       "upsample_nearest2d_forward", "upsample_nearest2d_backward")


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


class Upsample(Module):
    """Upsampling of (N, C, H, W) input by an integer factor, as torch.nn.Upsample with
    align_corners=False. mode: 'bilinear' (default) or 'nearest'. Parameter-free: the input's float
    dtype is kept."""

    MODES = ("bilinear", "nearest")

    def __init__(self, scale_factor=2, mode="bilinear", align_corners=False, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if mode not in self.MODES:
            raise ValueError(f"Upsample: mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if align_corners and mode == "nearest":
            raise ValueError("Upsample: align_corners=True needs mode='bilinear' (as PyTorch)")
        self.scale_factor = scale_pair(scale_factor)
        self.mode = mode
        self.align_corners = bool(align_corners)  # True: linear_align_corners_forward, any backend

    def forward(self, x):
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
        sh, sw = self.scale_factor
        corners = ", align_corners=True" if self.align_corners else ""
        return f"scale_factor={sh if sh == sw else (sh, sw)}, mode={self.mode!r}{corners}"

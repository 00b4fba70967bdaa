"""The ``cupy`` backend: CuPy arrays, cuBLAS GEMMs and hand-written CUDA C kernels.

Every layer primitive and the softmax cross-entropy are replaced here; the rest of the table (BCE,
Dice) keeps the reference functions, which are written on the array module of their input and so run
on CuPy too (as CuPy array operations, not kernels of this project). conv2d_backward takes
input_grad=False to skip dx. The optimizers of unet_np.optim update the parameters of a cupy model
with the fused kernels of optim.cu (``sgd_step`` / ``adam_step``: one pass per parameter).

    GEMMs                  cupy.matmul (cuBLAS; in true float32 unless allow_tf32 is set)
    everything else        CUDA C in kernels/cuda/<family>.cu (installed as unet_np.kernels.cuda),
                           compiled once per family with cupy.RawModule (NVRTC) and cached

Each kernel has float32 and float64 entry points, ``<name>_f32`` / ``<name>_f64``; each .cu file
names the NumPy function it mirrors. The convolutions (kernels/cupy_conv.py, mixed into CudaKernels)
run 3x3 stride-1 layers as Winograd F(4x4, 3x3) (winograd.cu: transforms as kernels, the 36 position
GEMMs as one batched cuBLAS call), the rest as im2col + cuBLAS (conv.cu), 1x1 ones as one batched GEMM
on the NCHW arrays. A convolution's cache keeps its INPUT, never a column buffer: the backward
rebuilds the columns with one pass, so a training step holds one such buffer at a time.
Reductions (bias gradients, batch-norm statistics, the loss's sums) accumulate
in double in two deterministic passes (no atomics), so a run is bit-for-bit repeatable.

The kernels are launched through one small interface, ``get_function(family, name)(grid, block,
args)``, with every scalar argument typed (np.int64 for ``long long``, the array dtype for ``T``).
``CudaKernels`` takes the array module and that getter as arguments, so the tests can also run this
exact Python code and the exact .cu sources on the CPU (NumPy arrays, the .cu files compiled by g++
as plain C++ and run with their real thread blocks; see tests/backends/cuda_emulation.py).

Importing this module does not import CuPy; ``make_backend()`` does, and raises a clear error when
CuPy is missing, no GPU is visible or the driver is too old (``unet_np.backends.get`` turns it into
BackendUnavailable naming the ``cuda12`` extra).
"""
import contextlib
import functools
import importlib.resources
import os

import numpy as np

from . import Backend
from ..kernels.cupy_conv import SUFFIX as _SUFFIX, WINOGRAD_MODES, Convolutions, float_dtype, kernel_int
from ..kernels.cupy_vol import Volumes
from ..nn.shapes import pair, scale_pair      # the reference primitives' hyper-parameter normalisation

_i = kernel_int                 # a ``long long`` kernel argument
_dtype = float_dtype            # the array's dtype, float32 or float64 (TypeError otherwise)

FAMILIES = ("conv", "winograd", "direct", "pool", "elementwise", "upsample", "norm", "loss", "optim", "gemm", "vol")
THREADS = 256              # threads per block for the 1-D grid-stride kernels (norm.cu needs 2^k)
MAX_BLOCKS = 1 << 20       # grid-stride loops cover the rest

# The primitives of the reference table this backend replaces (the rest stay the reference's).
REPLACED = (
    "conv2d_forward", "conv2d_backward", "conv_transpose2d_forward", "conv_transpose2d_backward",
    "relu_forward", "relu_backward", "sigmoid_forward", "sigmoid_backward",
    "maxpool2d_forward", "maxpool2d_backward",
    "upsample_bilinear2d_forward", "upsample_bilinear2d_backward",
    "upsample_nearest2d_forward", "upsample_nearest2d_backward",
    "concat_forward", "concat_backward", "center_crop_forward", "center_crop_backward",
    "pad2d_forward", "pad2d_backward",
    "batchnorm2d_forward", "batchnorm2d_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    # volumes (kernels/cupy_vol.py, vol.cu)
    "conv3d_forward", "conv3d_backward", "conv_transpose3d_forward", "conv_transpose3d_backward",
    "maxpool3d_forward", "maxpool3d_backward", "pad3d_forward", "pad3d_backward",
    "upsample_trilinear3d_forward", "upsample_trilinear3d_backward",
    "upsample_nearest3d_forward", "upsample_nearest3d_backward",
)

# Fused primitives beyond the reference table, asked for by layers that can use them (``fused`` on
# the Backend): 'conv2d_relu' is conv2d_forward(..., activation='relu'), whose backward masks dy
# ('conv3d_relu' likewise conv3d_forward's).
FUSED = frozenset({"conv2d_relu", "conv3d_relu"})

# ---------------------------------------------------------------------------------------------------
# Kernel sources
# ---------------------------------------------------------------------------------------------------
def kernel_path(family):
    """The path of kernels/cuda/<family>.cu: through importlib.resources (regular and editable
    installs), else next to the source tree."""
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}: expected one of {', '.join(FAMILIES)}")
    try:
        res = importlib.resources.files("unet_np.kernels.cuda") / f"{family}.cu"
        if res.is_file():
            return res
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, os.pardir, os.pardir, "kernels", "cuda", f"{family}.cu")


def kernel_source(family):
    """The CUDA C source of one family, as text."""
    path = kernel_path(family)
    if hasattr(path, "read_text"):
        return path.read_text(encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def _cupy_module(family):
    import cupy
    return cupy.RawModule(code=kernel_source(family))


@functools.lru_cache(maxsize=None)
def _cupy_function(family, name):
    return _cupy_module(family).get_function(name)


# ---------------------------------------------------------------------------------------------------
# The primitives
# ---------------------------------------------------------------------------------------------------
class CudaKernels(Convolutions, Volumes):
    """Every primitive of the cupy backend, on array module ``xp`` with kernels from
    ``get_function(family, name)`` (a callable ``f(grid, block, args)``, as cupy.RawKernel). The
    convolutions are kernels/cupy_conv.py's, the 3-D primitives and center_crop kernels/cupy_vol.py's
    (mixed in).

    winograd: 'auto' (3x3 stride-1 convolutions with >= WINO_MIN_CHANNELS input and output channels
    run as Winograd F(4x4, 3x3)), 'always' (every 3x3 stride-1 one) or 'never' (im2col + GEMM).
    allow_tf32: float32 GEMMs may run on tensor cores in TF32 (10-bit mantissa inputs, float32
    accumulation), as PyTorch's default for convolutions; off by default. ``tf32_scope(enabled)``
    returns a context manager inside which the float32 GEMMs of ``xp.matmul`` run in TF32 (enabled)
    or in true float32 (not enabled, whatever CUPY_TF32 says); the real backend's is
    cupy_tf32_scope. Without one (NumPy) allow_tf32 cannot be set."""

    def __init__(self, xp, get_function, winograd="auto", allow_tf32=False, tf32_scope=None):
        if winograd not in WINOGRAD_MODES:
            raise ValueError(f"winograd must be one of {', '.join(WINOGRAD_MODES)}, got {winograd!r}")
        self.xp = xp
        self._get = get_function
        self.winograd = winograd
        self.tf32_scope = tf32_scope
        self.allow_tf32 = False
        self.set_allow_tf32(allow_tf32)

    def set_allow_tf32(self, flag):
        """Let float32 GEMMs run in TF32 (True) or keep them in true float32 (False, the default)."""
        if flag and self.tf32_scope is None:
            raise ValueError("allow_tf32=True needs a tf32_scope (the real backend has one: CuPy on a GPU "
                             "of compute capability 8.0 or newer)")
        self.allow_tf32 = bool(flag)

    def _matmul(self, a, b):
        """xp.matmul(a, b): every GEMM of the backend goes through here (TF32 only when allowed)."""
        if self.tf32_scope is not None and np.dtype(a.dtype) == np.float32:
            with self.tf32_scope(self.allow_tf32):
                return self.xp.matmul(a, b)
        return self.xp.matmul(a, b)

    # -- plumbing -------------------------------------------------------------------------------
    def table(self):
        """The backend's table: the reference primitives with REPLACED swapped for these."""
        from .numpy_backend import reference_ops
        ops = reference_ops()
        for name in REPLACED:
            ops[name] = getattr(self, name)
        return ops

    def _fn(self, family, name, dtype):
        return self._get(family, f"{name}_{_SUFFIX[np.dtype(dtype)]}")

    def _launch(self, family, name, dtype, n, *args):
        """A 1-D grid-stride kernel over n items."""
        blocks = int(max(1, min(-(-int(n) // THREADS), MAX_BLOCKS)))
        self._fn(family, name, dtype)((blocks,), (THREADS,), args)

    def _c(self, a, dtype=None):
        return self.xp.ascontiguousarray(a, dtype=dtype)

    def _reduce(self, a, N, C, L, mode=0, b=None, m=None, scale=1.0):
        """(C,) per-channel sums of a (N, C, L) array, in a's dtype (accumulated in double).
        mode 0: sum a; 1: sum (a - m[c])^2; 2: sum a * b (norm.cu)."""
        xp, dt = self.xp, np.dtype(a.dtype)
        count = int(N) * int(L)
        splits = int(min(1024, max(1, -(-count // (THREADS * 64)))))
        partial = xp.empty(int(C) * splits, dtype=np.float64)
        f = self._fn("norm", "channel_reduce_partial", dt)
        f((splits, int(min(C, 65535)), 1), (THREADS, 1, 1),
          (a, a if b is None else b, a if m is None else m, partial, _i(N), _i(C), _i(L), _i(splits),
           _i(mode)))
        out = xp.empty(int(C), dtype=dt)
        self._launch("norm", "channel_reduce_finish", dt, C, partial, out, _i(C), _i(splits),
                     np.float64(scale))
        return out

    # -- activations -------------------------------------------------------------------------------
    def _unary(self, name, x):
        dt = _dtype(x, name)
        x = self._c(x, dt)
        y = self.xp.empty(x.shape, dtype=dt)
        self._launch("elementwise", name, dt, x.size, x, y, _i(x.size))
        return y

    def _unary_backward(self, name, dy, y):
        dt = np.dtype(y.dtype)
        dy = self._c(dy, dt)
        y = self._c(y)
        dx = self.xp.empty(y.shape, dtype=dt)
        self._launch("elementwise", name, dt, y.size, dy, y, dx, _i(y.size))
        return dx

    def relu_forward(self, x):
        y = self._unary("relu_fwd", x)
        return y, y

    def relu_backward(self, dy, y):
        return self._unary_backward("relu_bwd", dy, y)

    def sigmoid_forward(self, x):
        y = self._unary("sigmoid_fwd", x)
        return y, y

    def sigmoid_backward(self, dy, y):
        return self._unary_backward("sigmoid_bwd", dy, y)

    # -- max-pooling ---------------------------------------------------------------------------------
    def maxpool2d_forward(self, x, kernel, stride, padding):
        (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
        dt = _dtype(x, "maxpool2d_forward")
        x = self._c(x)
        N, C, H, W = x.shape
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        y = self.xp.empty((N, C, Ho, Wo), dtype=dt)
        arg = self.xp.empty((N, C, Ho, Wo), dtype=np.int32)
        if (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0):
            self._launch("pool", "maxpool2x2_fwd", dt, y.size, x, y, arg, _i(N * C), _i(H), _i(W), _i(Ho), _i(Wo))
        else:
            self._launch("pool", "maxpool_fwd", dt, y.size, x, y, arg, _i(N * C), _i(H), _i(W), _i(Ho), _i(Wo),
                         _i(kh), _i(kw), _i(sh), _i(sw), _i(ph), _i(pw))
        return y, (arg, tuple(x.shape), (kh, kw), (sh, sw), (ph, pw))

    def maxpool2d_backward(self, dy, cache):
        arg, shape, (kh, kw), (sh, sw), (ph, pw) = cache
        dt = _dtype(dy, "maxpool2d_backward")
        dy = self._c(dy)
        N, C, H, W = shape
        Ho, Wo = arg.shape[2:]
        dx = self.xp.empty(shape, dtype=dt)
        if (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0):
            self._launch("pool", "maxpool2x2_bwd", dt, dx.size, dy, arg, dx, _i(N * C), _i(H), _i(W), _i(Ho),
                         _i(Wo))
        else:
            self._launch("pool", "maxpool_bwd", dt, dx.size, dy, arg, dx, _i(N * C), _i(H), _i(W), _i(Ho), _i(Wo),
                         _i(kh), _i(kw), _i(sh), _i(sw), _i(ph), _i(pw))
        return dx

    # -- upsampling ----------------------------------------------------------------------------------
    def _up_forward(self, name, x, scale):
        sh, sw = scale_pair(scale)
        dt = _dtype(x, name)
        x = self._c(x)
        N, C, H, W = x.shape
        y = self.xp.empty((N, C, sh * H, sw * W), dtype=dt)
        self._launch("upsample", name, dt, y.size, x, y, _i(N * C), _i(H), _i(W), _i(sh), _i(sw))
        return y, (sh, sw)

    def _up_backward(self, name, dy, cache):
        sh, sw = cache
        dt = _dtype(dy, name)
        dy = self._c(dy)
        N, C, Ho, Wo = dy.shape
        H, W = Ho // sh, Wo // sw
        dx = self.xp.empty((N, C, H, W), dtype=dt)
        self._launch("upsample", name, dt, dx.size, dy, dx, _i(N * C), _i(H), _i(W), _i(sh), _i(sw))
        return dx

    def upsample_bilinear2d_forward(self, x, scale):
        return self._up_forward("bilinear_fwd", x, scale)

    def upsample_bilinear2d_backward(self, dy, cache):
        return self._up_backward("bilinear_bwd", dy, cache)

    def upsample_nearest2d_forward(self, x, scale):
        return self._up_forward("nearest_fwd", x, scale)

    def upsample_nearest2d_backward(self, dy, cache):
        return self._up_backward("nearest_bwd", dy, cache)

    # -- concatenation, crop, pad -------------------------------------------------------------------
    def concat_forward(self, xs, axis):
        xs = [self._c(x) for x in xs]
        ref = xs[0]
        dt = _dtype(ref, "concat_forward")
        axis = axis % ref.ndim
        A = int(np.prod(ref.shape[:axis], dtype=np.int64))
        L = int(np.prod(ref.shape[axis + 1:], dtype=np.int64))
        sizes = tuple(int(x.shape[axis]) for x in xs)
        total = sum(sizes)
        shape = ref.shape[:axis] + (total,) + ref.shape[axis + 1:]
        y = self.xp.empty(shape, dtype=dt)
        off = 0
        for x, bk in zip(xs, sizes):
            self._launch("elementwise", "slab_copy", dt, A * bk * L, self._c(x, dt), y, _i(A), _i(bk), _i(total),
                         _i(L), _i(bk), _i(0), _i(off))
            off += bk
        return y, (axis, sizes)

    def concat_backward(self, dy, cache):
        axis, sizes = cache
        dt = _dtype(dy, "concat_backward")
        dy = self._c(dy)
        A = int(np.prod(dy.shape[:axis], dtype=np.int64))
        L = int(np.prod(dy.shape[axis + 1:], dtype=np.int64))
        total = sum(sizes)
        out, off = [], 0
        for bk in sizes:
            d = self.xp.empty(dy.shape[:axis] + (bk,) + dy.shape[axis + 1:], dtype=dt)
            self._launch("elementwise", "slab_copy", dt, d.size, dy, d, _i(A), _i(total), _i(bk), _i(L), _i(bk),
                         _i(off), _i(0))
            out.append(d)
            off += bk
        return tuple(out)

    def _window(self, src, out_hw, dt_, dl_, fill=0.0):
        """dst[..., h, w] = src[..., h + dt_, w + dl_] inside src, else fill."""
        dt = np.dtype(src.dtype)
        Hs, Ws = src.shape[-2:]
        Hd, Wd = out_hw
        NC = src.size // (Hs * Ws)
        dst = self.xp.empty(tuple(src.shape[:-2]) + (Hd, Wd), dtype=dt)
        self._launch("elementwise", "window_copy", dt, dst.size, src, dst, _i(NC), _i(Hs), _i(Ws), _i(Hd), _i(Wd),
                     _i(dt_), _i(dl_), dt.type(fill))
        return dst

    def pad2d_forward(self, x, pads, mode, value=0.0):
        l, r, t, b = (int(v) for v in pads)
        dt = _dtype(x, "pad2d_forward")
        x = self._c(x)
        N, C, H, W = x.shape
        if mode == "constant":
            y = self._window(x, (t + H + b, l + W + r), -t, -l, fill=value)
        elif mode == "reflect":
            if min(l, r, t, b) < 0 or max(l, r) >= W or max(t, b) >= H:
                raise ValueError(f"pad2d_forward: reflect padding must be >= 0 and smaller than the padded "
                                 f"dimension, got pads (left, right, top, bottom) = {(l, r, t, b)} for an "
                                 f"input of {H}x{W}")
            y = self.xp.empty((N, C, t + H + b, l + W + r), dtype=dt)
            self._launch("elementwise", "reflect_pad_fwd", dt, y.size, x, y, _i(N * C), _i(H), _i(W),
                         _i(t + H + b), _i(l + W + r), _i(t), _i(l))
        else:
            raise ValueError(f"pad2d_forward: mode must be one of reflect, constant, got {mode!r}")
        return y, ((l, r, t, b), mode)

    def pad2d_backward(self, dy, cache):
        (l, r, t, b), mode = cache
        dt = _dtype(dy, "pad2d_backward")
        dy = self._c(dy)
        N, C, Hp, Wp = dy.shape
        H, W = Hp - t - b, Wp - l - r
        if mode == "constant":
            return self._window(dy, (H, W), t, l)
        dx = self.xp.empty((N, C, H, W), dtype=dt)
        self._launch("elementwise", "reflect_pad_bwd", dt, dx.size, dy, dx, _i(N * C), _i(H), _i(W), _i(t), _i(b),
                     _i(l), _i(r))
        return dx

    # -- batch normalisation -------------------------------------------------------------------------
    def _affine(self, x, a, c):
        dt = np.dtype(x.dtype)
        N, C = x.shape[:2]
        y = self.xp.empty(x.shape, dtype=dt)
        self._launch("norm", "channel_affine", dt, x.size, x, self._c(a, dt), self._c(c, dt), y, _i(C),
                     _i(x.size // (N * C)), _i(x.size))
        return y

    def _normalise(self, x, mu, inv_std, gamma=None, beta=None):
        """(xhat, y): xhat = (x - mu) * inv_std, y = xhat * gamma + beta (per channel)."""
        dt = np.dtype(x.dtype)
        N, C = x.shape[:2]
        xhat = self.xp.empty(x.shape, dtype=dt)
        y = self.xp.empty(x.shape, dtype=dt)
        g = None if gamma is None else self._c(gamma, dt)
        bt = None if beta is None else self._c(beta, dt)
        self._launch("norm", "bn_train_fwd", dt, x.size, x, self._c(mu, dt), self._c(inv_std, dt),
                     x if g is None else g, _i(g is not None), x if bt is None else bt, _i(bt is not None),
                     xhat, y, _i(C), _i(x.size // (N * C)), _i(x.size))
        return xhat, y

    def batchnorm2d_forward(self, x, gamma, beta, mean, var, eps, training):
        xp = self.xp
        dt = _dtype(x, "batchnorm2d_forward")
        x = self._c(x)
        N, C = x.shape[:2]
        L = x.size // (N * C)
        M = N * L
        if training:
            mu = self._reduce(x, N, C, L, mode=0, scale=1.0 / M)
            v = self._reduce(x, N, C, L, mode=1, m=mu, scale=1.0 / M)          # two-pass variance
            inv_std = (1.0 / xp.sqrt(v + eps)).astype(dt, copy=False)
            xhat, y = self._normalise(x, mu, inv_std, gamma, beta)
            return y, (True, xhat, gamma, inv_std), mu, v
        inv_std = (1.0 / xp.sqrt(var + eps)).astype(dt, copy=False)
        a = inv_std if gamma is None else gamma * inv_std
        c = -mean * a if beta is None else beta - mean * a
        y = self._affine(x, a, c)
        return y, (False, x, gamma, inv_std, mean), None, None

    def batchnorm2d_backward(self, dy, cache):
        xp = self.xp
        if cache[0]:
            _, xhat, gamma, inv_std = cache
            dt = np.dtype(xhat.dtype)
            dy = self._c(dy, dt)
            N, C = dy.shape[:2]
            L = dy.size // (N * C)
            M = N * L
            dbeta = self._reduce(dy, N, C, L, mode=0)
            dgamma = self._reduce(dy, N, C, L, mode=2, b=xhat)
            scale = inv_std if gamma is None else gamma * inv_std
            dx = xp.empty(dy.shape, dtype=dt)
            self._launch("norm", "bn_train_bwd", dt, dy.size, dy, xhat, self._c(dgamma / M, dt),
                         self._c(dbeta / M, dt), self._c(scale, dt), dx, _i(C), _i(L), _i(dy.size))
            return dx, dgamma, dbeta
        _, x, gamma, inv_std, mean = cache
        dt = np.dtype(x.dtype)
        dy = self._c(dy, dt)
        N, C = dy.shape[:2]
        L = dy.size // (N * C)
        dbeta = self._reduce(dy, N, C, L, mode=0)
        xhat, _ = self._normalise(x, mean, inv_std)
        dgamma = self._reduce(dy, N, C, L, mode=2, b=xhat)
        scale = inv_std if gamma is None else gamma * inv_std
        dx = self._affine(dy, scale, xp.zeros(C, dtype=dt))
        return dx, dgamma, dbeta

    # -- softmax cross-entropy ----------------------------------------------------------------------
    def softmax_cross_entropy_forward(self, logits, target, class_weight=None, ignore_index=-100,
                                      pixel_weight=None):
        """Mean weighted cross-entropy (see loss.cu and unet_np/nn/loss.py) -> (0-d loss, cache)."""
        xp = self.xp
        dt = _dtype(logits, "softmax_cross_entropy_forward")
        x = self._c(logits)
        N, C = x.shape[:2]
        M = x.size // (N * C)
        t = self._c(target.reshape(N, M), np.int64)
        cw = None if class_weight is None else self._c(class_weight, dt)
        pw = None if pixel_weight is None else self._c(pixel_weight.reshape(N, M), dt)
        w = xp.empty(N * M, dtype=dt)
        lw = xp.empty(N * M, dtype=dt)
        args = (x, t, x if cw is None else cw, _i(cw is not None), x if pw is None else pw, _i(pw is not None),
                _i(ignore_index))
        self._launch("loss", "xent_fwd", dt, N * M, *args, w, lw, _i(N), _i(C), _i(M))
        denom = self._reduce(w, 1, 1, N * M)                                  # (1,): sum_i w_i
        total = self._reduce(lw, 1, 1, N * M)                                 # (1,): sum_i pw_i w_i l_i
        d = float(denom[0])
        if d == 0:
            loss = xp.asarray(np.nan, dtype=dt)                               # PyTorch: NaN, zero gradient
        else:
            loss = (total / denom).reshape(())
        return loss, (args, dt.type(d), tuple(logits.shape), (N, C, M))

    def softmax_cross_entropy_backward(self, cache):
        args, denom, shape, (N, C, M) = cache
        x = args[0]
        dx = self.xp.empty(x.shape, dtype=x.dtype)
        self._launch("loss", "xent_bwd", x.dtype, N * M, *args, denom, dx, _i(N), _i(C), _i(M))
        return dx.reshape(shape)

    # -- fused optimizer updates (optim.cu): unet_np.optim's SGD / Adam / AdamW, one pass per parameter --
    @staticmethod
    def _check_inplace(name, *arrays):
        for a in arrays:
            if a is not None and not a.flags.c_contiguous:
                raise ValueError(f"{name}: the arrays updated in place must be C-contiguous")

    def sgd_step(self, p, grad, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 first=False):
        """One torch.optim.SGD update of p (and of the momentum buffer buf), in place, in one pass.
        first: buf is initialised to the gradient (PyTorch's first step). buf may be None when
        momentum is 0."""
        dt = _dtype(p, "sgd_step")
        self._check_inplace("sgd_step", p, buf)
        g = self._c(grad, dt)
        T = dt.type
        self._launch("optim", "sgd_step", dt, p.size, p, g, p if buf is None else buf, _i(p.size), T(lr),
                     T(momentum), T(1 - dampening), T(weight_decay), _i(momentum != 0), _i(bool(nesterov)),
                     _i(bool(first)))

    def adam_step(self, p, grad, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled=False, vmax=None):
        """One torch.optim.Adam (decoupled=True: AdamW) update of p, m, v (and vmax: amsgrad) in place.
        step: the step number t >= 1 after this update (for the bias corrections)."""
        dt = _dtype(p, "adam_step")
        self._check_inplace("adam_step", p, m, v, vmax)
        g = self._c(grad, dt)
        b1, b2 = betas
        T = dt.type
        w1 = 1 - b1
        step_size = lr / (1 - b1 ** step)
        bc2_sqrt = (1 - b2 ** step) ** 0.5
        self._launch("optim", "adam_step", dt, p.size, p, g, m, v, p if vmax is None else vmax, _i(p.size),
                     T(weight_decay), T(1 - lr * weight_decay), _i(bool(decoupled)), T(w1), T(1 - w1), T(b2),
                     T(1 - b2), T(step_size), T(bc2_sqrt), T(eps), _i(vmax is not None))

    # -- the hand-written GEMM (gemm.cu), for readers and the benchmark -------------------------------
    def gemm_tiled(self, a, b, version=2):
        """C = a @ b with gemm.cu's shared-memory tiled kernel (version 1: 16x16 tiles, one output per
        thread; version 2: 64x64 tiles, 4x4 outputs per thread). a (M, K), b (K, N)."""
        dt = _dtype(a, "gemm_tiled")
        a, b = self._c(a, dt), self._c(b, dt)
        M, K = a.shape
        K2, N = b.shape
        if K2 != K:
            raise ValueError(f"gemm_tiled: shapes {a.shape} and {b.shape} do not chain")
        c = self.xp.empty((M, N), dtype=dt)
        tile = {1: 16, 2: 64}[version]
        grid = (-(-N // tile), -(-M // tile), 1)
        self._fn("gemm", f"gemm_tiled_v{version}", dt)(grid, (16, 16, 1), (a, b, c, _i(M), _i(N), _i(K)))
        return c

    # -- a quick end-to-end check that kernels compile and run here ----------------------------------
    def self_test(self):
        x = self.xp.asarray(np.array([-1.5, 0.0, 2.0, -0.0], dtype=np.float32))
        y, _ = self.relu_forward(x)
        got = np.asarray(y.get() if hasattr(y, "get") else y)
        if not np.array_equal(got, np.array([0.0, 0.0, 2.0, 0.0], dtype=np.float32)):
            raise RuntimeError(f"the CUDA kernels compiled but computed ReLU wrongly: {got}")


# ---------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------
def _check_gpu(cupy):
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:   # CUDARuntimeError: no driver, no device, insufficient driver ...
        raise RuntimeError(f"CuPy cannot use a CUDA GPU here (no GPU, no NVIDIA driver, or a driver "
                           f"too old for this CuPy build): {exc}") from exc
    if count < 1:
        raise RuntimeError("CuPy sees no CUDA GPU")
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
        runtime = cupy.cuda.runtime.runtimeGetVersion()
    except Exception:
        return
    if driver and runtime and driver // 1000 < runtime // 1000:
        raise RuntimeError(f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older "
                           f"than CUDA {runtime // 1000}.{runtime % 1000 // 10} that this CuPy was built for: "
                           f"update the driver, or install the CuPy build for the older CUDA "
                           f"(unet-np[cuda12] gives cupy-cuda12x)")


@functools.lru_cache(maxsize=None)
def kernels():
    """The CudaKernels of the real GPU backend (compiled lazily, family by family)."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("the cupy backend needs CuPy: pip install cupy-cuda12x (CUDA 12) or "
                          "cupy-cuda13x (CUDA 13); in a checkout the [cuda12] / [cuda13] extras") from exc
    _check_gpu(cupy)
    k = CudaKernels(cupy, _cupy_function, tf32_scope=cupy_tf32_scope)
    try:
        k.self_test()
    except Exception as exc:
        raise RuntimeError(f"the CUDA kernels of the cupy backend could not be compiled or run "
                           f"(NVRTC missing or too old?): {type(exc).__name__}: {exc}") from exc
    return k


@contextlib.contextmanager
def cupy_tf32_scope(enabled):
    """Inside: cupy.matmul of float32 runs in TF32 (enabled) or in true float32 (not enabled), whatever
    CUPY_TF32 says; the previous setting is restored after. CuPy has no per-call switch, so this
    sets its compute type for float32 (cupy._core._routines_linalg, the setting CUPY_TF32 feeds)."""
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, before)


def backend_from(name, xp, k):
    """The Backend over CudaKernels ``k``: its table of primitives, ``kernels`` (k itself), the
    fused optimizer updates that unet_np.optim uses (k.sgd_step, k.adam_step) and ``fused``, the
    fused primitives beyond the table (FUSED)."""
    backend = Backend(name, xp, k.table())
    backend.kernels = k
    backend.sgd_step, backend.adam_step = k.sgd_step, k.adam_step
    backend.fused = FUSED
    return backend


def make_backend():
    """The cupy backend. Its convolution settings are attributes of ``backend.kernels``: ``winograd``
    ('auto', 'always', 'never') and ``set_allow_tf32(True)`` (TF32 GEMMs, off by default)."""
    k = kernels()                   # raises a clear error without CuPy, a GPU or a recent driver
    import cupy
    return backend_from("cupy", cupy, k)

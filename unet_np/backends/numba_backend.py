"""The numba backend: NumPy arrays, the reference table with the memory-bound primitives replaced by
multi-threaded Numba kernels from unet_np/kernels/cpu_*.py.

What changes against the numpy backend:
  * convolutions run the same tiled GEMM drivers as the numpy backend (unet_np/nn/conv_fast.py,
    ``make_conv_primitives``), with compiled packing (im2col per tile, straight from NCHW), bias,
    pixel-shuffle, channel-sum and col2im helpers (kernels/cpu_conv.py); the GEMMs stay BLAS;
  * 3x3 stride-1 convolutions with >= 16 channels on >= 1024 output pixels run as Winograd
    F(4x4, 3x3): 36 GEMMs with K = C between compiled tile transforms (kernels/cpu_winograd.py),
    4x fewer multiply-adds than im2col, for the forward, the weight and the input gradient;
  * the 2x2 stride-2 max-pool is one pass with a compact argmax (kernels/cpu_pool.py);
  * 3-D convolutions run the band-tiled driver of unet_np/nn/conv3d_fast.py with compiled vol2col /
    col2vol (kernels/cpu_conv3d.py); kd x 3 x 3 stride-1 ones (3x3x3, 1x3x3) with >= 8 channels on
    >= 512 output voxels run as Winograd F(4x4, 3x3) in every plane with the depth taps summed
    directly (unet_np/nn/winograd3d.py, on the 2-D transforms of kernels/cpu_winograd.py: 36 GEMMs
    with K = kd C, 4x fewer multiplies than vol2col) for the forward, the weight and the input
    gradient; 3-D max-pools whose windows tile the volume (2x2x2, (1, 2, 2)) are one compiled pass;
  * ReLU forward and backward are single parallel passes (kernels/cpu_activation.py);
  * SGD and Adam/AdamW update each parameter in one parallel pass (kernels/cpu_optim.py, taken by
    unet_np.optim through the backend's sgd_step / adam_step), bit for bit the array code's result.
Numba's threads run on OpenMP with a short spin (below), Winograd's GEMM stacks on one BLAS thread
per share of positions. Everything else (other pools, upsampling, concatenation, norms, losses) is
the reference code.
Results are deterministic: no kernel reduces in parallel in an unspecified order.
"""
import numpy as np

from . import Backend
from .numpy_backend import reference_ops

try:
    import numba  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without numba
    raise ImportError("the numba backend needs the numba package: pip install numba threadpoolctl (or, in a checkout, pip install '.[numba]')") from exc

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait

# Numba's threading layer. The 'workqueue' layer wakes its threads through the OS for every parallel
# loop (26-46 us per call measured here, and a small training step makes some hundreds). The 'omp'
# layer (GNU OpenMP) hands a loop to threads still spinning from the last one (3 us), but by default
# they spin about 10 ms after each loop and take the cores that the OpenBLAS GEMM coming next needs
# (1.5-2.7x slower than 'workqueue'). So, on Linux: 'omp' with a short spin, GOMP_SPINCOUNT=1000
# (KMP_BLOCKTIME=0 for Intel's or LLVM's OpenMP), put in the environment only while Numba starts
# its threads and then taken out again, so that no other OpenMP user in the process sees it.
# Measured, article net training step at batch 1, 64x64: 100-106 ms with 'workqueue', 65-74 ms with
# this. Left alone: a layer the user chose (NUMBA_THREADING_LAYER, NUMBA_THREADING_LAYER_PRIORITY,
# a Numba config file or numba.config in code), Numba threads already started. 'workqueue' (as
# before) on other systems, when the user set an OpenMP spin variable (we would not know the spin),
# or when no OpenMP layer loads.
# Two things follow from OpenMP, as with Numba's own default layer or PyTorch:
#   * fork: a process that has started OpenMP threads cannot use them in a fork()ed child (Numba
#     stops such a child). Use multiprocessing's 'spawn' or 'forkserver', or
#     NUMBA_THREADING_LAYER=workqueue, to run the numba backend in worker processes;
#   * one OpenMP library per process: PyTorch imported *before* this backend keeps its own library
#     and default spin (Numba's module is loaded with RTLD_DEEPBIND and binds to a second one, with
#     the short spin); PyTorch imported *after* it finds the library loaded and shares it, short
#     spin included (its CPU step was 10-30% slower so, measured alone). benchmarks/cpu.py imports
#     torch first. (Nor does the short spin apply where the process already holds the OpenMP library
#     Numba links to, e.g. a PyTorch built against the system libgomp imported first.)
_SHORT_SPIN = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "0"}


def _start_numba_threads():
    from numba.np.ufunc import parallel
    launch = getattr(parallel, "_launch_threads", None)
    if (launch is None or getattr(parallel, "_is_initialized", True)
            or numba.config.THREADING_LAYER != "default" or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ):
        return                                      # threads running, or the user chose a layer
    if (not sys.platform.startswith("linux") or not hasattr(sys, "getdlopenflags")
            or any(k in os.environ for k in (*_SHORT_SPIN, "OMP_WAIT_POLICY"))):
        numba.config.THREADING_LAYER = "workqueue"
        launch()
        return
    os.environ.update(_SHORT_SPIN)
    flags = sys.getdlopenflags()
    try:
        numba.config.THREADING_LAYER = "omp"
        # RTLD_DEEPBIND: Numba's OpenMP module calls the OpenMP library it loads itself (a fresh
        # one, reading the short spin), not one that PyTorch loaded first into the global scope
        sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))
        try:
            launch()
        except (ValueError, ImportError, OSError):                    # no OpenMP layer here
            sys.setdlopenflags(flags)
            numba.config.THREADING_LAYER = "workqueue"
            launch()
    finally:
        sys.setdlopenflags(flags)
        for k in _SHORT_SPIN:
            os.environ.pop(k, None)


_start_numba_threads()

from ..kernels import cpu_activation, cpu_conv, cpu_conv3d, cpu_optim, cpu_pool, cpu_winograd
from ..nn import conv3d_fast, conv_fast
from ..nn import pool as _pool
from ..nn.shapes import pair


# -- convolution helpers, adapted to the driver's calling convention --------------------------------
def _im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, stride, lead, dilation, out):
    return cpu_conv.im2col_tile(x, n0, n1, r0, r1, kh, kw, Ho, Wo, stride[0], stride[1], lead[0],
                                lead[1], dilation[0], dilation[1], out)


def _col2im_image(dcols, dx, n, kh, kw, Ho, Wo, stride, lead, dilation):
    cpu_conv.col2im_image(dcols, dx, n, kh, kw, Ho, Wo, stride[0], stride[1], lead[0], lead[1],
                          dilation[0], dilation[1])


def _shuffle(dc, y, n0, kh, kw, b):
    if b is None:
        cpu_conv.shuffle(dc, y, n0, kh, kw, np.zeros(1, dtype=y.dtype), False)
    else:
        cpu_conv.shuffle(dc, y, n0, kh, kw, np.ascontiguousarray(b, dtype=y.dtype), True)


def _unshuffle(dy, n0, n1, kh, kw, out):
    return cpu_conv.unshuffle(dy, n0, n1, kh, kw, out)


def _add_bias(y3, b):
    cpu_conv.add_bias(y3, np.ascontiguousarray(b, dtype=y3.dtype))


def _channel_sum(a):
    return cpu_conv.channel_sum(np.ascontiguousarray(a))


# -- the Winograd GEMM stacks: the 36 positions split over threads -----------------------------------
# np.matmul on a (36, O, C) @ (36, C, T) stack makes 36 BLAS calls one after the other, each split
# over all BLAS threads; on the small maps of batch 1 each call is too small to split well (64 -> 64
# channels on 64x64, T = 256: 1.08 ms with 2 BLAS threads against 1.26 with one). Giving each thread
# its own positions, every BLAS call single-threaded, took 0.65 ms; on large maps the two ways are
# within a few percent (64 -> 64, T = 4096: 15.0 against 13.1 ms). Measured with 2 threads here.
try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - threadpoolctl comes with the numba extra
    ThreadpoolController = None

_blas = None                    # threadpoolctl's controller of the loaded BLAS, made on first use
_gemm_pool = None               # (n_threads, ThreadPoolExecutor of n_threads - 1), made on first use
_gemm_lock = threading.Lock()   # one stack at a time: two overlapping limit() blocks could leave
                                # BLAS at one thread (each restores what it found)


def _reset_after_fork():
    """In a forked child the parent's pool threads do not exist and the lock may be held."""
    global _gemm_pool, _gemm_lock
    _gemm_pool, _gemm_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _blas_threads():
    global _blas
    if ThreadpoolController is None:
        return 1
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas")
    return min((lib.num_threads for lib in _blas.lib_controllers), default=1)


def matmul_stack(a, b, out):
    """out[k] = a[k] @ b[k] for k < len(a) (three-dimensional arrays, b may be a transposed
    view): with n BLAS threads, n Python threads each take a contiguous share of the k and call
    np.matmul on it with BLAS limited to one thread (it releases the GIL); np.matmul(a, b, out=out)
    when BLAS has one thread or threadpoolctl is missing. Returns out."""
    global _gemm_pool
    with _gemm_lock:
        n = min(_blas_threads(), len(a))
        if n < 2:
            return np.matmul(a, b, out=out)
        if _gemm_pool is None or _gemm_pool[0] != n:
            if _gemm_pool is not None:
                _gemm_pool[1].shutdown(wait=False)
            _gemm_pool = (n, ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="unet_np-gemm"))
        cut = [len(a) * i // n for i in range(n + 1)]
        with _blas.limit(limits=1):
            futures = [_gemm_pool[1].submit(np.matmul, a[i:j], b[i:j], out=out[i:j])
                       for i, j in zip(cut[1:-1], cut[2:])]
            try:
                np.matmul(a[:cut[1]], b[:cut[1]], out=out[:cut[1]])    # the first share: this thread
            finally:
                wait(futures)                      # all shares done before the limit is lifted
            for f in futures:
                f.result()
    return out


class _Winograd:
    """The Winograd F(4x4, 3x3) transforms (kernels/cpu_winograd.py) and GEMM stack for the conv
    drivers."""
    input_transform = staticmethod(cpu_winograd.input_transform)
    output_transform = staticmethod(cpu_winograd.output_transform)
    grad_transform = staticmethod(cpu_winograd.grad_transform)
    weight_transform = staticmethod(cpu_winograd.weight_transform)
    weight_grad_transform = staticmethod(cpu_winograd.weight_grad_transform)
    matmul_stack = staticmethod(matmul_stack)


NUMBA_CONV_KERNELS = conv_fast.ConvKernels(_im2col_tile, _add_bias, _channel_sum, _col2im_image,
                                       _shuffle, _unshuffle, winograd=_Winograd())


# -- 3-D convolution helpers (the driver is unet_np/nn/conv3d_fast.py) -------------------------------
def _vol2col_band(x, n, d0, d1, kernel, out_hw, stride, lead, dilation, out):
    cpu_conv3d.vol2col_band(x, n, d0, d1, kernel[0], kernel[1], kernel[2], out_hw[0], out_hw[1],
                            stride[0], stride[1], stride[2], lead[0], lead[1], lead[2], dilation[0],
                            dilation[1], dilation[2], out)


def _col2vol_band(dcols, dx, n, d0, d1, kernel, out_hw, stride, lead, dilation):
    cpu_conv3d.col2vol_band(dcols, dx, n, d0, d1, kernel[0], kernel[1], kernel[2], out_hw[0],
                            out_hw[1], stride[0], stride[1], stride[2], lead[0], lead[1], lead[2],
                            dilation[0], dilation[1], dilation[2])


def _channel_sum_nd(a):
    a = np.ascontiguousarray(a)
    return cpu_conv.channel_sum(a.reshape(a.shape[0], a.shape[1], 1, -1))


NUMBA_CONV3D_KERNELS = conv3d_fast.Conv3dKernels(_vol2col_band, _col2vol_band, _add_bias,
                                                 _channel_sum_nd, winograd=_Winograd())


# -- max-pool -------------------------------------------------------------------------------------
def _is_2x2(kernel, stride, padding):
    return (pair(kernel) == (2, 2) and pair(stride) == (2, 2)
            and pair(padding) == (0, 0))


def maxpool2d_forward(x, kernel, stride, padding):
    """As unet_np.nn.pool.maxpool2d_forward; the 2x2 stride-2 case in one compiled pass."""
    if not _is_2x2(kernel, stride, padding):
        return _pool.maxpool2d_forward(x, kernel, stride, padding)
    y, arg = cpu_pool.maxpool2x2_forward(np.ascontiguousarray(x))
    return y, (arg, x.shape, (2, 2), (2, 2), (0, 0))


def maxpool2d_backward(dy, cache):
    arg, shape, kernel, stride, padding = cache
    if not _is_2x2(kernel, stride, padding):
        return _pool.maxpool2d_backward(dy, cache)
    return cpu_pool.maxpool2x2_backward(np.ascontiguousarray(dy), arg, shape[2], shape[3])


def _is_tiling3d(kernel, stride, padding):
    """Windows that neither overlap nor leave gaps, no padding, at most 255 positions (uint8 argmax)."""
    return (pair(kernel, dims=3) == pair(stride, dims=3) and pair(padding, dims=3) == (0, 0, 0)
            and int(np.prod(pair(kernel, dims=3))) <= 255)


def maxpool3d_forward(x, kernel, stride, padding):
    """As unet_np.nn.pool.maxpool3d_forward; windows that tile the volume (2x2x2 or (1, 2, 2)
    stride = kernel) in one compiled pass, with the reference's argmax encoding."""
    if not _is_tiling3d(kernel, stride, padding):
        return _pool.maxpool3d_forward(x, kernel, stride, padding)
    k = pair(kernel, dims=3)
    y, arg = cpu_conv3d.maxpool3d_tiled_forward(np.ascontiguousarray(x), k[0], k[1], k[2])
    return y, (arg, x.shape, k, k, (0, 0, 0))


def maxpool3d_backward(dy, cache):
    arg, shape, kernel, stride, padding = cache
    if not _is_tiling3d(kernel, stride, padding):
        return _pool.maxpool3d_backward(dy, cache)
    return cpu_conv3d.maxpool3d_tiled_backward(np.ascontiguousarray(dy), arg, kernel[0], kernel[1],
                                               kernel[2], shape[2], shape[3], shape[4])


# -- ReLU -------------------------------------------------------------------------------------------
def relu_forward(x):
    """As unet_np.nn.activation.relu_forward, one parallel pass."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    cpu_activation.relu_forward_flat(x.reshape(-1), y.reshape(-1))
    return y, y


def relu_backward(dy, y):
    """As unet_np.nn.activation.relu_backward (dx has dy's dtype), one parallel pass."""
    dy = np.ascontiguousarray(dy)
    y = np.ascontiguousarray(y)
    dx = np.empty_like(dy)
    cpu_activation.relu_backward_flat(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


# -- fused optimizer updates (unet_np.optim calls them; same arguments as the GPU backends') ---------
def _flat(name, a):
    if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
        raise ValueError(f"{name}: the arrays updated in place must be C-contiguous NumPy arrays")
    return a.reshape(-1)


def sgd_step(p, grad, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             first=False):
    """One torch.optim.SGD update of p (and of the momentum buffer buf), in place, in one pass.
    first: buf is initialised to the gradient (PyTorch's first step); buf may be None when momentum
    is 0."""
    T = p.dtype.type
    pf = _flat("sgd_step", p)
    bf = pf if buf is None else _flat("sgd_step", buf)
    g = np.ascontiguousarray(grad, dtype=p.dtype).reshape(-1)
    cpu_optim.sgd_step(pf, g, bf, T(lr), T(momentum), T(1 - dampening), T(weight_decay),
                       momentum != 0, bool(nesterov), bool(first))


def adam_step(p, grad, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              decoupled=False, vmax=None):
    """One torch.optim.Adam (decoupled=True: AdamW) update of p, m, v (and vmax: amsgrad) in place,
    in one pass. step: the step number t >= 1 after this update (for the bias corrections)."""
    T = p.dtype.type
    pf, mf, vf = (_flat("adam_step", a) for a in (p, m, v))
    xf = pf if vmax is None else _flat("adam_step", vmax)
    g = np.ascontiguousarray(grad, dtype=p.dtype).reshape(-1)
    b1, b2 = betas
    w1 = 1 - b1
    step_size = lr / (1 - b1 ** step)
    bc2_sqrt = (1 - b2 ** step) ** 0.5
    cpu_optim.adam_step(pf, g, mf, vf, xf, T(weight_decay), T(1 - lr * weight_decay), bool(decoupled),
                        T(w1), T(1 - w1), T(b2), T(1 - b2), T(step_size), T(bc2_sqrt), T(eps),
                        vmax is not None)


def numba_ops():
    """name -> function for every primitive this backend replaces."""
    ops = dict(conv_fast.make_conv_primitives(NUMBA_CONV_KERNELS))
    ops.update(conv3d_fast.make_conv3d_primitives(NUMBA_CONV3D_KERNELS))
    ops.update(maxpool2d_forward=maxpool2d_forward, maxpool2d_backward=maxpool2d_backward,
               maxpool3d_forward=maxpool3d_forward, maxpool3d_backward=maxpool3d_backward,
               relu_forward=relu_forward, relu_backward=relu_backward)
    return ops


def make_backend():
    ops = reference_ops()
    ops.update(numba_ops())
    backend = Backend("numba", np, ops)
    backend.sgd_step, backend.adam_step = sgd_step, adam_step        # fused updates for unet_np.optim
    return backend

"""The ``numba-cuda`` backend: every primitive the models use runs as a hand-written numba.cuda.jit
kernel from unet_np.kernels.cuda_* (GEMM included: cuda_gemm's shared-memory tiled kernels). The
convolutions are unet_np/backends/numba_cuda_conv.py's (ConvOps); the volume (N, C, D, H, W) primitives
and the centre crop are unet_np/backends/numba_cuda_vol.py's (VolOps).

Array module (``backend.xp``):
  * CuPy, when it imports and a GPU is present: the arrays live on the GPU and go to the kernels
    through the CUDA Array Interface without a copy. The fast path.
  * NumPy otherwise, i.e. under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, what the tests use)
    or on a GPU without CuPy. Each primitive then copies its NumPy inputs to the device once, runs
    its kernels on device arrays, and copies its outputs back: correct, but slow on a real GPU (a
    host round trip per primitive), and very slow under the simulator (tiny shapes only). What a
    primitive keeps for its backward (column buffers, argmax, xhat, ...) stays on the device.

make_backend() raises RuntimeError when neither a CUDA GPU (numba.cuda.is_available()) nor the
simulator is there; unet_np.backends.get turns that into BackendUnavailable naming the extra.

The table starts from the NumPy reference (unet_np.backends.numpy_backend.reference_ops) and replaces
every primitive: convolution and transposed convolution (forward / backward; conv2d_backward takes
input_grad=False to skip dx), max-pool, ReLU, sigmoid, bilinear and nearest upsampling, concat,
centre crop, padding, batch-norm, their 3-D twins (convolutions, max-pool, trilinear and nearest
upsampling, padding: kernels/cuda_vol.py; batch-norm, concat, crop, activations and losses take 5-D
arrays as they are), and every loss (softmax cross-entropy with class and pixel weights, BCE with
logits, softmax and sigmoid Dice; kernels/cuda_loss.py). The backend also offers fused
optimizer updates, ``sgd_step`` and ``adam_step`` (kernels/cuda_optim.py), which unet_np.optim uses
for the parameters of a numba-cuda model. Caches are private to this backend.
"""

import numpy as np

from . import Backend
from ..nn.shapes import pair, scale_pair
from .numba_cuda_conv import ConvOps, flat
from .numba_cuda_vol import VolOps

# -- device arrays ---------------------------------------------------------------------------------


class _Device:
    """Moves arrays between ``xp`` and the device, and allocates device arrays."""

    def __init__(self, cuda, cupy):
        self.cuda = cuda
        self.cupy = cupy

    def is_dev(self, a):
        return not isinstance(a, np.ndarray) and (hasattr(a, "__cuda_array_interface__")
                                                   or hasattr(a, "copy_to_host"))

    def put(self, a, dtype=None):
        """A contiguous device array holding ``a`` (no copy when it already is one)."""
        if self.cupy is not None:
            return self.cupy.ascontiguousarray(self.cupy.asarray(a, dtype=dtype))
        if self.is_dev(a):
            if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
                a = a.copy_to_host()
            else:
                return a
        return self.cuda.to_device(np.ascontiguousarray(a, dtype=dtype))

    def empty(self, shape, dtype):
        if self.cupy is not None:
            return self.cupy.empty(shape, dtype=dtype)
        return self.cuda.device_array(shape, dtype=dtype)

    def get(self, d):
        """A device array as an ``xp`` array."""
        if self.cupy is not None:
            return d
        return d.copy_to_host()


def make_backend():
    import numba
    from numba import cuda

    simulated = bool(numba.config.ENABLE_CUDASIM)
    if not simulated and not cuda.is_available():
        raise RuntimeError("numba-cuda found no CUDA GPU (numba.cuda.is_available() is False) and "
                           "Numba's CUDA simulator is off (set NUMBA_ENABLE_CUDASIM=1 before numba is "
                           "imported to run the kernels on the CPU, slowly)")
    cupy = None
    if not simulated:
        try:
            import cupy  # noqa: F811
        except Exception:
            cupy = None
    xp = cupy if cupy is not None else np

    from ..kernels import (cuda_elementwise as ew, cuda_launch, cuda_loss, cuda_norm, cuda_optim,
                           cuda_pool, cuda_reduce, cuda_vol)
    from .numpy_backend import reference_ops

    dev = _Device(cuda, cupy)
    # Settings read at every call (backend.settings): 'winograd' is 'auto' (3x3 stride-1 convolutions
    # with >= 16 input and output channels run as Winograd F(4x4, 3x3)), 'always' or 'never'.
    settings = {"winograd": "auto"}
    grid = cuda_launch.grid_1d

    def launch(kernel, n, *args):
        blocks, threads = grid(n)
        kernel[blocks, threads](*args)

    # -- reductions --------------------------------------------------------------------------------
    def channel_reduce(a, N, C, plane, mode=cuda_reduce.SUM, b=None, shift=None, dtype=None):
        out = dev.empty((C,), dtype or a.dtype)
        T = cuda_launch.reduce_threads()
        kern = cuda_reduce.channel_reduce_kernel(T)
        fa = flat(a)
        blocks = C if not cuda_launch.simulated() else 1
        kern[blocks, T](fa, flat(b) if b is not None else fa, shift if shift is not None else out,
                        N, C, plane, mode, out)
        return out

    # -- convolution: unet_np/backends/numba_cuda_conv.py ------------------------------------------
    conv = ConvOps(dev, settings, channel_reduce)
    # -- volumes (and the crop / copies of every rank): unet_np/backends/numba_cuda_vol.py ------------
    vol = VolOps(conv)
    copy_box = vol.copy_box

    # -- pooling -----------------------------------------------------------------------------------
    def maxpool2d_forward(x, kernel, stride, padding):
        (kh, kw), (sh, sw), (ph, pw) = pair(kernel), pair(stride), pair(padding)
        N, C, H, W = x.shape
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        x_d = dev.put(x)
        y = dev.empty((N, C, Ho, Wo), x_d.dtype)
        arg = dev.empty((N, C, Ho, Wo), np.int32)
        g = (N, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw)
        launch(cuda_pool.maxpool_forward_kernel, y.size, flat(x_d), flat(y), flat(arg), g)
        return dev.get(y), (arg, g)

    def maxpool2d_backward(dy, cache):
        arg, g = cache
        N, C, H, W = g[:4]
        dy_d = dev.put(dy)
        dx = dev.empty((N, C, H, W), dy_d.dtype)
        launch(cuda_pool.maxpool_backward_kernel, dx.size, flat(dy_d), flat(arg), flat(dx), g)
        return dev.get(dx)

    # -- activations -------------------------------------------------------------------------------
    def _unary(kernel, x):
        x_d = dev.put(x)
        y = dev.empty(x_d.shape, x_d.dtype)
        launch(kernel, y.size, flat(x_d), flat(y))
        return y

    def _binary(kernel, dy, cache):
        dy_d = dev.put(dy, dtype=cache.dtype)
        dx = dev.empty(dy_d.shape, dy_d.dtype)
        launch(kernel, dx.size, flat(dy_d), flat(cache), flat(dx))
        return dev.get(dx)

    def relu_forward(x):
        y = _unary(ew.relu_forward_kernel, x)
        return dev.get(y), y

    def relu_backward(dy, y):
        return _binary(ew.relu_backward_kernel, dy, y)

    def sigmoid_forward(x):
        y = _unary(ew.sigmoid_forward_kernel, x)
        return dev.get(y), y

    def sigmoid_backward(dy, y):
        return _binary(ew.sigmoid_backward_kernel, dy, y)

    # -- upsampling --------------------------------------------------------------------------------

    def _upsample(kernel, x, scale):
        sh, sw = scale_pair(scale)
        N, C, H, W = x.shape
        x_d = dev.put(x)
        y = dev.empty((N, C, H * sh, W * sw), x_d.dtype)
        launch(kernel, y.size, flat(x_d), flat(y), (N, C, H, W, sh, sw))
        return dev.get(y), (sh, sw)

    def _upsample_back(kernel, dy, cache):
        sh, sw = cache
        N, C, Ho, Wo = dy.shape
        H, W = Ho // sh, Wo // sw
        dy_d = dev.put(dy)
        dx = dev.empty((N, C, H, W), dy_d.dtype)
        launch(kernel, dx.size, flat(dy_d), flat(dx), (N, C, H, W, sh, sw))
        return dev.get(dx)

    def upsample_bilinear2d_forward(x, scale):
        return _upsample(ew.upsample_bilinear_forward_kernel, x, scale)

    def upsample_bilinear2d_backward(dy, cache):
        return _upsample_back(ew.upsample_bilinear_backward_kernel, dy, cache)

    def upsample_nearest2d_forward(x, scale):
        return _upsample(ew.upsample_nearest_forward_kernel, x, scale)

    def upsample_nearest2d_backward(dy, cache):
        return _upsample_back(ew.upsample_nearest_backward_kernel, dy, cache)

    # -- concat / crop / pad -------------------------------------------------------------------------
    def _nchw_view(shape, axis):
        """shape, axis -> (outer, size_along_axis, inner, 1): a 4-D view whose channel axis is ``axis``."""
        outer = int(np.prod(shape[:axis], dtype=np.int64))
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        return (outer, int(shape[axis]), inner, 1)

    def concat_forward(xs, axis):
        ref = xs[0]
        axis = axis % ref.ndim
        sizes = tuple(int(x.shape[axis]) for x in xs)
        shape = list(ref.shape)
        shape[axis] = sum(sizes)
        y = dev.empty(tuple(shape), ref.dtype)
        y4 = y.reshape(_nchw_view(shape, axis))
        off = 0
        for x in xs:
            x_d = dev.put(x, dtype=ref.dtype)
            x4 = x_d.reshape(_nchw_view(x.shape, axis))
            copy_box(x4, y4, x4.shape, (0, 0, 0), (off, 0, 0))
            off += x4.shape[1]
        return dev.get(y), (axis, sizes)

    def concat_backward(dy, cache):
        axis, sizes = cache
        dy_d = dev.put(dy)
        dy4 = dy_d.reshape(_nchw_view(dy.shape, axis))
        out, off = [], 0
        for s in sizes:
            shape = list(dy.shape)
            shape[axis] = s
            dx = dev.empty(tuple(shape), dy_d.dtype)
            dx4 = dx.reshape(_nchw_view(shape, axis))
            copy_box(dy4, dx4, dx4.shape, (off, 0, 0), (0, 0, 0))
            off += s
            out.append(dev.get(dx))
        return tuple(out)

    def pad2d_forward(x, pads, mode, value=0.0):
        l, r, t, b = (int(p) for p in pads)
        N, C, H, W = x.shape
        x_d = dev.put(x)
        y = dev.empty((N, C, t + H + b, l + W + r), x_d.dtype)
        if mode == "constant":
            launch(ew.fill_kernel, y.size, flat(y), float(value))
            copy_box(x_d, y, (N, C, H, W), (0, 0, 0), (0, t, l))
        elif mode == "reflect":
            if min(l, r, t, b) < 0 or max(l, r) >= W or max(t, b) >= H:
                raise ValueError(f"pad2d_forward: reflect padding must be >= 0 and smaller than the padded "
                                 f"dimension, got pads (left, right, top, bottom) = {(l, r, t, b)} for an "
                                 f"input of {H}x{W}")
            # an image is a volume of depth 1 (no front / back padding): the 3-D kernel's index map
            launch(cuda_vol.reflect_pad3d_forward_kernel, y.size, flat(x_d), flat(y),
                   (N, C, 1, H, W, l, r, t, b, 0, 0))
        else:
            raise ValueError(f"pad2d_forward: mode must be one of reflect, constant, got {mode!r}")
        return dev.get(y), ((l, r, t, b), mode)

    def pad2d_backward(dy, cache):
        (l, r, t, b), mode = cache
        N, C, Hp, Wp = dy.shape
        H, W = Hp - t - b, Wp - l - r
        dy_d = dev.put(dy)
        dx = dev.empty((N, C, H, W), dy_d.dtype)
        if mode == "constant":
            copy_box(dy_d, dx, (N, C, H, W), (0, t, l), (0, 0, 0))
        else:
            launch(cuda_vol.reflect_pad3d_backward_kernel, dx.size, flat(dy_d), flat(dx),
                   (N, C, 1, H, W, l, r, t, b, 0, 0))
        return dev.get(dx)

    # -- batch normalisation -------------------------------------------------------------------------
    def batchnorm2d_forward(x, gamma, beta, mean, var, eps, training):
        N, C = x.shape[:2]
        plane = int(np.prod(x.shape[2:], dtype=np.int64))
        M = N * plane
        x_d = dev.put(x)
        g_d = dev.put(gamma, dtype=x.dtype) if gamma is not None else None
        b_d = dev.put(beta, dtype=x.dtype) if beta is not None else None
        y = dev.empty(x_d.shape, x_d.dtype)
        dummy = flat(y)
        if training:
            s = channel_reduce(x_d, N, C, plane, cuda_reduce.SUM, dtype=np.float64)
            mu = _scale(s, 1.0 / M)                    # two passes: mean, then squared deviations
            v = _scale(channel_reduce(x_d, N, C, plane, cuda_reduce.SQDEV, shift=mu,
                                      dtype=np.float64), 1.0 / M)
            xhat = dev.empty(x_d.shape, x_d.dtype)
            launch(cuda_norm.bn_forward_kernel, y.size, flat(x_d), mu, v,
                   g_d if g_d is not None else dummy, b_d if b_d is not None else dummy,
                   g_d is not None, b_d is not None, float(eps), C, plane, True, flat(xhat), flat(y))
            mu_x = dev.get(_cast(mu, x.dtype))
            v_x = dev.get(_cast(v, x.dtype))
            return dev.get(y), (True, xhat, g_d, v, float(eps)), mu_x, v_x
        m_d = dev.put(mean, dtype=np.float64)
        v_d = dev.put(var, dtype=np.float64)
        launch(cuda_norm.bn_forward_kernel, y.size, flat(x_d), m_d, v_d,
               g_d if g_d is not None else dummy, b_d if b_d is not None else dummy,
               g_d is not None, b_d is not None, float(eps), C, plane, False, dummy, flat(y))
        return dev.get(y), (False, x_d, g_d, v_d, float(eps), m_d), None, None

    def _scale(a, f):
        out = dev.empty(a.shape, a.dtype)
        launch(ew.scale_kernel, a.size, a, float(f), out)
        return out

    def _cast(a, dtype):
        out = dev.empty(a.shape, dtype)
        launch(ew.scale_kernel, a.size, a, 1.0, out)
        return out

    def batchnorm2d_backward(dy, cache):
        training = cache[0]
        if training:
            _, xhat, g_d, v, eps = cache
        else:
            _, x_d, g_d, v, eps, m_d = cache
        shape = tuple(cache[1].shape)
        N, C = shape[:2]
        plane = int(np.prod(shape[2:], dtype=np.int64))
        M = N * plane
        dtype = cache[1].dtype
        dy_d = dev.put(dy, dtype=dtype)
        if not training:                                   # xhat from the running statistics
            xhat = dev.empty(shape, dtype)
            tmp = dev.empty(shape, dtype)
            launch(cuda_norm.bn_forward_kernel, tmp.size, flat(x_d), m_d, v, flat(tmp), flat(tmp),
                   False, False, eps, C, plane, True, flat(xhat), flat(tmp))
        dbeta = channel_reduce(dy_d, N, C, plane, cuda_reduce.SUM)
        dgamma = channel_reduce(dy_d, N, C, plane, cuda_reduce.DOT, b=xhat)
        dx = dev.empty(shape, dtype)
        launch(cuda_norm.bn_backward_kernel, dx.size, flat(dy_d), flat(xhat), v,
               g_d if g_d is not None else flat(dx), g_d is not None, eps, dbeta, dgamma, M, C, plane,
               training, flat(dx))
        return dev.get(dx), dev.get(dgamma), dev.get(dbeta)

    # -- softmax cross-entropy -------------------------------------------------------------------------
    def softmax_cross_entropy_forward(logits, target, class_weight=None, ignore_index=-100,
                                      pixel_weight=None):
        N, C = logits.shape[:2]
        M = int(np.prod(logits.shape[2:], dtype=np.int64))
        x_d = dev.put(logits)
        t_d = dev.put(target, dtype=np.int64)
        cw = dev.put(class_weight, dtype=logits.dtype) if class_weight is not None else None
        pw = dev.put(pixel_weight, dtype=logits.dtype) if pixel_weight is not None else None
        num = dev.empty((N * M,), np.float64)
        den = dev.empty((N * M,), np.float64)
        args = (flat(x_d), flat(t_d), cw if cw is not None else num, cw is not None,
                flat(pw) if pw is not None else num, pw is not None, int(ignore_index), N, C, M)
        launch(cuda_loss.ce_forward_kernel, N * M, *args, num, den)
        sums = dev.empty((2,), np.float64)
        cuda_reduce.sum_pair_kernel(cuda_launch.reduce_threads())[1, cuda_launch.reduce_threads()](
            num, den, sums)
        total, denom = (float(v) for v in np.asarray(_to_host(sums)))
        dtype = np.dtype(logits.dtype)
        if denom == 0:
            loss, inv = float("nan"), 0.0
        else:
            loss, inv = total / denom, 1.0 / denom
        return xp.asarray(loss, dtype=dtype), (args, inv, tuple(logits.shape))

    def softmax_cross_entropy_backward(cache):
        args, inv, shape = cache
        dx = dev.empty(shape, args[0].dtype)
        N, C, M = args[-3:]
        launch(cuda_loss.ce_backward_kernel, N * M, *args, float(inv), flat(dx))
        return dev.get(dx)

    def _to_host(d):
        return d.get() if cupy is not None else d.copy_to_host()

    def _sum(a):
        """sum(a) of a flat device array, in float64, as a Python float (one block of the tree sum)."""
        out = channel_reduce(a, 1, 1, a.size, dtype=np.float64)
        return float(np.asarray(_to_host(out))[0])

    # -- binary cross-entropy with logits --------------------------------------------------------------
    def bce_with_logits_forward(logits, target, pos_weight=None):
        x_d = dev.put(logits)
        t_d = dev.put(target, dtype=logits.dtype)
        shape = tuple(int(d) for d in logits.shape) or (1,)
        pstride = np.zeros(len(shape), dtype=np.int64)
        if pos_weight is None:
            pw_d = x_d
        else:                                          # element strides of pos_weight, 0 where broadcast
            pshape = tuple(int(d) for d in pos_weight.shape)
            while len(pshape) > len(shape) and pshape[0] == 1:
                pshape = pshape[1:]
            pshape = (1,) * (len(shape) - len(pshape)) + pshape
            step = 1
            for k in range(len(shape) - 1, -1, -1):
                if pshape[k] != 1:
                    pstride[k] = step
                step *= pshape[k]
            pw_d = dev.put(pos_weight, dtype=logits.dtype)
        args = (flat(x_d), flat(t_d), flat(pw_d), pos_weight is not None,
                dev.put(np.asarray(shape, dtype=np.int64)), dev.put(pstride))
        n = x_d.size
        ell = dev.empty((n,), np.float64)
        launch(cuda_loss.bce_forward_kernel, n, *args, ell)
        loss = _sum(ell) / n
        return xp.asarray(loss, dtype=logits.dtype), (args, n, tuple(logits.shape))

    def bce_with_logits_backward(cache):
        args, n, shape = cache
        dx = dev.empty(shape, args[0].dtype)
        launch(cuda_loss.bce_backward_kernel, n, *args, 1.0 / n, flat(dx))
        return dev.get(dx)

    # -- soft Dice ---------------------------------------------------------------------------------------
    def _dice_finish(sums, C, smooth, eps, first, dtype):
        """(loss as a 0-d xp array, coef = (beta, alpha) on the device) from the (3, C) class sums."""
        coef = dev.empty((2 * C,), np.float64)
        loss = dev.empty((1,), np.float64)
        cuda_loss.dice_finish_kernel[1, 1](sums, C, float(smooth), float(eps), first, coef, loss)
        return xp.asarray(float(np.asarray(_to_host(loss))[0]), dtype=dtype), coef

    def _class_blocks(C):
        return C if not cuda_launch.simulated() else 1

    def softmax_dice_forward(logits, target, smooth=1.0, eps=1e-7, ignore_index=-100,
                             include_background=True):
        N, C = logits.shape[:2]
        M = int(np.prod(logits.shape[2:], dtype=np.int64))
        x_d = dev.put(logits)
        t_d = dev.put(target, dtype=np.int64)
        mx = dev.empty((N * M,), np.float64)
        s = dev.empty((N * M,), np.float64)
        launch(cuda_loss.softmax_stats_kernel, N * M, flat(x_d), N, C, M, mx, s)
        sums = dev.empty((3 * C,), np.float64)
        T = cuda_launch.reduce_threads()
        cuda_loss.softmax_dice_sums_kernel(T)[_class_blocks(C), T](flat(x_d), flat(t_d), mx, s,
                                                                  int(ignore_index), N, C, M, sums)
        loss, coef = _dice_finish(sums, C, smooth, eps, 0 if include_background else 1, logits.dtype)
        return loss, (x_d, t_d, mx, s, int(ignore_index), coef, (N, C, M))

    def softmax_dice_backward(cache):
        x_d, t_d, mx, s, ignore, coef, (N, C, M) = cache
        dx = dev.empty(x_d.shape, x_d.dtype)
        launch(cuda_loss.softmax_dice_backward_kernel, N * M, flat(x_d), flat(t_d), mx, s, ignore, coef,
               N, C, M, flat(dx))
        return dev.get(dx)

    def sigmoid_dice_forward(logits, target, smooth=1.0, eps=1e-7):
        N, C = logits.shape[:2]
        M = int(np.prod(logits.shape[2:], dtype=np.int64))
        x_d = dev.put(logits)
        t_d = dev.put(target, dtype=logits.dtype)
        sums = dev.empty((3 * C,), np.float64)
        T = cuda_launch.reduce_threads()
        cuda_loss.sigmoid_dice_sums_kernel(T)[_class_blocks(C), T](flat(x_d), flat(t_d), N, C, M, sums)
        loss, coef = _dice_finish(sums, C, smooth, eps, 0, logits.dtype)
        return loss, (x_d, t_d, coef, (C, M))

    def sigmoid_dice_backward(cache):
        x_d, t_d, coef, (C, M) = cache
        dx = dev.empty(x_d.shape, x_d.dtype)
        launch(cuda_loss.sigmoid_dice_backward_kernel, x_d.size, flat(x_d), flat(t_d), coef, C, M,
               flat(dx))
        return dev.get(dx)

    # -- fused optimizer updates (cuda_optim), called by unet_np.optim once per parameter ------------
    def _updated_in_place(owner, *arrays):
        """Device arrays for arrays a kernel updates in place: the arrays themselves on CuPy; device
        copies otherwise, which _write_back copies into the originals after the kernel."""
        for a in arrays:
            if a is not None and not a.flags.c_contiguous:
                raise ValueError(f"{owner}: the arrays updated in place must be C-contiguous")
        if np.dtype(arrays[0].dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"{owner}: the numba-cuda backend updates float32 or float64 parameters, "
                            f"got {arrays[0].dtype}")
        return [None if a is None else dev.put(a) for a in arrays]

    def _write_back(devs, arrays):
        if cupy is None:
            for d, a in zip(devs, arrays):
                if a is not None:
                    d.copy_to_host(a)

    def sgd_step(p, grad, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 first=False):
        """One torch.optim.SGD update of p (and of the momentum buffer buf), in place, in one kernel.
        first: buf is initialised to the gradient (PyTorch's first step). buf may be None when
        momentum is 0. Same arguments as the cupy backend's sgd_step."""
        p_d, b_d = _updated_in_place("sgd_step", p, buf)
        T = np.dtype(p.dtype).type
        g_d = dev.put(grad, dtype=p.dtype)
        launch(cuda_optim.sgd_step_kernel, p.size, flat(p_d), flat(g_d), flat(p_d if b_d is None else b_d),
               T(lr), T(momentum), T(1 - dampening), T(weight_decay), momentum != 0, bool(nesterov),
               bool(first))
        _write_back((p_d, b_d), (p, buf))

    def adam_step(p, grad, m, v, step, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled=False, vmax=None):
        """One torch.optim.Adam (decoupled=True: AdamW) update of p, m, v (and vmax: amsgrad) in place,
        in one kernel. step: the step number t >= 1 after this update (for the bias corrections)."""
        p_d, m_d, v_d, x_d = _updated_in_place("adam_step", p, m, v, vmax)
        T = np.dtype(p.dtype).type
        g_d = dev.put(grad, dtype=p.dtype)
        b1, b2 = betas
        w1 = 1 - b1
        step_size = lr / (1 - b1 ** step)
        bc2_sqrt = (1 - b2 ** step) ** 0.5
        launch(cuda_optim.adam_step_kernel, p.size, flat(p_d), flat(g_d), flat(m_d), flat(v_d),
               flat(p_d if x_d is None else x_d), T(weight_decay), T(1 - lr * weight_decay),
               bool(decoupled), T(w1), T(1 - w1), T(b2), T(1 - b2), T(step_size), T(bc2_sqrt), T(eps),
               x_d is not None)
        _write_back((p_d, m_d, v_d, x_d), (p, m, v, vmax))

    ops = reference_ops()
    ops.update(
        conv2d_forward=conv.conv2d_forward, conv2d_backward=conv.conv2d_backward,
        conv_transpose2d_forward=conv.conv_transpose2d_forward,
        conv_transpose2d_backward=conv.conv_transpose2d_backward,
        maxpool2d_forward=maxpool2d_forward, maxpool2d_backward=maxpool2d_backward,
        relu_forward=relu_forward, relu_backward=relu_backward,
        sigmoid_forward=sigmoid_forward, sigmoid_backward=sigmoid_backward,
        upsample_bilinear2d_forward=upsample_bilinear2d_forward,
        upsample_bilinear2d_backward=upsample_bilinear2d_backward,
        upsample_nearest2d_forward=upsample_nearest2d_forward,
        upsample_nearest2d_backward=upsample_nearest2d_backward,
        concat_forward=concat_forward, concat_backward=concat_backward,
        pad2d_forward=pad2d_forward, pad2d_backward=pad2d_backward,
        batchnorm2d_forward=batchnorm2d_forward, batchnorm2d_backward=batchnorm2d_backward,
        softmax_cross_entropy_forward=softmax_cross_entropy_forward,
        softmax_cross_entropy_backward=softmax_cross_entropy_backward,
        bce_with_logits_forward=bce_with_logits_forward, bce_with_logits_backward=bce_with_logits_backward,
        softmax_dice_forward=softmax_dice_forward, softmax_dice_backward=softmax_dice_backward,
        sigmoid_dice_forward=sigmoid_dice_forward, sigmoid_dice_backward=sigmoid_dice_backward,
    )
    ops.update(vol.table())       # 3-D primitives, and center_crop for 4-D and 5-D arrays
    backend = Backend("numba-cuda", xp, ops)
    backend.simulated = simulated
    backend.settings = settings
    backend.sgd_step, backend.adam_step = sgd_step, adam_step        # fused updates for unet_np.optim
    # fused primitives beyond the reference table: conv2d_forward / conv3d_forward(..., activation='relu')
    backend.fused = frozenset({"conv2d_relu", "conv3d_relu"})
    return backend

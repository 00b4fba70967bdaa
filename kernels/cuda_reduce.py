"""Tree reductions for Numba-CUDA: per-channel sums over (N, H, W) and whole-array sums.

NumPy references: unet_np/nn/norm.py ``_channel_sum`` and ``_channel_dot`` (batch-norm statistics
and its backward), the bias gradient ``db = dy.sum(axis=(0, 2, 3))`` of unet_np/nn/conv.py, and the
``.sum()`` calls of unet_np/nn/loss.py softmax_cross_entropy_forward.

Layout: one block per channel (channel_reduce) or a single block (sum_pair); each thread accumulates
a strided share in float64, then the block halves a shared-memory array of ``threads`` partial sums
log2(threads) times. Accumulating in float64 makes the float32 result at least as accurate as NumPy's
pairwise sum. A kernel is compiled per block size (the shared array's length is a compile-time
constant), which must be a power of two.
"""
from numba import cuda, float64

_cache = {}

SUM, SQDEV, DOT = 0, 1, 2


def channel_reduce_kernel(threads):
    """kernel[C, threads](a, b, shift, N, C, plane, mode, out):
    out[c] = sum over n, p of  a            (mode SUM)
                               (a - shift[c])^2   (mode SQDEV: the two-pass variance's second pass)
                               a * b        (mode DOT)
    with a, b flat (N, C, plane) arrays. Block c handles channel c (a block-stride loop when fewer
    blocks are launched)."""
    key = ("channel", threads)
    if key in _cache:
        return _cache[key]
    T = threads

    @cuda.jit
    def kernel(a, b, shift, N, C, plane, mode, out):
        part = cuda.shared.array(T, dtype=float64)
        t = cuda.threadIdx.x
        M = N * plane
        for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
            acc = 0.0
            s = shift[c] if mode == 1 else 0.0
            for e in range(t, M, T):
                n = e // plane
                i = (n * C + c) * plane + e - n * plane
                if mode == 0:
                    acc += a[i]
                elif mode == 1:
                    d = a[i] - s
                    acc += d * d
                else:
                    acc += a[i] * b[i]
            part[t] = acc
            cuda.syncthreads()
            half = T // 2
            while half > 0:
                if t < half:
                    part[t] += part[t + half]
                cuda.syncthreads()
                half //= 2
            if t == 0:
                out[c] = part[0]
            cuda.syncthreads()

    _cache[key] = kernel
    return kernel


def sum_pair_kernel(threads):
    """kernel[1, threads](a, b, out): out[0] = sum(a), out[1] = sum(b) (a, b flat, same size)."""
    key = ("pair", threads)
    if key in _cache:
        return _cache[key]
    T = threads

    @cuda.jit
    def kernel(a, b, out):
        pa = cuda.shared.array(T, dtype=float64)
        pb = cuda.shared.array(T, dtype=float64)
        t = cuda.threadIdx.x
        sa = 0.0
        sb = 0.0
        for e in range(t, a.size, T):
            sa += a[e]
            sb += b[e]
        pa[t] = sa
        pb[t] = sb
        cuda.syncthreads()
        half = T // 2
        while half > 0:
            if t < half:
                pa[t] += pa[t + half]
                pb[t] += pb[t + half]
            cuda.syncthreads()
            half //= 2
        if t == 0:
            out[0] = pa[0]
            out[1] = pb[0]

    _cache[key] = kernel
    return kernel

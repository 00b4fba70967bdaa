"""SGEMM / DGEMM for Numba-CUDA: C = op(A) @ op(B) (+ bias per row, optional ReLU).

NumPy reference: every ``np.matmul`` in unet_np/nn/conv.py (conv2d_forward, conv2d_backward,
conv_transpose2d_forward, conv_transpose2d_backward) and the bias add of ``_batch_first``.

Two kernels, the plain one first (llm.c style), both checked against NumPy in
tests/backends/numba_cuda_check.py:

  gemm_tiled     one thread per output element, TILE x TILE threads per block, shared-memory tiles
                 of A and B. Easy to read; each value loaded from shared memory feeds one FMA.
  gemm_blocked   register blocking: a block computes a BM x BN tile of C with (BM/TM) x (BN/TN)
                 threads, each thread a TM x TN sub-tile kept in registers, so every value read
                 from shared memory feeds TM (or TN) FMAs. The default on a GPU.
                 Split-K: when C has few tiles and K is long (a weight gradient: 64 x 576 outputs,
                 each a sum over the N*H*W = 1M pixels of a batch), block row y of the grid sums
                 only its slice of K into a partial C of its own, and ``sum_splits_kernel`` adds the
                 partials (then alpha, bias, ReLU). Without it such a GEMM ran on 9 blocks of the
                 H100's 132 multiprocessors.

Operand layouts. Convolutions keep activations in NCHW, while the GEMMs see them as matrices with
the batch folded into the columns, (C, N*H*W). Instead of copying into that layout, every operand is
read (and C written) through a *layout* tuple

    (trans, rs, P, ns, cs):   X(r, s) = X_flat[r*rs + (s // P)*ns + (s % P)*cs]

and op(X) = X^T when ``trans`` is 1 (then the logical element (i, j) is X(j, i)). ``dense(cols)``
is an ordinary row-major matrix (P huge, so s // P = 0); ``nchw(C, plane)`` reads an (N, C, plane)
array as the (C, N*plane) matrix of conv.py's ``_channels_first`` without moving it. The GEMM's
output pass writes straight into NCHW and adds the bias there (conv.py's ``_batch_first``).

All arrays are passed flat (1-D). A kernel is compiled per dtype (the shared-memory tiles and the
accumulators have the operands' dtype) and per tile shape; ``gemm()`` picks and launches one.
"""
import math
import threading

from numba import cuda, float32, float64

from .cuda_launch import grid_1d

BIG = 1 << 62          # a "P" larger than any index: s // BIG = 0, s % BIG = s


def dense(cols, trans=False):
    """Layout of a row-major matrix with ``cols`` columns (op = transpose when trans)."""
    return (int(trans), int(cols), BIG, 0, 1)


def nchw(channels, plane, trans=False):
    """Layout of an (N, channels, plane) array read as the (channels, N*plane) matrix."""
    return (int(trans), int(plane), int(plane), int(channels) * int(plane), 1)


@cuda.jit(device=True, inline=True)
def _at(i, j, lay):
    """Flat index of the logical element (i, j) of op(X) for layout ``lay``."""
    trans, rs, P, ns, cs = lay
    if trans:
        r, s = j, i
    else:
        r, s = i, j
    if ns == 0:                       # a dense matrix: no (slow, 64-bit) division
        return r * rs + s * cs
    return r * rs + (s // P) * ns + (s % P) * cs


def _numba_type(dtype):
    return float64 if str(dtype) == "float64" else float32


# ---------------------------------------------------------------------------------------------------
# 1. Plain shared-memory tiled GEMM.
#
#    grid: a block-stride loop over the ceil(M/T) x ceil(N/T) output tiles (so a small grid, as the
#    simulator needs, still covers everything); block: T x T threads, thread (ty, tx) owns
#    C[tile_m*T + ty, tile_n*T + tx].  For each K-step of width T the block loads
#        As[ty, tx] = op(A)[row, k0 + tx]      Bs[ty, tx] = op(B)[k0 + ty, col]
#    (zeros outside the matrices), synchronises, and each thread adds sum_kk As[ty, kk] * Bs[kk, tx].
# ---------------------------------------------------------------------------------------------------
_tiled_cache = {}


def gemm_tiled_kernel(dtype, tile):
    key = (str(dtype), tile)
    if key in _tiled_cache:
        return _tiled_cache[key]
    T = tile
    nt = _numba_type(dtype)

    @cuda.jit
    def kernel(A, B, C, M, N, K, la, lb, lc, bias, has_bias, relu, alpha):
        As = cuda.shared.array((T, T), dtype=nt)
        Bs = cuda.shared.array((T, T), dtype=nt)
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tiles_n = (N + T - 1) // T
        tiles = ((M + T - 1) // T) * tiles_n
        for tile_id in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            row = (tile_id // tiles_n) * T + ty
            col = (tile_id % tiles_n) * T + tx
            acc = nt(0)
            for k0 in range(0, K, T):
                k = k0 + tx
                As[ty, tx] = A[_at(row, k, la)] if (row < M and k < K) else nt(0)
                k = k0 + ty
                Bs[ty, tx] = B[_at(k, col, lb)] if (k < K and col < N) else nt(0)
                cuda.syncthreads()
                for kk in range(T):
                    acc += As[ty, kk] * Bs[kk, tx]
                cuda.syncthreads()
            if row < M and col < N:
                v = acc * alpha
                if has_bias:
                    v += bias[row]
                if relu and v < 0:
                    v = nt(0)
                C[_at(row, col, lc)] = v

    _tiled_cache[key] = kernel
    return kernel


# ---------------------------------------------------------------------------------------------------
# 2. Register-blocked GEMM.
#
#    block tile BM x BN of C, K-step BK; threads RY x RX with RY = BM/TM, RX = BN/TN, numbered
#    t = ty*RX + tx. Thread (ty, tx) owns the TM x TN outputs
#        C[m0 + ty + i*RY, n0 + tx + j*RX],  i < TM, j < TN
#    (strided, so neighbouring threads read neighbouring shared-memory words and store neighbouring
#    columns). Per K-step all threads load As (BM x BK) and Bs (BK x BN) together, t, t + nthreads,
#    ...; then for each kk the thread reads TM values of As's column kk and TN of Bs's row kk into
#    registers and does TM*TN FMAs with them.
#    Split-K (gridDim.y = S > 1): block row y sums k in [y*kchunk, min(K, (y+1)*kchunk)) and writes
#    C + y*M*N (the caller passes a dense S x M x N partial buffer, no bias, no ReLU, alpha 1);
#    with S = 1 the slice is all of K and the offset 0.
# ---------------------------------------------------------------------------------------------------
_blocked_cache = {}


def gemm_blocked_kernel(dtype, BM, BN, BK, TM, TN):
    key = (str(dtype), BM, BN, BK, TM, TN)
    if key in _blocked_cache:
        return _blocked_cache[key]
    assert BM % TM == 0 and BN % TN == 0
    RY, RX = BM // TM, BN // TN
    NT = RY * RX
    nt = _numba_type(dtype)

    @cuda.jit
    def kernel(A, B, C, M, N, K, la, lb, lc, bias, has_bias, relu, alpha, kchunk):
        As = cuda.shared.array((BM, BK), dtype=nt)
        Bs = cuda.shared.array((BK, BN), dtype=nt)
        acc = cuda.local.array((TM, TN), dtype=nt)
        a_reg = cuda.local.array(TM, dtype=nt)
        b_reg = cuda.local.array(TN, dtype=nt)
        t = cuda.threadIdx.x
        ty = t // RX
        tx = t % RX
        tiles_n = (N + BN - 1) // BN
        tiles = ((M + BM - 1) // BM) * tiles_n
        k_begin = cuda.blockIdx.y * kchunk               # this block row's slice of K
        k_end = min(K, k_begin + kchunk)
        c_off = cuda.blockIdx.y * M * N                  # and its partial C (0 without split-K)
        for tile_id in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            m0 = (tile_id // tiles_n) * BM
            n0 = (tile_id % tiles_n) * BN
            for i in range(TM):
                for j in range(TN):
                    acc[i, j] = nt(0)
            for k0 in range(k_begin, k_end, BK):
                for e in range(t, BM * BK, NT):          # As[r, c] = op(A)[m0 + r, k0 + c]
                    r = e // BK
                    c = e % BK
                    m = m0 + r
                    k = k0 + c
                    As[r, c] = A[_at(m, k, la)] if (m < M and k < k_end) else nt(0)
                for e in range(t, BK * BN, NT):          # Bs[r, c] = op(B)[k0 + r, n0 + c]
                    r = e // BN
                    c = e % BN
                    k = k0 + r
                    n = n0 + c
                    Bs[r, c] = B[_at(k, n, lb)] if (k < k_end and n < N) else nt(0)
                cuda.syncthreads()
                for kk in range(BK):
                    for i in range(TM):
                        a_reg[i] = As[ty + i * RY, kk]
                    for j in range(TN):
                        b_reg[j] = Bs[kk, tx + j * RX]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += a_reg[i] * b_reg[j]
                cuda.syncthreads()
            for i in range(TM):                          # epilogue: alpha, bias, ReLU, store
                m = m0 + ty + i * RY
                if m < M:
                    for j in range(TN):
                        n = n0 + tx + j * RX
                        if n < N:
                            v = acc[i, j] * alpha
                            if has_bias:
                                v += bias[m]
                            if relu and v < 0:
                                v = nt(0)
                            C[c_off + _at(m, n, lc)] = v

    _blocked_cache[key] = kernel
    return kernel


@cuda.jit
def sum_splits_kernel(part, C, M, N, S, lc, bias, has_bias, relu, alpha):
    """C (layout lc) = alpha * sum_s part[s] [+ bias[m]] [ReLU]; part: S dense M x N partials."""
    for e in range(cuda.grid(1), M * N, cuda.gridsize(1)):
        v = part[e]
        for s in range(1, S):
            v += part[s * M * N + e]
        m = e // N
        v *= alpha
        if has_bias:
            v += bias[m]
        if relu and v < 0:
            v = 0.0                      # (v is float64 here: alpha is a float)
        C[_at(m, e % N, lc)] = v


# Tile shapes: on a GPU 64x64 tiles of 16x16 threads with 4x4 outputs each; under the simulator
# (every thread a Python thread, the cost of a launch growing with the threads) 8x8 tiles of 2x2
# threads and one block walking every tile, so tests finish in seconds.
# Split-K (blocked kernel only): when C has fewer than ``split_blocks`` tiles, K is cut into up to
# split_blocks / tiles slices of at least ``split_min_k``. On a GPU: fill about two waves of the
# H100's 132 multiprocessors. Under the simulator the default never splits (one block walks every
# tile anyway); the checks split on purpose with a config of their own.
GPU_CONFIG = dict(kind="blocked", BM=64, BN=64, BK=8, TM=4, TN=4, max_blocks=65535,
                  split_blocks=264, split_min_k=512)
SIM_CONFIG = dict(kind="blocked", BM=8, BN=8, BK=8, TM=4, TN=4, max_blocks=1,
                  split_blocks=1, split_min_k=8)


def k_splits(tiles, K, config):
    """How many slices of K the blocked GEMM sums separately (1: no split-K)."""
    if tiles >= config.get("split_blocks", 1):
        return 1
    return max(1, min(config["split_blocks"] // tiles, K // config["split_min_k"]))


def default_config():
    from numba import config as _cfg
    return SIM_CONFIG if _cfg.ENABLE_CUDASIM else GPU_CONFIG


# The split-K partial sums: one buffer per thread, device and dtype, grown when too small and reused
# by the next call instead of a cudaMalloc per GEMM. At most split_blocks tiles of BM x BN elements
# (264 x 64 x 64 floats, 4 MiB in float32). Kernels of one thread run in order on its stream, so the
# next GEMM cannot overwrite partials that sum_splits_kernel has not read yet.
_scratch = threading.local()


def _partials(n, dtype):
    bufs = _scratch.__dict__.setdefault("bufs", {})
    key = (getattr(cuda.get_current_device(), "id", 0), dtype)   # the simulator's one device has no id
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = cuda.device_array(n, dtype=dtype)
    return buf[:n]


def gemm(A, B, C, M, N, K, la, lb, lc, bias=None, relu=False, alpha=1.0, config=None):
    """C (through layout lc) = alpha * op(A) @ op(B) [+ bias[m]] [ReLU].

    A, B, C: flat device arrays (Numba device arrays or CuPy arrays) of one float dtype; op(A) is
    M x K, op(B) K x N; la, lb, lc: layouts from ``dense`` / ``nchw``; bias: (M,) or None.
    config: dict(kind='blocked', BM, BN, BK, TM, TN, max_blocks, split_blocks, split_min_k) or
    dict(kind='tiled', tile, max_blocks).
    """
    config = config or default_config()
    if M == 0 or N == 0:
        return C
    has_bias = bias is not None
    b = bias if has_bias else C          # any array of the right dtype; never read
    if config["kind"] == "tiled":
        T = config["tile"]
        kern = gemm_tiled_kernel(C.dtype, T)
        tiles = math.ceil(M / T) * math.ceil(N / T)
        grid, block = min(tiles, config["max_blocks"]), (T, T)
        kern[grid, block](A, B, C, M, N, K, la, lb, lc, b, has_bias, bool(relu), float(alpha))
        return C
    kern = gemm_blocked_kernel(C.dtype, config["BM"], config["BN"], config["BK"], config["TM"],
                               config["TN"])
    tiles = math.ceil(M / config["BM"]) * math.ceil(N / config["BN"])
    block = (config["BM"] // config["TM"]) * (config["BN"] // config["TN"])
    grid = min(tiles, config["max_blocks"])
    S = k_splits(tiles, K, config)
    if S == 1:
        kern[grid, block](A, B, C, M, N, K, la, lb, lc, b, has_bias, bool(relu), float(alpha), K)
        return C
    BK = config["BK"]
    kchunk = math.ceil(math.ceil(K / S) / BK) * BK            # whole K-steps per slice
    S = math.ceil(K / kchunk)
    part = _partials(S * M * N, C.dtype)
    kern[(grid, S), block](A, B, part, M, N, K, la, lb, dense(N), part, False, False, 1.0, kchunk)
    blocks, threads = grid_1d(M * N)
    sum_splits_kernel[blocks, threads](part, C, M, N, S, lc, b, has_bias, bool(relu), float(alpha))
    return C

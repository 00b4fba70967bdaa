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

  gemm_batched   the fast one (layout-specialised, batched, register-blocked, double-buffered):
                 C[b] = op(A[b]) @ op(B[b]) for b < batch in ONE launch (Winograd's 36 position
                 GEMMs; a 1x1 convolution's images, with A's batch stride 0). One kernel is compiled
                 per (dtype, tiles, trans_a, trans_b): the operand layout is fixed at compile time, so
                 the loads are plain ``row * ld + col`` with no branch and no division. Each thread
                 owns TM x TN outputs (8x8 on a GPU) in registers; the K loop runs over shared-memory
                 tiles, double-buffered: the next tile is read from global memory into registers
                 while the current one is multiplied, then stored into the other buffer (one barrier
                 per K-step). Split-K over gridDim.z for the weight gradient's long K.

Operand layouts (kernels 1 and 2). Convolutions keep activations in NCHW, while the GEMMs see them as matrices with
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


# ---------------------------------------------------------------------------------------------------
# 3. Batched, layout-specialised, register-blocked, double-buffered GEMM.
#
#    C[b] (M, N, row stride ldc) = op(A[b]) @ op(B[b])  [+ bias[m]] [ReLU],  b < batch, where
#        A[b] starts at b * sa:  op(A)(m, k) = A[m*lda + k]      (trans_a: A[k*lda + m])
#        B[b] starts at b * sb:  op(B)(k, n) = B[k*ldb + n]      (trans_b: B[n*ldb + k])
#    grid (x, y, z): a block-stride loop over the ceil(M/BM) x ceil(N/BN) tiles in x, over the batch
#    in y, and the z-th slice of K (split-K) in z; block: (BM/TM) x (BN/TN) threads, thread
#    t = ty*RX + tx owning C[m0 + ty + i*RY, n0 + tx + j*RX] (i < TM, j < TN), strided so that
#    neighbouring threads read neighbouring shared words and store neighbouring columns.
#    Shared tiles are stored k-major, As[buf, kk, m] and Bs[buf, kk, n], so the TM (TN) values a
#    thread needs at step kk are one row of each. Per K-step of BK:
#        registers <- global tile k0 + BK (the next one), while
#        acc += As[cur] x Bs[cur]   (BK x TM x TN FMAs: mac_tile, unrolled by hand)
#        As[1 - cur], Bs[1 - cur] <- registers;  barrier
#    Split-K (gridDim.z = S > 1): slice z sums k in [z*kchunk, min(K, (z+1)*kchunk)) into the dense
#    partial part[(z*batch + b)*M*N + m*N + n] (no bias, no ReLU); sum_splits_batched_kernel adds them.
#    Numba-CUDA has no vector types (float4), so the loads are scalar; along the contiguous axis the
#    threads of a warp read consecutive words (coalesced).
# ---------------------------------------------------------------------------------------------------
_batched_cache = {}


def gemm_batched_kernel(dtype, BM, BN, BK, TM, TN, trans_a, trans_b):
    key = (str(dtype), BM, BN, BK, TM, TN, bool(trans_a), bool(trans_b))
    if key in _batched_cache:
        return _batched_cache[key]
    assert BM % TM == 0 and BN % TN == 0
    RY, RX = BM // TM, BN // TN
    NT = RY * RX
    assert (BM * BK) % NT == 0 and (BN * BK) % NT == 0, "each thread loads whole tiles' shares"
    assert BK == 8, "mac_tile below unrolls a K-step of 8 by hand"
    LA, LB = BM * BK // NT, BN * BK // NT      # elements of A (B) each thread loads per K-step
    TA, TB = bool(trans_a), bool(trans_b)
    nt = _numba_type(dtype)

    @cuda.jit(device=True, inline=True)
    def load_a(A, a0, lda, M, m0, k0, k_end, t, ra):
        # ra[q] <- op(A)(m0 + r, k0 + c) for this thread's q-th element; (r, c) along the contiguous axis
        for q in range(LA):
            e = t + q * NT
            if TA:                                  # stored (K, M): m contiguous
                r = e % BM
                c = e // BM
                m = m0 + r
                k = k0 + c
                ra[q] = A[a0 + k * lda + m] if (m < M and k < k_end) else nt(0)
            else:                                   # stored (M, K): k contiguous
                r = e // BK
                c = e % BK
                m = m0 + r
                k = k0 + c
                ra[q] = A[a0 + m * lda + k] if (m < M and k < k_end) else nt(0)

    @cuda.jit(device=True, inline=True)
    def store_a(As, buf, t, ra):
        for q in range(LA):
            e = t + q * NT
            if TA:
                As[buf, e // BM, e % BM] = ra[q]
            else:
                As[buf, e % BK, e // BK] = ra[q]

    @cuda.jit(device=True, inline=True)
    def load_b(B, b0, ldb, N, n0, k0, k_end, t, rb):
        for q in range(LB):
            e = t + q * NT
            if TB:                                  # stored (N, K): k contiguous
                r = e % BK
                c = e // BK
                k = k0 + r
                n = n0 + c
                rb[q] = B[b0 + n * ldb + k] if (n < N and k < k_end) else nt(0)
            else:                                   # stored (K, N): n contiguous
                r = e // BN
                c = e % BN
                k = k0 + r
                n = n0 + c
                rb[q] = B[b0 + k * ldb + n] if (n < N and k < k_end) else nt(0)

    @cuda.jit(device=True, inline=True)
    def store_b(Bs, buf, t, rb):
        for q in range(LB):
            e = t + q * NT
            if TB:
                Bs[buf, e % BK, e // BK] = rb[q]
            else:
                Bs[buf, e // BN, e % BN] = rb[q]

    @cuda.jit(device=True, inline=True)
    def mac(As, Bs, cur, kk, ty, tx, acc, a_reg, b_reg):
        # step kk of a K-step: TM values of As's row kk, TN of Bs's, TM x TN FMAs
        for i in range(TM):
            a_reg[i] = As[cur, kk, ty + i * RY]
        for j in range(TN):
            b_reg[j] = Bs[cur, kk, tx + j * RX]
        for i in range(TM):
            for j in range(TN):
                acc[i, j] += a_reg[i] * b_reg[j]

    # The K-step's BK steps, unrolled by hand (Numba has no unroll pragma, and LLVM leaves a loop of
    # this size rolled): with kk a constant every shared load takes an immediate offset.
    @cuda.jit(device=True, inline=True)
    def mac_tile(As, Bs, cur, ty, tx, acc, a_reg, b_reg):
        mac(As, Bs, cur, 0, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 1, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 2, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 3, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 4, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 5, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 6, ty, tx, acc, a_reg, b_reg)
        mac(As, Bs, cur, 7, ty, tx, acc, a_reg, b_reg)

    @cuda.jit
    def kernel(A, B, C, M, N, K, batch, lda, ldb, ldc, sa, sb, sc, bias, has_bias, relu, kchunk):
        As = cuda.shared.array((2, BK, BM), dtype=nt)
        Bs = cuda.shared.array((2, BK, BN), dtype=nt)
        acc = cuda.local.array((TM, TN), dtype=nt)
        a_reg = cuda.local.array(TM, dtype=nt)
        b_reg = cuda.local.array(TN, dtype=nt)
        ra = cuda.local.array(LA, dtype=nt)
        rb = cuda.local.array(LB, dtype=nt)
        t = cuda.threadIdx.x
        ty = t // RX
        tx = t % RX
        tiles_n = (N + BN - 1) // BN
        tiles = ((M + BM - 1) // BM) * tiles_n
        z = cuda.blockIdx.z
        k_begin = z * kchunk
        k_end = min(K, k_begin + kchunk)
        nk = (k_end - k_begin + BK - 1) // BK      # K-steps of this slice
        for b in range(cuda.blockIdx.y, batch, cuda.gridDim.y):
            a0 = b * sa
            b0 = b * sb
            for tile_id in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
                m0 = (tile_id // tiles_n) * BM
                n0 = (tile_id % tiles_n) * BN
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] = nt(0)
                if nk > 0:
                    load_a(A, a0, lda, M, m0, k_begin, k_end, t, ra)
                    load_b(B, b0, ldb, N, n0, k_begin, k_end, t, rb)
                    store_a(As, 0, t, ra)
                    store_b(Bs, 0, t, rb)
                cuda.syncthreads()
                for kt in range(nk):
                    cur = kt & 1
                    if kt + 1 < nk:                  # prefetch the next tile into registers
                        k_next = k_begin + (kt + 1) * BK
                        load_a(A, a0, lda, M, m0, k_next, k_end, t, ra)
                        load_b(B, b0, ldb, N, n0, k_next, k_end, t, rb)
                    mac_tile(As, Bs, cur, ty, tx, acc, a_reg, b_reg)
                    if kt + 1 < nk:                  # the other buffer: nobody reads it this step
                        store_a(As, 1 - cur, t, ra)
                        store_b(Bs, 1 - cur, t, rb)
                    cuda.syncthreads()
                if cuda.gridDim.z > 1:               # split-K: a dense partial of its own
                    p0 = (z * batch + b) * M * N
                    for i in range(TM):
                        m = m0 + ty + i * RY
                        if m < M:
                            for j in range(TN):
                                n = n0 + tx + j * RX
                                if n < N:
                                    C[p0 + m * N + n] = acc[i, j]
                else:
                    c0 = b * sc
                    for i in range(TM):              # epilogue: bias, ReLU, store
                        m = m0 + ty + i * RY
                        if m < M:
                            for j in range(TN):
                                n = n0 + tx + j * RX
                                if n < N:
                                    v = acc[i, j]
                                    if has_bias:
                                        v += bias[m]
                                    if relu and v < 0:
                                        v = nt(0)
                                    C[c0 + m * ldc + n] = v

    _batched_cache[key] = kernel
    return kernel


@cuda.jit
def sum_splits_batched_kernel(part, C, M, N, batch, S, ldc, sc, bias, has_bias, relu):
    """C[b, m, n] (row stride ldc, batch stride sc) = sum_s part[s, b, m, n] [+ bias[m]] [ReLU]."""
    MN = M * N
    total = batch * MN
    for e in range(cuda.grid(1), total, cuda.gridsize(1)):
        v = part[e]
        for s in range(1, S):
            v += part[s * total + e]
        b = e // MN
        r = e - b * MN
        m = r // N
        n = r - m * N
        if has_bias:
            v += bias[m]
        if relu and v < 0:
            v = 0.0
        C[b * sc + m * ldc + n] = v


# Tiles of the batched kernel. On a GPU: 128x128 blocks of 16x16 threads with 8x8 outputs each when
# M >= 128, else 64x64 blocks of 8x8 threads with 8x8 outputs (the Winograd GEMMs of a 64-channel
# layer have M = 64). BK = 8 (the unrolled mac_tile). To be timed on the device (benchmarks/gpu.py
# numba_gemm). Under the simulator: 8x8 tiles, 2x2 outputs, BK 8, and a grid of one block (the loops
# cover every tile and batch), so tests finish in seconds.
# PTX for sm_90 (numba.cuda.compile_ptx, no GPU needed), 128x128 tiles, float32: per K-step 512 FMAs
# in 995 instructions with the hand unrolling (128 shared loads with immediate offsets), against
# 8 x 175 with the K-step as a loop; no local memory (the 8x8 accumulators stay in registers).
BATCHED_GPU_CONFIGS = (dict(BM=128, BN=128, BK=8, TM=8, TN=8), dict(BM=64, BN=64, BK=8, TM=8, TN=8))
BATCHED_SIM_CONFIG = dict(BM=8, BN=8, BK=8, TM=2, TN=2, max_blocks=1, max_batch_blocks=1,
                          split_blocks=1, split_min_k=4)
BATCHED_GPU_LIMITS = dict(max_blocks=65535, max_batch_blocks=65535, split_blocks=264, split_min_k=512)


def batched_config(M):
    """The tile configuration of gemm_batched for M rows (GPU or simulator)."""
    from numba import config as _cfg
    if _cfg.ENABLE_CUDASIM:
        return BATCHED_SIM_CONFIG
    big, small = BATCHED_GPU_CONFIGS
    return dict(big if M >= 128 else small, **BATCHED_GPU_LIMITS)


def gemm_batched(A, B, C, M, N, K, batch=1, trans_a=False, trans_b=False, lda=None, ldb=None, ldc=None,
                 sa=None, sb=None, sc=None, bias=None, relu=False, config=None, sum_batch=False):
    """C[b] = op(A[b]) @ op(B[b]) [+ bias[m]] [ReLU] for b < batch, in one launch (two with split-K).
    sum_batch: C = sum_b op(A[b]) @ op(B[b]) instead (one M x N matrix: a weight gradient, summed over
    the images), as batch * S partial products (S: split-K slices) then one summing pass.

    A, B, C: flat device arrays of one float dtype. op(A[b]) is M x K: A[b*sa + m*lda + k], or with
    trans_a A[b*sa + k*lda + m]; op(B[b]) is K x N: B[b*sb + k*ldb + n], or with trans_b
    B[b*sb + n*ldb + k]; C[b*sc + m*ldc + n]. Defaults: packed matrices (lda = K or M, ldb = N or K,
    ldc = N, sa = M*K, sb = K*N, sc = M*N); sa = 0 shares one A among the batch (a 1x1 convolution's
    weight). bias: (M,) or None. config: batched_config(M) unless given (tests pass their own).
    """
    if M == 0 or N == 0 or batch == 0:
        return C
    config = config or batched_config(M)
    lda = (M if trans_a else K) if lda is None else lda
    ldb = (K if trans_b else N) if ldb is None else ldb
    ldc = N if ldc is None else ldc
    sa = M * K if sa is None else sa
    sb = K * N if sb is None else sb
    sc = M * N if sc is None else sc
    BM, BN, BK, TM, TN = (config[k] for k in ("BM", "BN", "BK", "TM", "TN"))
    kern = gemm_batched_kernel(C.dtype, BM, BN, BK, TM, TN, trans_a, trans_b)
    has_bias = bias is not None
    bb = bias if has_bias else C
    tiles = math.ceil(M / BM) * math.ceil(N / BN)
    block = (BM // TM) * (BN // TN)
    gx, gy = min(tiles, config["max_blocks"]), min(batch, config["max_batch_blocks"])
    S = k_splits(tiles * batch, K, config)
    if S == 1 and not sum_batch:
        kern[(gx, gy, 1), block](A, B, C, M, N, K, batch, lda, ldb, ldc, sa, sb, sc, bb, has_bias,
                                 bool(relu), max(K, 1))
        return C
    kchunk = math.ceil(math.ceil(K / S) / BK) * BK if K > 0 else 1    # whole K-steps per slice
    S = max(1, math.ceil(K / kchunk))
    part = _partials(S * batch * M * N, C.dtype)
    # a split-K launch (gridDim.z = S) writes dense partials; with S = 1 the kernel would write C
    # itself, so sum_batch without split-K writes the partials as a plain batched product instead
    if S > 1:
        kern[(gx, gy, S), block](A, B, part, M, N, K, batch, lda, ldb, N, sa, sb, M * N, part, False,
                                 False, kchunk)
    else:
        kern[(gx, gy, 1), block](A, B, part, M, N, K, batch, lda, ldb, N, sa, sb, M * N, part, False,
                                 False, max(K, 1))
    # part[(z * batch + b), m, n]: summed over z (and over b too when sum_batch)
    rows, parts = (1, S * batch) if sum_batch else (batch, S)
    blocks, threads = grid_1d(rows * M * N)
    sum_splits_batched_kernel[blocks, threads](part, C, M, N, rows, parts, ldc, sc, bb, has_bias, bool(relu))
    return C

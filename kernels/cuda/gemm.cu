// gemm.cu -- C = A @ B written out by hand, for readers (the backend's GEMMs are cuBLAS: cupy.matmul).
//
// NumPy reference: np.matmul (A (M, K) @ B (K, N) -> C (M, N), all row-major, contiguous); in the
// models, the GEMMs of unet_np/nn/conv.py (W @ cols, dY @ cols^T, W^T @ dY).
// Python side: unet_np/backends/cupy_backend.py (CudaKernels.gemm_tiled); timed against cuBLAS in
// benchmarks/gpu.py.
//
// Two versions, numbered as llm.c numbers its kernels, each checked against cupy.matmul first:
//   v1  gemm_tiled_v1_*: 16x16 output tile per block of 16x16 threads, one output per thread. The
//       block walks along K in steps of 16, staging a 16x16 tile of A and one of B in shared memory;
//       each value loaded from global memory is then used 16 times. Launch: block (16, 16),
//       grid (ceil(N/16), ceil(M/16)).
//   v2  gemm_tiled_v2_*: register blocking. A 64x64 output tile per block of 16x16 threads, each
//       thread computing a 4x4 grid of outputs (rows ty + 16*a, columns tx + 16*b) held in registers;
//       K is walked in steps of 16 through a 64x16 tile of A (stored transposed) and a 16x64 tile of
//       B. Each shared-memory value read feeds 4 multiply-adds instead of 1, which is what lets a GEMM
//       approach the arithmetic peak. Launch: block (16, 16), grid (ceil(N/64), ceil(M/64)).
// Edges (M, N, K not multiples of the tile) are handled by loading zeros and not storing outside C.

#define TILE 16
#define BIG 64          // v2's block tile
#define PER 4           // v2: outputs per thread along each axis (BIG = TILE * PER)

template <typename T>
__device__ void gemm_tiled_v1(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                              long long M, long long N, long long K) {
    __shared__ T As[TILE][TILE];
    __shared__ T Bs[TILE][TILE];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long row = (long long)blockIdx.y * TILE + ty;
    const long long col = (long long)blockIdx.x * TILE + tx;
    T acc = (T)0;
    for (long long k0 = 0; k0 < K; k0 += TILE) {
        As[ty][tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : (T)0;
        Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(k0 + ty) * N + col] : (T)0;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[row * N + col] = acc;
}

template <typename T>
__device__ void gemm_tiled_v2(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                              long long M, long long N, long long K) {
    __shared__ T At[TILE][BIG + 1]; // At[k][r] = A[row0 + r, k0 + k]   (A's tile, transposed; the +1
                                    // column keeps the transposing stores free of bank conflicts)
    __shared__ T Bs[TILE][BIG];     // Bs[k][c] = B[k0 + k, col0 + c]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * TILE + tx;                    // 0..255
    const long long row0 = (long long)blockIdx.y * BIG, col0 = (long long)blockIdx.x * BIG;
    T acc[PER][PER];
    for (int a = 0; a < PER; ++a)
        for (int b = 0; b < PER; ++b) acc[a][b] = (T)0;
    for (long long k0 = 0; k0 < K; k0 += TILE) {
        // 64x16 values of each tile, 256 threads: 4 loads per thread for each.
        for (int q = 0; q < PER; ++q) {
            const int e = q * TILE * TILE + tid;       // 0..1023
            const int r = e / TILE, k = e % TILE;      // A tile: row r, column k (k fastest: coalesced)
            const long long ar = row0 + r, ak = k0 + k;
            At[k][r] = (ar < M && ak < K) ? A[ar * K + ak] : (T)0;
            const int kb = e / BIG, c = e % BIG;       // B tile: row kb, column c (c fastest)
            const long long bk = k0 + kb, bc = col0 + c;
            Bs[kb][c] = (bk < K && bc < N) ? B[bk * N + bc] : (T)0;
        }
        __syncthreads();
        for (int k = 0; k < TILE; ++k) {
            T av[PER], bv[PER];
            for (int a = 0; a < PER; ++a) av[a] = At[k][ty + TILE * a];
            for (int b = 0; b < PER; ++b) bv[b] = Bs[k][tx + TILE * b];
            for (int a = 0; a < PER; ++a)
                for (int b = 0; b < PER; ++b) acc[a][b] += av[a] * bv[b];
        }
        __syncthreads();
    }
    for (int a = 0; a < PER; ++a) {
        const long long r = row0 + ty + TILE * a;
        if (r >= M) continue;
        for (int b = 0; b < PER; ++b) {
            const long long c = col0 + tx + TILE * b;
            if (c < N) C[r * N + c] = acc[a][b];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void gemm_tiled_v1_f32(const float* A, const float* B, float* C, long long M, long long N,
                                             long long K) {
    gemm_tiled_v1<float>(A, B, C, M, N, K);
}
extern "C" __global__ void gemm_tiled_v1_f64(const double* A, const double* B, double* C, long long M, long long N,
                                             long long K) {
    gemm_tiled_v1<double>(A, B, C, M, N, K);
}
extern "C" __global__ void gemm_tiled_v2_f32(const float* A, const float* B, float* C, long long M, long long N,
                                             long long K) {
    gemm_tiled_v2<float>(A, B, C, M, N, K);
}
extern "C" __global__ void gemm_tiled_v2_f64(const double* A, const double* B, double* C, long long M, long long N,
                                             long long K) {
    gemm_tiled_v2<double>(A, B, C, M, N, K);
}

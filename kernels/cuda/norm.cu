// norm.cu -- per-channel reductions and the batch-norm passes.
//
// NumPy reference: unet_np/nn/norm.py -- batchnorm2d_forward / batchnorm2d_backward (_channel_sum,
// _channel_dot). The same reductions give the convolutions' bias gradients (conv.py: dy summed over
// n, h, w) and the loss's sums (loss.py).
// Python side: unet_np/backends/cupy_backend.py (CudaKernels._channel_reduce, batchnorm2d_*).
//
// Reductions work on a (N, C, L) array (NCHW with L = H*W; a (C, M) array is N = 1, L = M) and
// produce one number per channel c, summed over n and l, ACCUMULATED IN DOUBLE for both dtypes (so a
// float32 sum over millions of values keeps ~7 good digits). Two deterministic passes, no atomics:
//   channel_reduce_partial: grid (splits, C'), block of any size (256 from the Python side): block
//       (s, c) sums, with its first `width` threads (the largest power of two <= min(blockDim, 256)),
//       the elements e = s*width + tid, stepping by splits*width, into partial[c*splits + s];
//   channel_reduce_finish: out[c] = T(scale * sum_s partial[c*splits + s]), in a fixed order.
// What is summed (mode): 0 sum a;  1 sum (a - m[c])^2;  2 sum a * b.
// Both loops are grid-stride too, so any grid (even one thread) gives the same sums.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

#define REDUCE_THREADS 256

template <typename T>
__device__ void channel_reduce_partial(const T* __restrict__ a, const T* __restrict__ b,
                                       const T* __restrict__ m, double* __restrict__ partial,
                                       long long N, long long C, long long L, long long splits,
                                       long long mode) {
    __shared__ double buf[REDUCE_THREADS];
    // The tree sum needs a power of two no larger than buf: the block's first `width` threads do the
    // work (all of it, for the 256-thread blocks the Python side launches), any others only meet the
    // barriers. So no launch shape can write past buf or drop a value.
    long long width = 1;
    while (width * 2 <= (long long)blockDim.x && width * 2 <= REDUCE_THREADS) width *= 2;
    const long long count = N * L;                     // values per channel
    const long long tid = threadIdx.x;
    for (long long c = blockIdx.y; c < C; c += gridDim.y) {
        for (long long s = blockIdx.x; s < splits; s += gridDim.x) {
            double acc = 0.0;
            if (tid < width) {
                for (long long e = s * width + tid; e < count; e += splits * width) {
                    const long long n = e / L, l = e % L;
                    const long long k = (n * C + c) * L + l;
                    const double v = (double)a[k];
                    if (mode == 0) acc += v;
                    else if (mode == 1) { const double d = v - (double)m[c]; acc += d * d; }
                    else acc += v * (double)b[k];
                }
                buf[tid] = acc;
            }
            __syncthreads();
            for (long long stride = width / 2; stride > 0; stride /= 2) {   // tree sum
                if (tid < stride) buf[tid] += buf[tid + stride];
                __syncthreads();
            }
            if (tid == 0) partial[c * splits + s] = buf[0];
            __syncthreads();                           // buf is reused by the next (c, s)
        }
    }
}

template <typename T>
__device__ void channel_reduce_finish(const double* __restrict__ partial, T* __restrict__ out,
                                      long long C, long long splits, double scale) {
    GRID_STRIDE(c, C) {
        double acc = 0.0;
        for (long long s = 0; s < splits; ++s) acc += partial[c * splits + s];
        out[c] = (T)(acc * scale);
    }
}

// ---------------------------------------------------------------------------------------------------
// Batch norm, training forward:  xhat = (x - mu[c]) * inv_std[c];  y = xhat * gamma[c] + beta[c]
// (gamma, beta optional). xhat is kept for the backward.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void bn_train_fwd(const T* __restrict__ x, const T* __restrict__ mu, const T* __restrict__ inv_std,
                             const T* __restrict__ gamma, long long has_gamma,
                             const T* __restrict__ beta, long long has_beta,
                             T* __restrict__ xhat, T* __restrict__ y, long long C, long long L, long long total) {
    GRID_STRIDE(idx, total) {
        const long long c = (idx / L) % C;
        const T h = (x[idx] - mu[c]) * inv_std[c];
        xhat[idx] = h;
        T v = has_gamma ? h * gamma[c] : h;
        if (has_beta) v += beta[c];
        y[idx] = v;
    }
}

// y = x * a[c] + b[c]: the evaluation forward (a = gamma / sqrt(var + eps), b = beta - mean * a), its
// input gradient (b = 0), and xhat = (x - mean) * inv_std in the evaluation backward.
template <typename T>
__device__ void channel_affine(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                               T* __restrict__ y, long long C, long long L, long long total) {
    GRID_STRIDE(idx, total) {
        const long long c = (idx / L) % C;
        y[idx] = x[idx] * a[c] + b[c];
    }
}

// Training backward: dx = (dy - xhat * k1[c] - k2[c]) * scale[c]
// with k1 = dgamma / M, k2 = dbeta / M, scale = gamma * inv_std (docs/backprop.md#batch-normalisation).
template <typename T>
__device__ void bn_train_bwd(const T* __restrict__ dy, const T* __restrict__ xhat, const T* __restrict__ k1,
                             const T* __restrict__ k2, const T* __restrict__ scale, T* __restrict__ dx,
                             long long C, long long L, long long total) {
    GRID_STRIDE(idx, total) {
        const long long c = (idx / L) % C;
        dx[idx] = ((dy[idx] - xhat[idx] * k1[c]) - k2[c]) * scale[c];
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define RED_ARGS long long N, long long C, long long L, long long splits, long long mode
#define RED_PASS N, C, L, splits, mode
extern "C" __global__ void channel_reduce_partial_f32(const float* a, const float* b, const float* m,
                                                      double* partial, RED_ARGS) {
    channel_reduce_partial<float>(a, b, m, partial, RED_PASS);
}
extern "C" __global__ void channel_reduce_partial_f64(const double* a, const double* b, const double* m,
                                                      double* partial, RED_ARGS) {
    channel_reduce_partial<double>(a, b, m, partial, RED_PASS);
}
extern "C" __global__ void channel_reduce_finish_f32(const double* partial, float* out, long long C,
                                                     long long splits, double scale) {
    channel_reduce_finish<float>(partial, out, C, splits, scale);
}
extern "C" __global__ void channel_reduce_finish_f64(const double* partial, double* out, long long C,
                                                     long long splits, double scale) {
    channel_reduce_finish<double>(partial, out, C, splits, scale);
}

#define BNF_ARGS(T) const T* x, const T* mu, const T* inv_std, const T* gamma, long long has_gamma, \
    const T* beta, long long has_beta, T* xhat, T* y, long long C, long long L, long long total
#define BNF_PASS x, mu, inv_std, gamma, has_gamma, beta, has_beta, xhat, y, C, L, total
extern "C" __global__ void bn_train_fwd_f32(BNF_ARGS(float)) { bn_train_fwd<float>(BNF_PASS); }
extern "C" __global__ void bn_train_fwd_f64(BNF_ARGS(double)) { bn_train_fwd<double>(BNF_PASS); }

extern "C" __global__ void channel_affine_f32(const float* x, const float* a, const float* b, float* y,
                                              long long C, long long L, long long total) {
    channel_affine<float>(x, a, b, y, C, L, total);
}
extern "C" __global__ void channel_affine_f64(const double* x, const double* a, const double* b, double* y,
                                              long long C, long long L, long long total) {
    channel_affine<double>(x, a, b, y, C, L, total);
}

#define BNB_ARGS(T) const T* dy, const T* xhat, const T* k1, const T* k2, const T* scale, T* dx, \
    long long C, long long L, long long total
#define BNB_PASS dy, xhat, k1, k2, scale, dx, C, L, total
extern "C" __global__ void bn_train_bwd_f32(BNB_ARGS(float)) { bn_train_bwd<float>(BNB_PASS); }
extern "C" __global__ void bn_train_bwd_f64(BNB_ARGS(double)) { bn_train_bwd<double>(BNB_PASS); }

// loss.cu -- softmax cross-entropy with class weights, a per-pixel weight map and ignore_index.
//
// NumPy reference: unet_np/nn/loss.py -- softmax_cross_entropy_forward / softmax_cross_entropy_backward.
// Python side: unet_np/backends/cupy_backend.py (CudaKernels.softmax_cross_entropy_forward, ...).
//
// logits x (N, C, M) (M = the pixels of one image), target t (N, M) int64, class weight cw (C,),
// pixel weight pw (N, M), both optional. For pixel i = (n, m), with m_i = max_c x_ic:
//   l_i  = log sum_c exp(x_ic - m_i) - (x_i,t_i - m_i)          (-log softmax, never overflows)
//   w_i  = cw[t_i] (1 without class weights), 0 where t_i == ignore_index
//   loss = sum_i pw_i w_i l_i / sum_i w_i
// xent_fwd writes w_i and pw_i w_i l_i per pixel; the two sums are norm.cu's reductions (in double).
// xent_bwd: dlogits_ic = coef_i (p_ic - [c == t_i]),  coef_i = pw_i w_i / sum_j w_j  (0 when the
// denominator is 0: every pixel ignored, PyTorch's NaN loss with a zero gradient). The softmax is
// recomputed from the logits (C is small), so the forward keeps no (N, C, M) buffer.
// One thread per pixel; the class loop reads x with stride M (coalesced across threads).

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

template <typename T>
__device__ void xent_fwd(const T* __restrict__ x, const long long* __restrict__ t,
                         const T* __restrict__ cw, long long has_cw, const T* __restrict__ pw, long long has_pw,
                         long long ignore_index, T* __restrict__ wout, T* __restrict__ lout,
                         long long N, long long C, long long M) {
    const long long P = N * M;
    GRID_STRIDE(p, P) {
        const long long n = p / M, m = p % M;
        const T* xp = x + n * C * M + m;              // xp[c * M] = x[n, c, m]
        T mx = xp[0];
        for (long long c = 1; c < C; ++c) { const T v = xp[c * M]; if (v > mx) mx = v; }
        T s = (T)0;
        for (long long c = 0; c < C; ++c) s += exp_(xp[c * M] - mx);
        const long long tv = t[p];
        const bool valid = tv != ignore_index;
        const long long t0 = valid ? tv : 0;
        const T nll = log_(s) - (xp[t0 * M] - mx);
        T w = valid ? (has_cw ? cw[t0] : (T)1) : (T)0;
        const T lw = has_pw ? w * pw[p] : w;
        wout[p] = w;
        lout[p] = lw * nll;
    }
}

template <typename T>
__device__ void xent_bwd(const T* __restrict__ x, const long long* __restrict__ t,
                         const T* __restrict__ cw, long long has_cw, const T* __restrict__ pw, long long has_pw,
                         long long ignore_index, T denom, T* __restrict__ dx,
                         long long N, long long C, long long M) {
    const long long P = N * M;
    GRID_STRIDE(p, P) {
        const long long n = p / M, m = p % M;
        const T* xp = x + n * C * M + m;
        T* dp = dx + n * C * M + m;
        T mx = xp[0];
        for (long long c = 1; c < C; ++c) { const T v = xp[c * M]; if (v > mx) mx = v; }
        T s = (T)0;
        for (long long c = 0; c < C; ++c) s += exp_(xp[c * M] - mx);
        const long long tv = t[p];
        const bool valid = tv != ignore_index;
        const long long t0 = valid ? tv : 0;
        const T w = valid ? (has_cw ? cw[t0] : (T)1) : (T)0;
        const T lw = has_pw ? w * pw[p] : w;
        const T coef = denom == (T)0 ? (T)0 : lw / denom;
        const T k = coef / s;                          // coef * p_ic = e_ic * (coef / s)
        for (long long c = 0; c < C; ++c) {
            T g = exp_(xp[c * M] - mx) * k;
            if (c == t0) g -= coef;
            dp[c * M] = g;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void xent_fwd_f32(const float* x, const long long* t, const float* cw, long long has_cw,
                                        const float* pw, long long has_pw, long long ignore_index,
                                        float* wout, float* lout, long long N, long long C, long long M) {
    xent_fwd<float>(x, t, cw, has_cw, pw, has_pw, ignore_index, wout, lout, N, C, M);
}
extern "C" __global__ void xent_fwd_f64(const double* x, const long long* t, const double* cw, long long has_cw,
                                        const double* pw, long long has_pw, long long ignore_index,
                                        double* wout, double* lout, long long N, long long C, long long M) {
    xent_fwd<double>(x, t, cw, has_cw, pw, has_pw, ignore_index, wout, lout, N, C, M);
}
extern "C" __global__ void xent_bwd_f32(const float* x, const long long* t, const float* cw, long long has_cw,
                                        const float* pw, long long has_pw, long long ignore_index,
                                        float denom, float* dx, long long N, long long C, long long M) {
    xent_bwd<float>(x, t, cw, has_cw, pw, has_pw, ignore_index, denom, dx, N, C, M);
}
extern "C" __global__ void xent_bwd_f64(const double* x, const long long* t, const double* cw, long long has_cw,
                                        const double* pw, long long has_pw, long long ignore_index,
                                        double denom, double* dx, long long N, long long C, long long M) {
    xent_bwd<double>(x, t, cw, has_cw, pw, has_pw, ignore_index, denom, dx, N, C, M);
}

// upsample.cu -- upsampling by integer factors (sh, sw): bilinear (align_corners=False) and nearest.
//
// NumPy reference: unet_np/nn/upsample.py -- upsample_bilinear2d_forward / upsample_bilinear2d_backward
// (_interp_axis, _interp_axis_adjoint), upsample_nearest2d_forward / upsample_nearest2d_backward.
// Python side: unet_np/backends/cupy_backend.py.
//
// Bilinear is separable. Along one axis of length L with factor s, output o = s*i + r (phase r) sits
// at source position i + d_r, d_r = (2r + 1 - s) / (2s), and reads two inputs (taps below):
//   d_r <  0: x[i-1] with weight -d_r and x[i] with 1 + d_r      (i = 0: a copy of x[0])
//   d_r >= 0: x[i] with weight 1 - d_r and x[i+1] with d_r       (i = L-1: a copy of x[L-1])
// The weights are computed in double and rounded to T, as NumPy does with its Python-float factors.
// Forward: one thread per output pixel, y = sum_ab wh_a ww_b x[ih_a, iw_b].
// Backward (the adjoint): one thread per INPUT pixel, gathering every output whose taps include it:
// an output o reads inputs in [o/s - 1, o/s + 1], so only o in [s(i-1), s(i+2)) can read input i.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// The two taps of output o along an axis of length L, factor s: inputs i0, i1 with weights w0, w1.
// At the edges (and for s = 1) the second weight is 0 and the second tap repeats the first.
template <typename T>
__device__ __forceinline__ void taps(long long o, long long s, long long L, long long* i0, long long* i1,
                                     T* w0, T* w1) {
    const long long i = o / s, r = o % s;
    const double d = (double)(2 * r + 1 - s) / (double)(2 * s);
    if (d < 0) {
        if (i == 0) { *i0 = 0; *i1 = 0; *w0 = (T)1; *w1 = (T)0; }
        else { *i0 = i - 1; *i1 = i; *w0 = (T)(-d); *w1 = (T)(1 + d); }
    } else {
        if (i == L - 1 || d == 0) { *i0 = i; *i1 = i; *w0 = (T)1; *w1 = (T)0; }
        else { *i0 = i; *i1 = i + 1; *w0 = (T)(1 - d); *w1 = (T)d; }
    }
}

// y (NC, sh*H, sw*W) from x (NC, H, W): first along W (z rows), then along H, as the reference.
template <typename T>
__device__ void bilinear_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long H,
                             long long W, long long sh, long long sw) {
    const long long Ho = sh * H, Wo = sw * W;
    const long long total = NC * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long ow = idx % Wo, oh = (idx / Wo) % Ho, nc = idx / (Wo * Ho);
        long long h0, h1, c0, c1;
        T a0, a1, b0, b1;
        taps<T>(oh, sh, H, &h0, &h1, &a0, &a1);
        taps<T>(ow, sw, W, &c0, &c1, &b0, &b1);
        const T* plane = x + nc * H * W;
        T z0 = plane[h0 * W + c0] * b0;               // row h0 interpolated along W
        if (b1 != (T)0) z0 += b1 * plane[h0 * W + c1];
        T v = z0 * a0;
        if (a1 != (T)0) {
            T z1 = plane[h1 * W + c0] * b0;           // row h1 interpolated along W
            if (b1 != (T)0) z1 += b1 * plane[h1 * W + c1];
            v += a1 * z1;
        }
        y[idx] = v;
    }
}

// The weight with which output o (along one axis) reads input i: 0 when o does not read it.
template <typename T>
__device__ __forceinline__ T tap_weight(long long o, long long i, long long s, long long L) {
    long long i0, i1;
    T w0, w1;
    taps<T>(o, s, L, &i0, &i1, &w0, &w1);
    T w = (T)0;
    if (i0 == i) w += w0;
    if (i1 == i) w += w1;
    return w;
}

template <typename T>
__device__ void bilinear_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long H,
                             long long W, long long sh, long long sw) {
    const long long Ho = sh * H, Wo = sw * W;
    const long long total = NC * H * W;
    GRID_STRIDE(idx, total) {
        const long long j = idx % W, i = (idx / W) % H, nc = idx / (W * H);
        const long long oh0 = sh * (i - 1) < 0 ? 0 : sh * (i - 1);
        const long long oh1 = sh * (i + 2) < Ho ? sh * (i + 2) : Ho;
        const long long ow0 = sw * (j - 1) < 0 ? 0 : sw * (j - 1);
        const long long ow1 = sw * (j + 2) < Wo ? sw * (j + 2) : Wo;
        const T* plane = dy + nc * Ho * Wo;
        T acc = (T)0;
        for (long long oh = oh0; oh < oh1; ++oh) {
            const T a = tap_weight<T>(oh, i, sh, H);
            if (a == (T)0) continue;
            T row = (T)0;
            for (long long ow = ow0; ow < ow1; ++ow) {
                const T b = tap_weight<T>(ow, j, sw, W);
                if (b != (T)0) row += b * plane[oh * Wo + ow];
            }
            acc += a * row;
        }
        dx[idx] = acc;
    }
}

// Nearest: y[a, b] = x[a / sh, b / sw]; the adjoint sums each sh x sw block.
template <typename T>
__device__ void nearest_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long H,
                            long long W, long long sh, long long sw) {
    const long long Ho = sh * H, Wo = sw * W;
    const long long total = NC * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long ow = idx % Wo, oh = (idx / Wo) % Ho, nc = idx / (Wo * Ho);
        y[idx] = x[(nc * H + oh / sh) * W + ow / sw];
    }
}

template <typename T>
__device__ void nearest_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long H,
                            long long W, long long sh, long long sw) {
    const long long Ho = sh * H, Wo = sw * W;
    const long long total = NC * H * W;
    GRID_STRIDE(idx, total) {
        const long long j = idx % W, i = (idx / W) % H, nc = idx / (W * H);
        const T* plane = dy + nc * Ho * Wo;
        T acc = (T)0;
        for (long long a = 0; a < sh; ++a)
            for (long long b = 0; b < sw; ++b) acc += plane[(i * sh + a) * Wo + j * sw + b];
        dx[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define UP_ARGS long long NC, long long H, long long W, long long sh, long long sw
#define UP_PASS NC, H, W, sh, sw
extern "C" __global__ void bilinear_fwd_f32(const float* x, float* y, UP_ARGS) {
    bilinear_fwd<float>(x, y, UP_PASS);
}
extern "C" __global__ void bilinear_fwd_f64(const double* x, double* y, UP_ARGS) {
    bilinear_fwd<double>(x, y, UP_PASS);
}
extern "C" __global__ void bilinear_bwd_f32(const float* dy, float* dx, UP_ARGS) {
    bilinear_bwd<float>(dy, dx, UP_PASS);
}
extern "C" __global__ void bilinear_bwd_f64(const double* dy, double* dx, UP_ARGS) {
    bilinear_bwd<double>(dy, dx, UP_PASS);
}
extern "C" __global__ void nearest_fwd_f32(const float* x, float* y, UP_ARGS) {
    nearest_fwd<float>(x, y, UP_PASS);
}
extern "C" __global__ void nearest_fwd_f64(const double* x, double* y, UP_ARGS) {
    nearest_fwd<double>(x, y, UP_PASS);
}
extern "C" __global__ void nearest_bwd_f32(const float* dy, float* dx, UP_ARGS) {
    nearest_bwd<float>(dy, dx, UP_PASS);
}
extern "C" __global__ void nearest_bwd_f64(const double* dy, double* dx, UP_ARGS) {
    nearest_bwd<double>(dy, dx, UP_PASS);
}

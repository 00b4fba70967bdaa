// upsample.cu -- upsampling by integer factors: bilinear / trilinear (align_corners False or True) and
// nearest, on images (NC, H, W) and volumes (NC, D, H, W).
//
// NumPy reference: unet_np/nn/upsample.py -- upsample_bilinear2d_forward / upsample_bilinear2d_backward
// (_interp_axis, _interp_axis_adjoint), upsample_nearest2d_forward / upsample_nearest2d_backward,
// upsample_trilinear3d_forward / _backward, upsample_nearest3d_forward / _backward.
// Python side: unet_np/backends/cupy_backend.py (2-D), kernels/cupy_vol.py (3-D).
//
// One body serves both ranks: the kernels work on volumes (NC, D, H, W), and an image (NC, H, W) is the
// volume (NC, 1, H, W) with depth factor 1: the 2-D entry points pass D = 1, sd = 1, align = 0. Along an
// axis of length 1 with factor 1 every output copies x[0] with weight 1, so an image gets exactly the
// plane-wise sums.
//
// Linear interpolation is separable. Along one axis of length L with factor s, output o reads two
// inputs i0, i1 with weights w0, w1 (taps below):
//   align_corners == 0: o = s*i + r (phase r) sits at source position i + d_r, d_r = (2r + 1 - s) / (2s):
//     d_r <  0: x[i-1] with weight -d_r and x[i] with 1 + d_r      (i = 0: a copy of x[0])
//     d_r >= 0: x[i] with weight 1 - d_r and x[i+1] with d_r       (i = L-1: a copy of x[L-1])
//   align_corners != 0: o sits at pos = o * (L-1)/(sL-1) (align_corners_matrix): i0 = min(floor(pos), L-2),
//     w1 = pos - i0 (L = 1: a copy of x[0])
// The weights are computed in double and rounded to T, as NumPy does with its Python-float factors.
// Forward: one thread per output voxel, y = sum_abc wd_a wh_b ww_c x[z_a, h_b, w_c] (W first, then H, D).
// Backward (the adjoint): one thread per INPUT voxel, gathering every output whose taps include it
// (reader_range bounds them loosely; tap_weight is 0 for the others).

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// The two taps of output o along an axis of length L, factor s: inputs i0, i1 with weights w0, w1.
// At the edges (and for s = 1) the second weight is 0 and the second tap repeats the first.
template <typename T>
__device__ __forceinline__ void taps(long long o, long long s, long long L, long long align,
                                     long long* i0, long long* i1, T* w0, T* w1) {
    if (align) {
        if (L == 1) { *i0 = 0; *i1 = 0; *w0 = (T)1; *w1 = (T)0; return; }
        const double pos = (double)o * ((double)(L - 1) / (double)(s * L - 1));
        long long f = (long long)pos;                 // floor: pos >= 0
        if (f > L - 2) f = L - 2;
        const double frac = pos - (double)f;
        *i0 = f; *i1 = f + 1; *w0 = (T)(1.0 - frac); *w1 = (T)frac;
        return;
    }
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

// The weight with which output o reads input i along one axis (0 when it does not read it).
template <typename T>
__device__ __forceinline__ T tap_weight(long long o, long long i, long long s, long long L, long long align) {
    long long i0, i1;
    T w0, w1;
    taps<T>(o, s, L, align, &i0, &i1, &w0, &w1);
    T w = (T)0;
    if (i0 == i) w += w0;
    if (i1 == i) w += w1;
    return w;
}

// Outputs [*lo, *hi) that may read input i along one axis (a superset; tap_weight decides).
__device__ __forceinline__ void reader_range(long long i, long long s, long long L, long long align,
                                             long long* lo, long long* hi) {
    const long long So = s * L;
    long long a, b;
    if (!align) { a = s * (i - 1); b = s * (i + 2); }     // o reads inputs in [o/s - 1, o/s + 1]
    else if (L == 1) { a = 0; b = So; }
    else {                                                // pos = o / ratio in (i - 1, i + 1)
        const double ratio = (double)(So - 1) / (double)(L - 1);
        a = i < 1 ? 0 : (long long)((double)(i - 1) * ratio) - 1;
        b = (long long)((double)(i + 1) * ratio) + 2;
    }
    *lo = a < 0 ? 0 : a;
    *hi = b < So ? b : So;
}

// One plane (H, W) read at rows hi[0..1] (weights hw) and columns wi[0..1] (weights ww): each row
// along W first, then along H, as the reference. A second weight of 0 skips its tap.
template <typename T>
__device__ __forceinline__ T bilinear_at(const T* plane, long long W, const long long* hi, const T* hw,
                                         const long long* wi, const T* ww) {
    const T* row = plane + hi[0] * W;
    T z0 = row[wi[0]] * ww[0];                        // row hi[0] interpolated along W
    if (ww[1] != (T)0) z0 += ww[1] * row[wi[1]];
    T v = z0 * hw[0];
    if (hw[1] != (T)0) {
        row = plane + hi[1] * W;
        T z1 = row[wi[0]] * ww[0];                    // row hi[1] interpolated along W
        if (ww[1] != (T)0) z1 += ww[1] * row[wi[1]];
        v += hw[1] * z1;
    }
    return v;
}

// y (NC, sd*D, sh*H, sw*W) from x (NC, D, H, W): each of the (up to) two source planes along H and W,
// then along D.
template <typename T>
__device__ void linear_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long D,
                           long long H, long long W, long long sd, long long sh, long long sw, long long align) {
    const long long Do = sd * D, Ho = sh * H, Wo = sw * W;
    const long long total = NC * Do * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long ow = idx % Wo, oh = (idx / Wo) % Ho, od = (idx / (Wo * Ho)) % Do;
        const long long nc = idx / (Wo * Ho * Do);
        long long zi[2], hi[2], wi[2];
        T zw[2], hw[2], ww[2];
        taps<T>(od, sd, D, align, &zi[0], &zi[1], &zw[0], &zw[1]);
        taps<T>(oh, sh, H, align, &hi[0], &hi[1], &hw[0], &hw[1]);
        taps<T>(ow, sw, W, align, &wi[0], &wi[1], &ww[0], &ww[1]);
        const T* vol = x + nc * D * H * W;
        T v = zw[0] * bilinear_at<T>(vol + zi[0] * H * W, W, hi, hw, wi, ww);
        if (zw[1] != (T)0) v += zw[1] * bilinear_at<T>(vol + zi[1] * H * W, W, hi, hw, wi, ww);
        y[idx] = v;
    }
}

// dx (NC, D, H, W) from dy (NC, sd*D, sh*H, sw*W): the adjoint of linear_fwd.
template <typename T>
__device__ void linear_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long D,
                           long long H, long long W, long long sd, long long sh, long long sw, long long align) {
    const long long Do = sd * D, Ho = sh * H, Wo = sw * W;
    const long long total = NC * D * H * W;
    GRID_STRIDE(idx, total) {
        const long long k = idx % W, j = (idx / W) % H, i = (idx / (W * H)) % D, nc = idx / (W * H * D);
        long long d_lo, d_hi, h_lo, h_hi, w_lo, w_hi;
        reader_range(i, sd, D, align, &d_lo, &d_hi);
        reader_range(j, sh, H, align, &h_lo, &h_hi);
        reader_range(k, sw, W, align, &w_lo, &w_hi);
        const T* vol = dy + nc * Do * Ho * Wo;
        T acc = (T)0;
        for (long long od = d_lo; od < d_hi; ++od) {
            const T a = tap_weight<T>(od, i, sd, D, align);
            if (a == (T)0) continue;
            T plane = (T)0;
            for (long long oh = h_lo; oh < h_hi; ++oh) {
                const T b = tap_weight<T>(oh, j, sh, H, align);
                if (b == (T)0) continue;
                T line = (T)0;
                for (long long ow = w_lo; ow < w_hi; ++ow) {
                    const T c = tap_weight<T>(ow, k, sw, W, align);
                    if (c != (T)0) line += c * vol[(od * Ho + oh) * Wo + ow];
                }
                plane += b * line;
            }
            acc += a * plane;
        }
        dx[idx] = acc;
    }
}

// Nearest: y[a, b, e] = x[a / sd, b / sh, e / sw]; the adjoint sums each sd x sh x sw block.
template <typename T>
__device__ void nearest_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long D,
                            long long H, long long W, long long sd, long long sh, long long sw) {
    const long long Do = sd * D, Ho = sh * H, Wo = sw * W;
    const long long total = NC * Do * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long ow = idx % Wo, oh = (idx / Wo) % Ho, od = (idx / (Wo * Ho)) % Do;
        const long long nc = idx / (Wo * Ho * Do);
        y[idx] = x[((nc * D + od / sd) * H + oh / sh) * W + ow / sw];
    }
}

template <typename T>
__device__ void nearest_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long D,
                            long long H, long long W, long long sd, long long sh, long long sw) {
    const long long Do = sd * D, Ho = sh * H, Wo = sw * W;
    const long long total = NC * D * H * W;
    GRID_STRIDE(idx, total) {
        const long long k = idx % W, j = (idx / W) % H, i = (idx / (W * H)) % D, nc = idx / (W * H * D);
        const T* vol = dy + nc * Do * Ho * Wo;
        T acc = (T)0;
        for (long long a = 0; a < sd; ++a)
            for (long long b = 0; b < sh; ++b)
                for (long long e = 0; e < sw; ++e) acc += vol[((i * sd + a) * Ho + j * sh + b) * Wo + k * sw + e];
        dx[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points. 2-D: bilinear_* and nearest_* on (NC, H, W), the volume kernels with D = 1, sd = 1
// (bilinear is align_corners=False). 3-D: trilinear3d_* and nearest3d_* on (NC, D, H, W).
// ---------------------------------------------------------------------------------------------------
#define UP_ARGS long long NC, long long H, long long W, long long sh, long long sw
#define UP_PASS NC, 1, H, W, 1, sh, sw
extern "C" __global__ void bilinear_fwd_f32(const float* x, float* y, UP_ARGS) {
    linear_fwd<float>(x, y, UP_PASS, 0);
}
extern "C" __global__ void bilinear_fwd_f64(const double* x, double* y, UP_ARGS) {
    linear_fwd<double>(x, y, UP_PASS, 0);
}
extern "C" __global__ void bilinear_bwd_f32(const float* dy, float* dx, UP_ARGS) {
    linear_bwd<float>(dy, dx, UP_PASS, 0);
}
extern "C" __global__ void bilinear_bwd_f64(const double* dy, double* dx, UP_ARGS) {
    linear_bwd<double>(dy, dx, UP_PASS, 0);
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

#define UP3_ARGS long long NC, long long D, long long H, long long W, long long sd, long long sh, long long sw
#define UP3_PASS NC, D, H, W, sd, sh, sw
extern "C" __global__ void trilinear3d_fwd_f32(const float* x, float* y, UP3_ARGS, long long align) {
    linear_fwd<float>(x, y, UP3_PASS, align);
}
extern "C" __global__ void trilinear3d_fwd_f64(const double* x, double* y, UP3_ARGS, long long align) {
    linear_fwd<double>(x, y, UP3_PASS, align);
}
extern "C" __global__ void trilinear3d_bwd_f32(const float* dy, float* dx, UP3_ARGS, long long align) {
    linear_bwd<float>(dy, dx, UP3_PASS, align);
}
extern "C" __global__ void trilinear3d_bwd_f64(const double* dy, double* dx, UP3_ARGS, long long align) {
    linear_bwd<double>(dy, dx, UP3_PASS, align);
}
extern "C" __global__ void nearest3d_fwd_f32(const float* x, float* y, UP3_ARGS) {
    nearest_fwd<float>(x, y, UP3_PASS);
}
extern "C" __global__ void nearest3d_fwd_f64(const double* x, double* y, UP3_ARGS) {
    nearest_fwd<double>(x, y, UP3_PASS);
}
extern "C" __global__ void nearest3d_bwd_f32(const float* dy, float* dx, UP3_ARGS) {
    nearest_bwd<float>(dy, dx, UP3_PASS);
}
extern "C" __global__ void nearest3d_bwd_f64(const double* dy, double* dx, UP3_ARGS) {
    nearest_bwd<double>(dy, dx, UP3_PASS);
}

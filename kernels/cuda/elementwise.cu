// elementwise.cu -- activations and the data movers: ReLU, sigmoid, concatenation, crop, pad.
//
// NumPy reference: unet_np/nn/activation.py -- relu_forward / relu_backward / sigmoid_forward /
// sigmoid_backward; unet_np/nn/concat.py -- concat_forward / concat_backward, center_crop_forward /
// center_crop_backward, pad2d_forward / pad2d_backward.
// Python side: unet_np/backends/cupy_backend.py.
//
// Every kernel is a grid-stride loop over its outputs, one thread per output element; the movers
// gather (each output reads what it needs), so nothing needs zero-filling first and nothing uses
// atomics.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }

// ---------------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------------
// y = max(x, 0) (a NaN stays NaN, as np.maximum)
template <typename T>
__device__ void relu_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) {
        const T v = x[i];
        y[i] = v < (T)0 ? (T)0 : v;
    }
}

// dx = dy * [y > 0]   (the derivative at 0 is 0, as PyTorch's)
template <typename T>
__device__ void relu_bwd(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n) {
    GRID_STRIDE(i, n) { dx[i] = y[i] > (T)0 ? dy[i] : dy[i] * (T)0; }
}

// y = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0: exp never sees a large argument.
template <typename T>
__device__ void sigmoid_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    GRID_STRIDE(i, n) {
        const T v = x[i];
        const T e = exp_(v < (T)0 ? v : -v);          // exp(-|x|)
        y[i] = v >= (T)0 ? (T)1 / ((T)1 + e) : e / ((T)1 + e);
    }
}

// dx = dy * y * (1 - y)
template <typename T>
__device__ void sigmoid_bwd(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, long long n) {
    GRID_STRIDE(i, n) {
        const T s = y[i];
        dx[i] = dy[i] * s * ((T)1 - s);
    }
}

// ---------------------------------------------------------------------------------------------------
// slab_copy: the concatenation and its adjoint. Arrays seen as (A, B, L): A = the product of the axes
// before the joined axis, B = its length, L = the product of the axes after it.
//   dst[a, off_d + b, l] = src[a, off_s + b, l]   for b < nb
// concat forward: one call per input (src = x_k with Bs = nb = B_k, off_s = 0; dst = y with Bd = the
// total, off_d = the running offset). concat backward: the same with src and dst exchanged.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void slab_copy(const T* __restrict__ src, T* __restrict__ dst, long long A, long long Bs,
                          long long Bd, long long L, long long nb, long long off_s, long long off_d) {
    const long long total = A * nb * L;
    GRID_STRIDE(idx, total) {
        const long long l = idx % L, b = (idx / L) % nb, a = idx / (L * nb);
        dst[(a * Bd + off_d + b) * L + l] = src[(a * Bs + off_s + b) * L + l];
    }
}

// ---------------------------------------------------------------------------------------------------
// window_copy: dst (NC, Hd, Wd)[h, w] = src (NC, Hs, Ws)[h + dt, w + dl] where that lies inside src,
// else fill. Crop forward (dt, dl = the crop's offsets), crop backward (dt, dl negated, fill 0),
// constant-pad forward (dt = -top, dl = -left, fill = the value) and constant-pad backward (a crop).
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void window_copy(const T* __restrict__ src, T* __restrict__ dst, long long NC,
                            long long Hs, long long Ws, long long Hd, long long Wd,
                            long long dt, long long dl, T fill) {
    const long long total = NC * Hd * Wd;
    GRID_STRIDE(idx, total) {
        const long long w = idx % Wd, h = (idx / Wd) % Hd, nc = idx / (Wd * Hd);
        const long long hs = h + dt, ws = w + dl;
        dst[idx] = (hs >= 0 && hs < Hs && ws >= 0 && ws < Ws) ? src[(nc * Hs + hs) * Ws + ws] : fill;
    }
}

// ---------------------------------------------------------------------------------------------------
// Reflect padding (torch's F.pad(mode='reflect'): mirrored about the edge pixel, which is not repeated;
// every pad is smaller than the padded dimension, so one reflection is enough).
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ long long reflect_index(long long i, long long n) {
    if (i < 0) return -i;
    if (i >= n) return 2 * (n - 1) - i;
    return i;
}

// y (NC, t+H+b, l+W+r)[h, w] = x (NC, H, W)[reflect(h - t), reflect(w - l)]
template <typename T>
__device__ void reflect_pad_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long H,
                                long long W, long long Hp, long long Wp, long long t, long long l) {
    const long long total = NC * Hp * Wp;
    GRID_STRIDE(idx, total) {
        const long long w = idx % Wp, h = (idx / Wp) % Hp, nc = idx / (Wp * Hp);
        y[idx] = x[(nc * H + reflect_index(h - t, H)) * W + reflect_index(w - l, W)];
    }
}

// The adjoint: dx[i, j] = sum of dy over the padded positions (p, q) that copied x[i, j].
// Along one axis, the padded positions that copy input i are: i + t itself; t - i (the leading mirror,
// when 1 <= i <= t); t + n + (n - 2 - i) (the trailing mirror, when 0 <= n - 2 - i < trailing pad).
__device__ __forceinline__ int reflect_sources(long long i, long long n, long long lead, long long trail,
                                               long long* pos) {
    int k = 0;
    pos[k++] = i + lead;
    if (i >= 1 && i <= lead) pos[k++] = lead - i;
    const long long j = n - 2 - i;
    if (j >= 0 && j < trail) pos[k++] = lead + n + j;
    return k;
}

template <typename T>
__device__ void reflect_pad_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long H,
                                long long W, long long t, long long b, long long l, long long r) {
    const long long Hp = t + H + b, Wp = l + W + r;
    const long long total = NC * H * W;
    GRID_STRIDE(idx, total) {
        const long long j = idx % W, i = (idx / W) % H, nc = idx / (W * H);
        long long rows[3], colsv[3];
        const int nr = reflect_sources(i, H, t, b, rows);
        const int ncol = reflect_sources(j, W, l, r, colsv);
        T acc = (T)0;
        for (int p = 0; p < nr; ++p)
            for (int q = 0; q < ncol; ++q) acc += dy[(nc * Hp + rows[p]) * Wp + colsv[q]];
        dx[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void relu_fwd_f32(const float* x, float* y, long long n) { relu_fwd<float>(x, y, n); }
extern "C" __global__ void relu_fwd_f64(const double* x, double* y, long long n) { relu_fwd<double>(x, y, n); }
extern "C" __global__ void relu_bwd_f32(const float* dy, const float* y, float* dx, long long n) {
    relu_bwd<float>(dy, y, dx, n);
}
extern "C" __global__ void relu_bwd_f64(const double* dy, const double* y, double* dx, long long n) {
    relu_bwd<double>(dy, y, dx, n);
}
extern "C" __global__ void sigmoid_fwd_f32(const float* x, float* y, long long n) { sigmoid_fwd<float>(x, y, n); }
extern "C" __global__ void sigmoid_fwd_f64(const double* x, double* y, long long n) { sigmoid_fwd<double>(x, y, n); }
extern "C" __global__ void sigmoid_bwd_f32(const float* dy, const float* y, float* dx, long long n) {
    sigmoid_bwd<float>(dy, y, dx, n);
}
extern "C" __global__ void sigmoid_bwd_f64(const double* dy, const double* y, double* dx, long long n) {
    sigmoid_bwd<double>(dy, y, dx, n);
}

#define SLAB_ARGS long long A, long long Bs, long long Bd, long long L, long long nb, long long off_s, long long off_d
#define SLAB_PASS A, Bs, Bd, L, nb, off_s, off_d
extern "C" __global__ void slab_copy_f32(const float* src, float* dst, SLAB_ARGS) {
    slab_copy<float>(src, dst, SLAB_PASS);
}
extern "C" __global__ void slab_copy_f64(const double* src, double* dst, SLAB_ARGS) {
    slab_copy<double>(src, dst, SLAB_PASS);
}

#define WIN_ARGS long long NC, long long Hs, long long Ws, long long Hd, long long Wd, long long dt, long long dl
#define WIN_PASS NC, Hs, Ws, Hd, Wd, dt, dl
extern "C" __global__ void window_copy_f32(const float* src, float* dst, WIN_ARGS, float fill) {
    window_copy<float>(src, dst, WIN_PASS, fill);
}
extern "C" __global__ void window_copy_f64(const double* src, double* dst, WIN_ARGS, double fill) {
    window_copy<double>(src, dst, WIN_PASS, fill);
}

extern "C" __global__ void reflect_pad_fwd_f32(const float* x, float* y, long long NC, long long H, long long W,
                                               long long Hp, long long Wp, long long t, long long l) {
    reflect_pad_fwd<float>(x, y, NC, H, W, Hp, Wp, t, l);
}
extern "C" __global__ void reflect_pad_fwd_f64(const double* x, double* y, long long NC, long long H, long long W,
                                               long long Hp, long long Wp, long long t, long long l) {
    reflect_pad_fwd<double>(x, y, NC, H, W, Hp, Wp, t, l);
}
extern "C" __global__ void reflect_pad_bwd_f32(const float* dy, float* dx, long long NC, long long H, long long W,
                                               long long t, long long b, long long l, long long r) {
    reflect_pad_bwd<float>(dy, dx, NC, H, W, t, b, l, r);
}
extern "C" __global__ void reflect_pad_bwd_f64(const double* dy, double* dx, long long NC, long long H, long long W,
                                               long long t, long long b, long long l, long long r) {
    reflect_pad_bwd<double>(dy, dx, NC, H, W, t, b, l, r);
}

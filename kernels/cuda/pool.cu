// pool.cu -- max-pooling forward (value + argmax) and backward (gradient routed to the argmax), on images
// and volumes.
//
// NumPy reference: unet_np/nn/pool.py -- maxpool2d_forward / maxpool2d_backward
// (_maxpool2x2_forward, _maxpool2x2_backward, _maxpool_windows_forward, _maxpool_windows_backward),
// maxpool3d_forward / maxpool3d_backward.
// Python side: unet_np/backends/cupy_backend.py (CudaKernels.maxpool2d_forward, ...), kernels/cupy_vol.py
// (maxpool3d_*).
//
// x (N, C, H, W) -> y (N, C, Ho, Wo) and arg (N, C, Ho, Wo) int32: the winning window position
// k = a*kw + b (row-major); on volumes x (N, C, D, H, W) -> y, arg (N, C, Do, Ho, Wo), k = (i*kh + j)*kw + l. A tie goes to the FIRST maximum in that order (strict '>' when scanning),
// as PyTorch does. A NaN in the window makes the output NaN (like np.maximum / PyTorch).
// Padding never wins: the scan only visits positions inside the image (PyTorch's rule padding <= k/2
// guarantees every window has one).
// The backward GATHERS: one thread per input pixel sums dy over the windows whose argmax is that pixel,
// so it writes every pixel once (no zero-fill pass, no atomics, deterministic).

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------------
// 2x2 windows, stride 2, no padding (the U-Net's pooling): four loads, three compares.
// Odd H or W: the last row / column belongs to no window.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void maxpool2x2_fwd(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ arg,
                               long long NC, long long H, long long W, long long Ho, long long Wo) {
    const long long total = NC * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long wo = idx % Wo, ho = (idx / Wo) % Ho, nc = idx / (Wo * Ho);
        const T* p = x + (nc * H + 2 * ho) * W + 2 * wo;
        T best = p[0];
        int k = 0;
        const T cand[3] = {p[1], p[W], p[W + 1]};
        for (int q = 0; q < 3; ++q) {
            const T v = cand[q];
            if (v > best || (v != v && best == best)) { best = v; k = q + 1; }
        }
        y[idx] = best;
        arg[idx] = k;
    }
}

template <typename T>
__device__ void maxpool2x2_bwd(const T* __restrict__ dy, const int* __restrict__ arg, T* __restrict__ dx,
                               long long NC, long long H, long long W, long long Ho, long long Wo) {
    const long long total = NC * H * W;
    GRID_STRIDE(idx, total) {
        const long long w = idx % W, h = (idx / W) % H, nc = idx / (W * H);
        const long long ho = h / 2, wo = w / 2;
        T v = (T)0;
        if (ho < Ho && wo < Wo) {
            const long long o = (nc * Ho + ho) * Wo + wo;
            if (arg[o] == (int)((h % 2) * 2 + (w % 2))) v = dy[o];
        }
        dx[idx] = v;
    }
}

// ---------------------------------------------------------------------------------------------------
// General windows on volumes (NC, D, H, W) -> (NC, Do, Ho, Wo): kernel (kd, kh, kw), stride (sd, sh, sw),
// padding (pd, ph, pw). Window (od, oh, ow) covers depths od*sd - pd + i, i < kd, rows oh*sh - ph + j,
// j < kh, and columns ow*sw - pw + l, l < kw; arg = (i*kh + j)*kw + l. An image (NC, H, W) is the volume
// (NC, 1, H, W) with kd = sd = 1, pd = 0 (the 2-D entry points pass them), and then arg = j*kw + l.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ arg,
                            long long NC, long long D, long long H, long long W, long long Do, long long Ho,
                            long long Wo, long long kd, long long kh, long long kw, long long sd, long long sh,
                            long long sw, long long pd, long long ph, long long pw) {
    const long long total = NC * Do * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long ow = idx % Wo, oh = (idx / Wo) % Ho, od = (idx / (Wo * Ho)) % Do;
        const long long nc = idx / (Wo * Ho * Do);
        const T* vol = x + nc * D * H * W;
        T best = (T)0;
        int where = -1;
        for (long long i = 0; i < kd; ++i) {
            const long long z = od * sd - pd + i;
            if (z < 0 || z >= D) continue;
            for (long long j = 0; j < kh; ++j) {
                const long long h = oh * sh - ph + j;
                if (h < 0 || h >= H) continue;
                for (long long l = 0; l < kw; ++l) {
                    const long long w = ow * sw - pw + l;
                    if (w < 0 || w >= W) continue;
                    const T v = vol[(z * H + h) * W + w];
                    if (where < 0 || v > best || (v != v && best == best)) {
                        best = v;
                        where = (int)((i * kh + j) * kw + l);
                    }
                }
            }
        }
        y[idx] = best;
        arg[idx] = where < 0 ? 0 : where;
    }
}

// The windows o along one axis whose span [o*s - p, o*s - p + k - 1] holds position v: [*lo, *hi].
__device__ __forceinline__ void windows_holding(long long v, long long k, long long s, long long p,
                                                long long n_out, long long* lo, long long* hi) {
    const long long a = v + p - k + 1, b = v + p;    // a <= o*s <= b
    *lo = a <= 0 ? 0 : (a + s - 1) / s;
    *hi = b / s < n_out - 1 ? b / s : n_out - 1;
}

template <typename T>
__device__ void maxpool_bwd(const T* __restrict__ dy, const int* __restrict__ arg, T* __restrict__ dx,
                            long long NC, long long D, long long H, long long W, long long Do, long long Ho,
                            long long Wo, long long kd, long long kh, long long kw, long long sd, long long sh,
                            long long sw, long long pd, long long ph, long long pw) {
    const long long total = NC * D * H * W;
    GRID_STRIDE(idx, total) {
        const long long w = idx % W, h = (idx / W) % H, z = (idx / (W * H)) % D, nc = idx / (W * H * D);
        long long d_lo, d_hi, h_lo, h_hi, w_lo, w_hi;
        windows_holding(z, kd, sd, pd, Do, &d_lo, &d_hi);
        windows_holding(h, kh, sh, ph, Ho, &h_lo, &h_hi);
        windows_holding(w, kw, sw, pw, Wo, &w_lo, &w_hi);
        T acc = (T)0;
        for (long long od = d_lo; od <= d_hi; ++od) {
            const long long i = z - (od * sd - pd);
            for (long long oh = h_lo; oh <= h_hi; ++oh) {
                const long long j = h - (oh * sh - ph);
                for (long long ow = w_lo; ow <= w_hi; ++ow) {
                    const long long l = w - (ow * sw - pw);
                    const long long o = ((nc * Do + od) * Ho + oh) * Wo + ow;
                    if (arg[o] == (int)((i * kh + j) * kw + l)) acc += dy[o];
                }
            }
        }
        dx[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define P2_ARGS long long NC, long long H, long long W, long long Ho, long long Wo
#define P2_PASS NC, H, W, Ho, Wo
#define PG_ARGS P2_ARGS, long long kh, long long kw, long long sh, long long sw, long long ph, long long pw
#define PG_PASS NC, 1, H, W, 1, Ho, Wo, 1, kh, kw, 1, sh, sw, 0, ph, pw
#define POOL3_ARGS long long NC, long long D, long long H, long long W, long long Do, long long Ho, long long Wo, \
    long long kd, long long kh, long long kw, long long sd, long long sh, long long sw, long long pd, long long ph, \
    long long pw
#define POOL3_PASS NC, D, H, W, Do, Ho, Wo, kd, kh, kw, sd, sh, sw, pd, ph, pw

extern "C" __global__ void maxpool2x2_fwd_f32(const float* x, float* y, int* arg, P2_ARGS) {
    maxpool2x2_fwd<float>(x, y, arg, P2_PASS);
}
extern "C" __global__ void maxpool2x2_fwd_f64(const double* x, double* y, int* arg, P2_ARGS) {
    maxpool2x2_fwd<double>(x, y, arg, P2_PASS);
}
extern "C" __global__ void maxpool2x2_bwd_f32(const float* dy, const int* arg, float* dx, P2_ARGS) {
    maxpool2x2_bwd<float>(dy, arg, dx, P2_PASS);
}
extern "C" __global__ void maxpool2x2_bwd_f64(const double* dy, const int* arg, double* dx, P2_ARGS) {
    maxpool2x2_bwd<double>(dy, arg, dx, P2_PASS);
}
extern "C" __global__ void maxpool_fwd_f32(const float* x, float* y, int* arg, PG_ARGS) {
    maxpool_fwd<float>(x, y, arg, PG_PASS);
}
extern "C" __global__ void maxpool_fwd_f64(const double* x, double* y, int* arg, PG_ARGS) {
    maxpool_fwd<double>(x, y, arg, PG_PASS);
}
extern "C" __global__ void maxpool_bwd_f32(const float* dy, const int* arg, float* dx, PG_ARGS) {
    maxpool_bwd<float>(dy, arg, dx, PG_PASS);
}
extern "C" __global__ void maxpool_bwd_f64(const double* dy, const int* arg, double* dx, PG_ARGS) {
    maxpool_bwd<double>(dy, arg, dx, PG_PASS);
}
extern "C" __global__ void maxpool3d_fwd_f32(const float* x, float* y, int* arg, POOL3_ARGS) {
    maxpool_fwd<float>(x, y, arg, POOL3_PASS);
}
extern "C" __global__ void maxpool3d_fwd_f64(const double* x, double* y, int* arg, POOL3_ARGS) {
    maxpool_fwd<double>(x, y, arg, POOL3_PASS);
}
extern "C" __global__ void maxpool3d_bwd_f32(const float* dy, const int* arg, float* dx, POOL3_ARGS) {
    maxpool_bwd<float>(dy, arg, dx, POOL3_PASS);
}
extern "C" __global__ void maxpool3d_bwd_f64(const double* dy, const int* arg, double* dx, POOL3_ARGS) {
    maxpool_bwd<double>(dy, arg, dx, POOL3_PASS);
}

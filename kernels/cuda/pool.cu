// pool.cu -- max-pooling forward (value + argmax) and backward (gradient routed to the argmax).
//
// NumPy reference: unet_np/nn/pool.py -- maxpool2d_forward / maxpool2d_backward
// (_maxpool2x2_forward, _maxpool2x2_backward, _maxpool_windows_forward, _maxpool_windows_backward).
// Python side: unet_np/backends/cupy_backend.py (CudaKernels.maxpool2d_forward, ...).
//
// x (N, C, H, W) -> y (N, C, Ho, Wo) and arg (N, C, Ho, Wo) int32: the winning window position
// k = a*kw + b (row-major). A tie goes to the FIRST maximum in that order (strict '>' when scanning),
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
// General windows: kernel (kh, kw), stride (sh, sw), padding (ph, pw).
// Window (ho, wo) covers rows ho*sh - ph + a, a < kh, and columns wo*sw - pw + b, b < kw.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void maxpool_fwd(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ arg,
                            long long NC, long long H, long long W, long long Ho, long long Wo,
                            long long kh, long long kw, long long sh, long long sw, long long ph, long long pw) {
    const long long total = NC * Ho * Wo;
    GRID_STRIDE(idx, total) {
        const long long wo = idx % Wo, ho = (idx / Wo) % Ho, nc = idx / (Wo * Ho);
        const T* plane = x + nc * H * W;
        T best = (T)0;
        int k = -1;
        for (long long a = 0; a < kh; ++a) {
            const long long h = ho * sh - ph + a;
            if (h < 0 || h >= H) continue;
            for (long long b = 0; b < kw; ++b) {
                const long long w = wo * sw - pw + b;
                if (w < 0 || w >= W) continue;
                const T v = plane[h * W + w];
                if (k < 0 || v > best || (v != v && best == best)) { best = v; k = (int)(a * kw + b); }
            }
        }
        y[idx] = best;
        arg[idx] = k < 0 ? 0 : k;
    }
}

template <typename T>
__device__ void maxpool_bwd(const T* __restrict__ dy, const int* __restrict__ arg, T* __restrict__ dx,
                            long long NC, long long H, long long W, long long Ho, long long Wo,
                            long long kh, long long kw, long long sh, long long sw, long long ph, long long pw) {
    const long long total = NC * H * W;
    GRID_STRIDE(idx, total) {
        const long long w = idx % W, h = (idx / W) % H, nc = idx / (W * H);
        // windows ho with ho*sh - ph <= h <= ho*sh - ph + kh - 1
        const long long hlo = h + ph - kh + 1, hhi = h + ph;           // hlo <= ho*sh <= hhi
        const long long wlo = w + pw - kw + 1, whi = w + pw;
        const long long ho0 = hlo <= 0 ? 0 : (hlo + sh - 1) / sh;
        const long long wo0 = wlo <= 0 ? 0 : (wlo + sw - 1) / sw;
        const long long ho1 = hhi / sh < Ho - 1 ? hhi / sh : Ho - 1;
        const long long wo1 = whi / sw < Wo - 1 ? whi / sw : Wo - 1;
        T acc = (T)0;
        for (long long ho = ho0; ho <= ho1; ++ho) {
            const long long a = h - (ho * sh - ph);
            for (long long wo = wo0; wo <= wo1; ++wo) {
                const long long b = w - (wo * sw - pw);
                const long long o = (nc * Ho + ho) * Wo + wo;
                if (arg[o] == (int)(a * kw + b)) acc += dy[o];
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
#define PG_PASS P2_PASS, kh, kw, sh, sw, ph, pw

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

// direct.cu -- the convolution's forward WITHOUT a column buffer: y = act(conv2d(x, w) + b).
//
// NumPy reference: unet_np/nn/conv_reference.py -- conv2d_forward_reference (the im2col algebra the
// result must match: y[n, o, ho, wo] = b[o] + sum_{c,i,j} w[o, c, i, j] x[n, c, ho*sh - pt + i*dh,
// wo*sw - pl + j*dw], 0 outside x). Python side: kernels/cupy_conv.py (Convolutions._direct_conv,
// used when CudaKernels.direct allows; off by default).
//
// Two kernels, the plain one first:
//   conv_direct_naive    one thread per output element, the C*kh*kw sum in a loop: the formula.
//   conv_implicit_gemm   the same product as im2col + GEMM, Y (O, N*Ho*Wo) = W (O, K) @ cols (K, N*Ho*Wo),
//                        K = C*kh*kw, but the columns are never written to global memory: each block
//                        gathers the BK x BN tile of cols it needs straight from x into shared memory
//                        (the "implicit" im2col), beside the BM x BK tile of W, and each of its
//                        (BM/TM) x (BN/TN) threads accumulates TM x TN outputs in registers (register
//                        blocking: every value read from shared memory feeds TM or TN FMAs). The
//                        epilogue adds the bias, applies the ReLU (relu != 0) and stores NCHW directly.
//
// implicit GEMM, block tile BM = 64 output channels x BN = 64 output pixels (p = (n, ho, wo) flat),
// K-step BK = 8, 256 threads, thread t = ty * RX + tx owning y[o = m0 + ty + i*RY, p = p0 + tx + j*RX]
// (i, j < 4; RY = RX = 16). Per K-step:
//   As[kk][m] = w[m0 + m, k0 + kk]                    (2 loads per thread; 0 past O or K)
//   Bs[kk][q] = x[n, c, ho*sh - pt + i*dh, wo*sw - pl + j*dw]   for k0 + kk = (c, i, j), p0 + q = (n, ho, wo)
// A thread's B column q is the same at every K-step (t % BN), so its (n, ho, wo) is found once per
// tile; its rows k advance by BK each step, and (c, i, j) follow with additions and carries only
// (BK = dc*kh*kw + di*kw + dj, precomputed by the host): no division in the K loop.
// Indices are 32-bit: the host uses these kernels only when x, w and y have fewer than 2^31 elements.
//
// Both dtypes: a template body and two extern "C" entry points, <name>_f32 and <name>_f64.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------------
// conv_direct_naive: one thread per y[n, o, ho, wo] (grid-stride), the sum over (c, i, j) in T.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void conv_direct_naive(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                  long long has_bias, long long relu, T* __restrict__ y, int N, int C, int H,
                                  int W, int O, int kh, int kw, int Ho, int Wo, int sh, int sw, int pt, int pl,
                                  int dh, int dw) {
    const long long total = (long long)N * O * Ho * Wo;
    GRID_STRIDE(e, total) {
        const int idx = (int)e;
        const int wo = idx % Wo, ho = (idx / Wo) % Ho, o = (idx / (Wo * Ho)) % O, n = idx / (Wo * Ho * O);
        T acc = (T)0;
        for (int c = 0; c < C; ++c) {
            const T* xc = x + ((long long)n * C + c) * H * W;
            const T* wc = w + ((long long)o * C + c) * kh * kw;
            for (int i = 0; i < kh; ++i) {
                const int h = ho * sh - pt + i * dh;
                if (h < 0 || h >= H) continue;
                for (int j = 0; j < kw; ++j) {
                    const int v = wo * sw - pl + j * dw;
                    if (v >= 0 && v < W) acc += wc[i * kw + j] * xc[h * W + v];
                }
            }
        }
        if (has_bias) acc += bias[o];
        if (relu && acc < (T)0) acc = (T)0;
        y[e] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// conv_implicit_gemm: grid (ceil(N*Ho*Wo / BN), ceil(O / BM)), block IG_THREADS = 256.
// dc, di, dj: BK = dc*kh*kw + di*kw + dj (0 <= di < kh, 0 <= dj < kw), for the incremental (c, i, j).
// ---------------------------------------------------------------------------------------------------
#define IG_BM 64
#define IG_BN 64
#define IG_BK 8
#define IG_TM 4
#define IG_TN 4
#define IG_RY (IG_BM / IG_TM)
#define IG_RX (IG_BN / IG_TN)
#define IG_THREADS (IG_RY * IG_RX)
#define IG_LA (IG_BM * IG_BK / IG_THREADS)      // A elements each thread loads per K-step
#define IG_LB (IG_BN * IG_BK / IG_THREADS)      // B elements each thread loads per K-step

template <typename T>
__device__ void conv_implicit_gemm(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                                   long long has_bias, long long relu, T* __restrict__ y, int N, int C, int H,
                                   int W, int O, int kh, int kw, int Ho, int Wo, int sh, int sw, int pt, int pl,
                                   int dh, int dw, int dc, int di, int dj) {
    __shared__ T As[IG_BK][IG_BM];
    __shared__ T Bs[IG_BK][IG_BN];
    const int t = threadIdx.x;
    const int ty = t / IG_RX, tx = t % IG_RX;
    const int KK = kh * kw, K = C * KK, HoWo = Ho * Wo, NP = N * HoWo;
    const int m0 = blockIdx.y * IG_BM, p0 = blockIdx.x * IG_BN;

    // This thread's B column (fixed for the whole tile): pixel p = p0 + q -> (n, ho, wo), once.
    const int q = t % IG_BN;
    const int p = p0 + q;
    const bool p_in = p < NP;
    const int pn = p_in ? p / HoWo : 0, pr = p_in ? p - pn * HoWo : 0;
    const int h_base = (pr / Wo) * sh - pt, w_base = (pr % Wo) * sw - pl;
    const T* xn = x + (long long)pn * C * H * W;
    // Its B rows: r = t / BN + s * (THREADS / BN), s < LB; their (c, i, j) for k = r (first step).
    int kc[IG_LB], ki[IG_LB], kj[IG_LB];
    for (int s = 0; s < IG_LB; ++s) {
        const int r = t / IG_BN + s * (IG_THREADS / IG_BN);
        kc[s] = r / KK;
        ki[s] = (r % KK) / kw;
        kj[s] = r % kw;
    }

    T acc[IG_TM][IG_TN];
    for (int i = 0; i < IG_TM; ++i)
        for (int j = 0; j < IG_TN; ++j) acc[i][j] = (T)0;

    for (int k0 = 0; k0 < K; k0 += IG_BK) {
        for (int s = 0; s < IG_LA; ++s) {                  // As[kk][m] = w[m0 + m, k0 + kk]
            const int e = t + s * IG_THREADS;
            const int m = e / IG_BK, kk = e % IG_BK;
            As[kk][m] = (m0 + m < O && k0 + kk < K) ? w[(long long)(m0 + m) * K + k0 + kk] : (T)0;
        }
        for (int s = 0; s < IG_LB; ++s) {                  // Bs[r][q] = cols[k0 + r, p]: gathered from x
            const int r = t / IG_BN + s * (IG_THREADS / IG_BN);
            const int h = h_base + ki[s] * dh, v = w_base + kj[s] * dw;
            T val = (T)0;
            if (p_in && kc[s] < C && h >= 0 && h < H && v >= 0 && v < W)
                val = xn[((long long)kc[s] * H + h) * W + v];
            Bs[r][q] = val;
            // next K-step: k += BK, (c, i, j) with carries
            kj[s] += dj;
            if (kj[s] >= kw) { kj[s] -= kw; ++ki[s]; }
            ki[s] += di;
            if (ki[s] >= kh) { ki[s] -= kh; ++kc[s]; }
            kc[s] += dc;
        }
        __syncthreads();
        for (int kk = 0; kk < IG_BK; ++kk) {
            T a[IG_TM], b[IG_TN];
            for (int i = 0; i < IG_TM; ++i) a[i] = As[kk][ty + i * IG_RY];
            for (int j = 0; j < IG_TN; ++j) b[j] = Bs[kk][tx + j * IG_RX];
            for (int i = 0; i < IG_TM; ++i)
                for (int j = 0; j < IG_TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();                                   // before the next step overwrites the tiles
    }
    for (int j = 0; j < IG_TN; ++j) {                       // epilogue: bias, ReLU, NCHW store
        const int pj = p0 + tx + j * IG_RX;
        if (pj >= NP) continue;
        const int n = pj / HoWo, pix = pj - n * HoWo;
        for (int i = 0; i < IG_TM; ++i) {
            const int o = m0 + ty + i * IG_RY;
            if (o >= O) continue;
            T v = acc[i][j];
            if (has_bias) v += bias[o];
            if (relu && v < (T)0) v = (T)0;
            y[((long long)n * O + o) * HoWo + pix] = v;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define DIRECT_ARGS(T) const T* x, const T* w, const T* bias, long long has_bias, long long relu, T* y, int N, \
    int C, int H, int W, int O, int kh, int kw, int Ho, int Wo, int sh, int sw, int pt, int pl, int dh, int dw
#define DIRECT_NAMES x, w, bias, has_bias, relu, y, N, C, H, W, O, kh, kw, Ho, Wo, sh, sw, pt, pl, dh, dw

extern "C" __global__ void conv_direct_naive_f32(DIRECT_ARGS(float)) { conv_direct_naive<float>(DIRECT_NAMES); }
extern "C" __global__ void conv_direct_naive_f64(DIRECT_ARGS(double)) { conv_direct_naive<double>(DIRECT_NAMES); }
// (IG_THREADS = 256 threads per block: the launch must use exactly that.)
extern "C" __global__ void conv_implicit_gemm_f32(DIRECT_ARGS(float), int dc, int di, int dj) {
    conv_implicit_gemm<float>(DIRECT_NAMES, dc, di, dj);
}
extern "C" __global__ void conv_implicit_gemm_f64(DIRECT_ARGS(double), int dc, int di, int dj) {
    conv_implicit_gemm<double>(DIRECT_NAMES, dc, di, dj);
}

// conv.cu -- the memory passes around the convolutions' GEMMs (the GEMMs themselves are cuBLAS).
//
// NumPy reference: unet_np/nn/conv_reference.py -- im2col, col2im, channels_first, batch_first
// (conv2d_forward / conv2d_backward / conv_transpose2d_forward / conv_transpose2d_backward).
// Python side: kernels/cupy_conv.py (Convolutions.conv2d_forward, ...), mixed into
// unet_np/backends/cupy_backend.py's CudaKernels.
//
// Layouts (all row-major, contiguous):
//   x     (N, C, H, W)                      the image, NCHW
//   cols  (C*kh*kw, N*Ho*Wo)                row (c, i, j), column (n, ho, wo): cols[(c,i,j), (n,ho,wo)] =
//                                           x[n, c, ho*sh - ph + i*dh, wo*sw - pw + j*dw] (0 in the padding)
// The forward of a convolution is  W (O, C*kh*kw) @ cols  -> (O, N*Ho*Wo), put back into NCHW (and the
// bias and an optional ReLU added) by swap01_bias_act. col2im is im2col's adjoint: every image pixel
// GATHERS the column entries that were copied from it (no atomics, so the result is deterministic).
//
// Every kernel is a grid-stride loop over its outputs: any launch size is correct, the Python side
// picks one for speed (kernels/cupy_conv.py).
// Both dtypes: a template body and two extern "C" entry points, <name>_f32 and <name>_f64.
//
// Index arithmetic: the bodies are templates over the index type I as well. Every element takes a few
// divisions and remainders (flat index -> (n, c, h, w)), and a 64-bit integer division is a long
// software routine on a GPU, a 32-bit one a few instructions: on an H100, im2col of a 64-channel
// 256x256 batch of 16 took longer than the GEMM that reads its output. So an entry point runs the
// body with I = int when every index it forms is below INDEX32_LIMIT (2^31 - 1), else with
// I = long long. (The tests build this file a second time with -DINDEX32_LIMIT=0 and compare.)
#ifndef INDEX32_LIMIT
#define INDEX32_LIMIT 2147483647LL
#endif

// The loop counter stays 64-bit (additions are cheap); the body converts it to I once.
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------------
// im2col: x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo), or with transposed != 0 its transpose colsT
// (N*Ho*Wo, C*kh*kw), both contiguous (colsT is the weight gradient's operand: dW = dY @ colsT reads
// it in cuBLAS's fast order, where dY @ cols^T read cols across its rows).
// One thread per (channel c, column (n, ho, wo)): the index divisions once per thread, then the kh*kw
// entries of the window with additions only. Threads next to each other take neighbouring columns:
// cols' writes are coalesced, colsT's strided by C*kh*kw.
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, long long transposed,
                       I N, I C, I H, I W, I kh, I kw, I Ho, I Wo, I sh, I sw, I ph, I pw, I dh, I dw) {
    const I M = N * Ho * Wo;                          // columns
    const I K = C * kh * kw;                          // rows
    const long long total = (long long)C * M;
    GRID_STRIDE(k, total) {
        const I idx = (I)k;
        const I c = idx / M, col = idx - c * M;
        const I wo = col % Wo, t = col / Wo;
        const I ho = t % Ho, n = t / Ho;
        const T* xc = x + (n * C + c) * H * W;
        const I h0 = ho * sh - ph, w0 = wo * sw - pw;
        // entry (row, col) of cols is at row * M + col, of colsT at col * K + row
        const I step = transposed ? (I)1 : M;
        I dst = transposed ? col * K + c * kh * kw : c * kh * kw * M + col;
        for (I i = 0, h = h0; i < kh; ++i, h += dh) {
            const bool row_in = h >= 0 && h < H;
            for (I j = 0, w = w0; j < kw; ++j, w += dw, dst += step)
                cols[dst] = (row_in && w >= 0 && w < W) ? xc[h * W + w] : (T)0;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// col2im: cols (C*kh*kw, N*Ho*Wo) -> x (N, C, H, W), the adjoint of im2col, plus an optional bias (C,).
// One thread per image pixel (n, c, h, w): it sums every column entry (c, i, j, n, ho, wo) with
// ho*sh - ph + i*dh == h and wo*sw - pw + j*dw == w. Pixels no window reaches get 0 (or the bias).
// With stride 1 (every 3x3 'same' convolution) ho = h + ph - i*dh directly: no division in the loop.
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void col2im(const T* __restrict__ cols, T* __restrict__ x, const T* __restrict__ bias,
                       long long has_bias,
                       I N, I C, I H, I W, I kh, I kw, I Ho, I Wo, I sh, I sw, I ph, I pw, I dh, I dw) {
    const I M = N * Ho * Wo;
    const long long total = (long long)N * C * H * W;
    const bool unit_stride = sh == 1 && sw == 1;
    GRID_STRIDE(k, total) {
        const I idx = (I)k;
        const I w = idx % W, t = idx / W;
        const I h = t % H, t2 = t / H;
        const I c = t2 % C, n = t2 / C;
        const T* cc = cols + c * kh * kw * M + n * Ho * Wo;     // row (c, 0, 0), column (n, 0, 0)
        T acc = has_bias ? bias[c] : (T)0;
        for (I i = 0; i < kh; ++i) {
            const I hh = h + ph - i * dh;             // = ho * sh for the window that reads h
            I ho;
            if (unit_stride) ho = hh;
            else { if (hh < 0 || hh % sh != 0) continue; ho = hh / sh; }
            if (ho < 0 || ho >= Ho) continue;
            for (I j = 0; j < kw; ++j) {
                const I ww = w + pw - j * dw;
                I wo;
                if (unit_stride) wo = ww;
                else { if (ww < 0 || ww % sw != 0) continue; wo = ww / sw; }
                if (wo < 0 || wo >= Wo) continue;
                acc += cc[(i * kw + j) * M + ho * Wo + wo];
            }
        }
        x[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// swap01_bias_act: src (A, B, L) -> dst (B, A, L), dst[b, a, l] = act(src[a, b, l] + bias[a]).
// The GEMM's output pass: (O, N, Ho*Wo) -> NCHW with the bias (indexed by the SOURCE's first axis,
// the output channel) and, when relu != 0, a ReLU fused in. With has_bias = relu = 0 it is the plain
// layout change NCHW (N, C, L) -> (C, N, L) (_channels_first) or back (_batch_first).
// One thread per destination entry (writes coalesced; reads coalesced along l).
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void swap01_bias_act(const T* __restrict__ src, T* __restrict__ dst,
                                const T* __restrict__ bias, long long has_bias, long long relu,
                                I A, I B, I L) {
    const long long total = (long long)A * B * L;
    GRID_STRIDE(k, total) {
        const I idx = (I)k;
        const I l = idx % L, a = (idx / L) % A, b = idx / (L * A);          // dst index (b, a, l)
        T v = src[(a * B + b) * L + l];
        if (has_bias) v += bias[a];
        if (relu && v < (T)0) v = (T)0;               // max(v, 0); a NaN stays NaN, as np.maximum
        dst[idx] = v;
    }
}

// ---------------------------------------------------------------------------------------------------
// bias_act_inplace: y (N, C, L) += bias[c], then ReLU when relu != 0. The 1x1 convolution's epilogue
// (its GEMM writes NCHW directly).
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void bias_act_inplace(T* __restrict__ y, const T* __restrict__ bias, long long has_bias,
                                 long long relu, I C, I L, long long total) {
    GRID_STRIDE(k, total) {
        const I idx = (I)k;
        T v = y[idx];
        if (has_bias) v += bias[(idx / L) % C];
        if (relu && v < (T)0) v = (T)0;
        y[idx] = v;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define IM2COL_ARGS long long N, long long C, long long H, long long W, long long kh, long long kw, \
    long long Ho, long long Wo, long long sh, long long sw, long long ph, long long pw, long long dh, long long dw
#define IM2COL_PASS N, C, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw

// The largest index each kernel forms: im2col and col2im index both x (N*C*H*W) and cols
// (C*kh*kw * N*Ho*Wo); swap01 and bias_act their arrays.
// The row and column offsets (ho*sh - ph + i*dh, ...) must fit as well.
#define IM2COL_FITS32 (C * kh * kw * N * Ho * Wo < INDEX32_LIMIT && N * C * H * W < INDEX32_LIMIT && \
                       Ho * sh + kh * dh + ph + H < INDEX32_LIMIT && Wo * sw + kw * dw + pw + W < INDEX32_LIMIT)

extern "C" __global__ void im2col_f32(const float* x, float* cols, long long transposed, IM2COL_ARGS) {
    if (IM2COL_FITS32) im2col<float, int>(x, cols, transposed, IM2COL_PASS);
    else im2col<float, long long>(x, cols, transposed, IM2COL_PASS);
}
extern "C" __global__ void im2col_f64(const double* x, double* cols, long long transposed, IM2COL_ARGS) {
    if (IM2COL_FITS32) im2col<double, int>(x, cols, transposed, IM2COL_PASS);
    else im2col<double, long long>(x, cols, transposed, IM2COL_PASS);
}
extern "C" __global__ void col2im_f32(const float* cols, float* x, const float* bias, long long has_bias,
                                      IM2COL_ARGS) {
    if (IM2COL_FITS32) col2im<float, int>(cols, x, bias, has_bias, IM2COL_PASS);
    else col2im<float, long long>(cols, x, bias, has_bias, IM2COL_PASS);
}
extern "C" __global__ void col2im_f64(const double* cols, double* x, const double* bias, long long has_bias,
                                      IM2COL_ARGS) {
    if (IM2COL_FITS32) col2im<double, int>(cols, x, bias, has_bias, IM2COL_PASS);
    else col2im<double, long long>(cols, x, bias, has_bias, IM2COL_PASS);
}
extern "C" __global__ void swap01_bias_act_f32(const float* src, float* dst, const float* bias,
                                               long long has_bias, long long relu,
                                               long long A, long long B, long long L) {
    if (A * B * L < INDEX32_LIMIT) swap01_bias_act<float, int>(src, dst, bias, has_bias, relu, A, B, L);
    else swap01_bias_act<float, long long>(src, dst, bias, has_bias, relu, A, B, L);
}
extern "C" __global__ void swap01_bias_act_f64(const double* src, double* dst, const double* bias,
                                               long long has_bias, long long relu,
                                               long long A, long long B, long long L) {
    if (A * B * L < INDEX32_LIMIT) swap01_bias_act<double, int>(src, dst, bias, has_bias, relu, A, B, L);
    else swap01_bias_act<double, long long>(src, dst, bias, has_bias, relu, A, B, L);
}
extern "C" __global__ void bias_act_inplace_f32(float* y, const float* bias, long long has_bias, long long relu,
                                                long long C, long long L, long long total) {
    if (total < INDEX32_LIMIT) bias_act_inplace<float, int>(y, bias, has_bias, relu, C, L, total);
    else bias_act_inplace<float, long long>(y, bias, has_bias, relu, C, L, total);
}
extern "C" __global__ void bias_act_inplace_f64(double* y, const double* bias, long long has_bias, long long relu,
                                                long long C, long long L, long long total) {
    if (total < INDEX32_LIMIT) bias_act_inplace<double, int>(y, bias, has_bias, relu, C, L, total);
    else bias_act_inplace<double, long long>(y, bias, has_bias, relu, C, L, total);
}

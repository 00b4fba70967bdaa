// winograd.cu -- the transforms of the Winograd F(4x4, 3x3) convolution (3x3 kernel, stride 1).
//
// NumPy reference: unet_np/nn/conv_reference.py -- conv2d_forward_reference / conv2d_backward_reference
// (the im2col algebra the result must match); the transforms themselves are those of the numba CPU
// backend, kernels/cpu_winograd.py (_bt, _at, _a, _g, _gt: the same names and formulas here) and
// unet_np/nn/conv_fast.py (wino_weights, wino_weight_grad: the plain NumPy filter transforms).
// Python side: unet_np/backends/cupy_backend.py (CudaKernels._winograd_*).
//
// F(4x4, 3x3) computes a 4x4 block of outputs from a 6x6 input tile d with 36 multiplications:
//     Y = A^T [(G g G^T) * (B^T d B)] A            (* element-wise; Y 4x4, g 3x3, the rest 6x6)
// Summed over the input channels, each of the 36 tile positions p = 6k + l becomes one GEMM, and the
// 36 run as ONE batched GEMM on stacked arrays (cupy.matmul -> cuBLAS strided-batched):
//     U (36, O, C) = G g G^T            wino_filter            (flip=1: the input gradient's filter)
//     V (36, C, P) = B^T d B            wino_input             P = N * TH * TW tiles
//     M (36, O, P) = U @ V              one batched GEMM
//     y (N, O, Ho, Wo) = A^T M A        wino_output            (+ bias, then ReLU when relu != 0)
// The weight gradient is the adjoint in g of the same product:
//     Z (36, O, P) = A dY A^T           wino_output_grad       (dY: the tile's 4x4 block of dy)
//     db (O,) = sum_t Z[7, :, t]        (row 1 of A is all ones: Z[7] sums the block)
//     dU (36, O, C) = Z @ V^T           one batched GEMM
//     dw (O, C, 3, 3) = G^T dU G        wino_filter_grad
// and the input gradient is the forward of dy with the kernel flipped in space and transposed,
// (C, O, 3, 3), with leading padding 2 - p (a correlation that gathers, no col2im).
// A ReLU fused into the forward (wino_output's relu) has its backward fused here too: wino_input and
// wino_output_grad take the forward's y as a mask and read dy * 1[y > 0], so the backward never
// writes the masked dy (the activation is written once, in the forward).
//
// Tiles: tile t = (n * TH + th) * TW + tw covers output rows 4 th .. 4 th + 3 and columns
// 4 tw .. 4 tw + 3 (TH = ceil(Ho / 4), TW = ceil(Wo / 4); outputs past Ho, Wo are not stored) and
// reads input rows 4 th - pt .. 4 th - pt + 5, columns 4 tw - pl .. + 5 (zero outside the image).
//
// Why F(4x4, 3x3) and not F(2x2, 3x3): 4x fewer multiplications than direct (F(2x2): 2.25x), and the
// transformed input is 2.25x the input (F(2x2): 4x), so less memory traffic too. Its transforms
// multiply by up to 8 (A) and 5 (B), so a float32 result lies about 10x further from the exact one
// than a direct convolution's; every transform is computed in double and rounded once when stored,
// which keeps it there (measured in tests/backends/test_cupy.py: see test_winograd_error).
//
// Every kernel is a grid-stride loop over independent items (a tile or a filter): no shared memory,
// no barriers; the reads and writes of neighbouring threads are neighbouring along t (or c).
// Both dtypes: a template body and two extern "C" entry points, <name>_f32 and <name>_f64.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// -- the 1-D transforms, in double (as kernels/cpu_winograd.py) -------------------------------------
// B^T d for a 6-vector d.
__device__ __forceinline__ void bt6(const double* d, double* o) {
    o[0] = 4.0 * d[0] - 5.0 * d[2] + d[4];
    o[1] = -4.0 * (d[1] + d[2]) + d[3] + d[4];
    o[2] = 4.0 * (d[1] - d[2]) - d[3] + d[4];
    o[3] = 2.0 * (d[3] - d[1]) - d[2] + d[4];
    o[4] = 2.0 * (d[1] - d[3]) - d[2] + d[4];
    o[5] = 4.0 * d[1] - 5.0 * d[3] + d[5];
}

// A^T m for a 6-vector m: 4 values.
__device__ __forceinline__ void at6(const double* m, double* o) {
    const double s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
    o[0] = m[0] + s12 + s34;
    o[1] = d12 + 2.0 * d34;
    o[2] = s12 + 4.0 * s34;
    o[3] = d12 + 8.0 * d34 + m[5];
}

// A g for a 4-vector g (the adjoint of at6): 6 values.
__device__ __forceinline__ void a4(const double* g, double* o) {
    const double s02 = g[0] + g[2], s13 = g[1] + g[3];
    const double e02 = g[0] + 4.0 * g[2], e13 = 2.0 * g[1] + 8.0 * g[3];
    o[0] = g[0];
    o[1] = s02 + s13;
    o[2] = s02 - s13;
    o[3] = e02 + e13;
    o[4] = e02 - e13;
    o[5] = g[3];
}

#define R6 (1.0 / 6.0)
#define R12 (1.0 / 12.0)
#define R24 (1.0 / 24.0)

// G g for a 3-vector g: 6 values.
__device__ __forceinline__ void g3(const double* g, double* o) {
    o[0] = 0.25 * g[0];
    o[1] = -R6 * (g[0] + g[1] + g[2]);
    o[2] = -R6 * (g[0] - g[1] + g[2]);
    o[3] = R24 * g[0] + R12 * g[1] + R6 * g[2];
    o[4] = R24 * g[0] - R12 * g[1] + R6 * g[2];
    o[5] = g[2];
}

// G^T d for a 6-vector d (the adjoint of g3): 3 values.
__device__ __forceinline__ void gt6(const double* d, double* o) {
    o[0] = 0.25 * d[0] - R6 * (d[1] + d[2]) + R24 * (d[3] + d[4]);
    o[1] = R6 * (d[2] - d[1]) + R12 * (d[3] - d[4]);
    o[2] = R6 * (d[3] + d[4] - d[1] - d[2]) + d[5];
}

// ---------------------------------------------------------------------------------------------------
// wino_filter: w (O, C, 3, 3) -> U = G w[o, c] G^T, stored U[6k + l, o, c] (36, O, C); with flip != 0
// the input gradient's filter, from w[o, c] flipped in space, stored transposed: U[6k + l, c, o]
// (36, C, O). One thread per stored (o, c) pair.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void wino_filter(const T* __restrict__ w, T* __restrict__ U, long long O, long long C,
                            long long flip) {
    const long long OC = O * C;
    GRID_STRIDE(e, OC) {
        long long o, c;
        if (flip) { c = e / O; o = e % O; } else { o = e / C; c = e % C; }
        const T* g = w + (o * C + c) * 9;
        double col[3], gc[3][6], row[3], u[6];
        for (int j = 0; j < 3; ++j) {                  // G g: the 3 columns
            for (int i = 0; i < 3; ++i)
                col[i] = flip ? (double)g[(2 - i) * 3 + (2 - j)] : (double)g[i * 3 + j];
            g3(col, gc[j]);
        }
        for (int k = 0; k < 6; ++k) {                  // (G g) G^T: the 6 rows
            for (int j = 0; j < 3; ++j) row[j] = gc[j][k];
            g3(row, u);
            for (int l = 0; l < 6; ++l) U[(6 * k + l) * OC + e] = (T)u[l];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// wino_filter_grad: dU (36, O, C) -> dw (O, C, 3, 3) = G^T dU[:, o, c] G (wino_filter's adjoint).
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void wino_filter_grad(const T* __restrict__ dU, T* __restrict__ dw, long long O, long long C) {
    const long long OC = O * C;
    GRID_STRIDE(e, OC) {
        double col[6], gc[6][3], row[6], r[3];
        for (int l = 0; l < 6; ++l) {                  // G^T D: the 6 columns
            for (int k = 0; k < 6; ++k) col[k] = (double)dU[(6 * k + l) * OC + e];
            gt6(col, gc[l]);
        }
        for (int i = 0; i < 3; ++i) {                  // (G^T D) G: the 3 rows
            for (int l = 0; l < 6; ++l) row[l] = gc[l][i];
            gt6(row, r);
            for (int j = 0; j < 3; ++j) dw[e * 9 + i * 3 + j] = (T)r[j];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// wino_input: x (N, C, H, W) -> V (36, C, P), V[6k + l, c, t] = (B^T d B)[k, l] for the 6x6 tile d of
// channel c read at rows 4 th - pt + a, columns 4 tw - pl + b (0 outside x). One thread per (c, t).
// has_mask: x is the dy of a convolution whose ReLU was fused (mask: its output y, x's shape), and d
// reads x where mask > 0, x * 0 elsewhere (the ReLU's backward, relu_bwd's formula), so the masked
// dy is never written.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void wino_input(const T* __restrict__ x, const T* __restrict__ mask, long long has_mask,
                           T* __restrict__ V, long long N, long long C,
                           long long H, long long W, long long TH, long long TW, long long pt, long long pl) {
    const long long P = N * TH * TW, CP = C * P;
    GRID_STRIDE(e, CP) {
        const long long c = e / P, t = e % P;
        const long long n = t / (TH * TW), th = (t / TW) % TH, tw = t % TW;
        const long long h0 = 4 * th - pt, w0 = 4 * tw - pl;
        const T* xc = x + (n * C + c) * H * W;
        const T* mc = mask + (n * C + c) * H * W;
        double d[6][6], col[6], bc[6][6], v[6];
        for (int a = 0; a < 6; ++a) {
            const long long h = h0 + a;
            for (int b = 0; b < 6; ++b) {
                const long long ww = w0 + b;
                if (h >= 0 && h < H && ww >= 0 && ww < W) {
                    const T xv = xc[h * W + ww];
                    d[a][b] = (double)((!has_mask || mc[h * W + ww] > (T)0) ? xv : xv * (T)0);
                } else {
                    d[a][b] = 0.0;
                }
            }
        }
        for (int b = 0; b < 6; ++b) {                  // B^T d: the 6 columns
            for (int a = 0; a < 6; ++a) col[a] = d[a][b];
            bt6(col, bc[b]);
        }
        for (int k = 0; k < 6; ++k) {                  // (B^T d) B: the 6 rows
            for (int b = 0; b < 6; ++b) col[b] = bc[b][k];
            bt6(col, v);
            for (int l = 0; l < 6; ++l) V[(6 * k + l) * CP + e] = (T)v[l];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// wino_output: M (36, O, P) -> y (N, O, Ho, Wo), the 4x4 block A^T M[:, o, t] A of tile t, plus
// bias[o] (has_bias), then max(., 0) (relu): the convolution's bias and a following ReLU fused into
// the one pass that writes y. One thread per (o, t).
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void wino_output(const T* __restrict__ M, T* __restrict__ y, const T* __restrict__ bias,
                            long long has_bias, long long relu, long long N, long long O, long long Ho,
                            long long Wo, long long TH, long long TW) {
    const long long P = N * TH * TW, OP = O * P;
    GRID_STRIDE(e, OP) {
        const long long o = e / P, t = e % P;
        const long long n = t / (TH * TW), th = (t / TW) % TH, tw = t % TW;
        double col[6], ac[6][4], row[6], r[4];
        for (int l = 0; l < 6; ++l) {                  // A^T m: the 6 columns
            for (int k = 0; k < 6; ++k) col[k] = (double)M[(6 * k + l) * OP + e];
            at6(col, ac[l]);
        }
        const double b = has_bias ? (double)bias[o] : 0.0;
        T* yo = y + (n * O + o) * Ho * Wo;
        for (int i = 0; i < 4; ++i) {                  // (A^T m) A: the 4 rows
            const long long h = 4 * th + i;
            if (h >= Ho) break;
            for (int l = 0; l < 6; ++l) row[l] = ac[l][i];
            at6(row, r);
            for (int j = 0; j < 4; ++j) {
                const long long w = 4 * tw + j;
                if (w >= Wo) break;
                T v = (T)(r[j] + b);
                if (relu && v < (T)0) v = (T)0;        // max(v, 0); a NaN stays NaN, as np.maximum
                yo[h * Wo + w] = v;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// wino_output_grad: dy (N, O, Ho, Wo) -> Z (36, O, P), Z[6k + l, o, t] = (A dY A^T)[k, l] for the
// 4x4 block dY of tile t (0 past Ho, Wo): wino_output's adjoint, for the weight gradient. has_mask:
// dY reads dy where mask (the fused ReLU's output y) > 0, dy * 0 elsewhere. Row 1 of A is all ones,
// so Z[7, o, t] is the sum of the block: the bias gradient is the sum of Z[7] over t.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void wino_output_grad(const T* __restrict__ dy, const T* __restrict__ mask, long long has_mask,
                                 T* __restrict__ Z, long long N, long long O,
                                 long long Ho, long long Wo, long long TH, long long TW) {
    const long long P = N * TH * TW, OP = O * P;
    GRID_STRIDE(e, OP) {
        const long long o = e / P, t = e % P;
        const long long n = t / (TH * TW), th = (t / TW) % TH, tw = t % TW;
        const T* dyo = dy + (n * O + o) * Ho * Wo;
        const T* mo = mask + (n * O + o) * Ho * Wo;
        double g[4][4], col[4], ac[4][6], z[6];
        for (int i = 0; i < 4; ++i) {
            const long long h = 4 * th + i;
            for (int j = 0; j < 4; ++j) {
                const long long w = 4 * tw + j;
                if (h < Ho && w < Wo) {
                    const T v = dyo[h * Wo + w];
                    g[i][j] = (double)((!has_mask || mo[h * Wo + w] > (T)0) ? v : v * (T)0);
                } else {
                    g[i][j] = 0.0;
                }
            }
        }
        for (int j = 0; j < 4; ++j) {                  // A dY: the 4 columns
            for (int i = 0; i < 4; ++i) col[i] = g[i][j];
            a4(col, ac[j]);
        }
        for (int k = 0; k < 6; ++k) {                  // (A dY) A^T: the 6 rows
            for (int j = 0; j < 4; ++j) col[j] = ac[j][k];
            a4(col, z);
            for (int l = 0; l < 6; ++l) Z[(6 * k + l) * OP + e] = (T)z[l];
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
extern "C" __global__ void wino_filter_f32(const float* w, float* U, long long O, long long C, long long flip) {
    wino_filter<float>(w, U, O, C, flip);
}
extern "C" __global__ void wino_filter_f64(const double* w, double* U, long long O, long long C, long long flip) {
    wino_filter<double>(w, U, O, C, flip);
}
extern "C" __global__ void wino_filter_grad_f32(const float* dU, float* dw, long long O, long long C) {
    wino_filter_grad<float>(dU, dw, O, C);
}
extern "C" __global__ void wino_filter_grad_f64(const double* dU, double* dw, long long O, long long C) {
    wino_filter_grad<double>(dU, dw, O, C);
}
extern "C" __global__ void wino_input_f32(const float* x, const float* mask, long long has_mask, float* V, long long N,
                                          long long C, long long H, long long W, long long TH, long long TW, long long pt,
                                          long long pl) {
    wino_input<float>(x, mask, has_mask, V, N, C, H, W, TH, TW, pt, pl);
}
extern "C" __global__ void wino_input_f64(const double* x, const double* mask, long long has_mask, double* V, long long N,
                                          long long C, long long H, long long W, long long TH, long long TW, long long pt,
                                          long long pl) {
    wino_input<double>(x, mask, has_mask, V, N, C, H, W, TH, TW, pt, pl);
}
extern "C" __global__ void wino_output_f32(const float* M, float* y, const float* bias, long long has_bias, long long relu,
                                           long long N, long long O, long long Ho, long long Wo, long long TH, long long TW) {
    wino_output<float>(M, y, bias, has_bias, relu, N, O, Ho, Wo, TH, TW);
}
extern "C" __global__ void wino_output_f64(const double* M, double* y, const double* bias, long long has_bias, long long relu,
                                           long long N, long long O, long long Ho, long long Wo, long long TH, long long TW) {
    wino_output<double>(M, y, bias, has_bias, relu, N, O, Ho, Wo, TH, TW);
}
extern "C" __global__ void wino_output_grad_f32(const float* dy, const float* mask, long long has_mask, float* Z, long long N,
                                                long long O, long long Ho, long long Wo, long long TH, long long TW) {
    wino_output_grad<float>(dy, mask, has_mask, Z, N, O, Ho, Wo, TH, TW);
}
extern "C" __global__ void wino_output_grad_f64(const double* dy, const double* mask, long long has_mask, double* Z, long long N,
                                                long long O, long long Ho, long long Wo, long long TH, long long TW) {
    wino_output_grad<double>(dy, mask, has_mask, Z, N, O, Ho, Wo, TH, TW);
}

// vol.cu -- the 3-D primitives of the cupy backend on volumes (N, C, D, H, W): the memory passes around
// the GEMMs of conv3d / conv_transpose3d (vol2col, col2vol, the layout passes), reflect padding and the
// windows of constant padding and centre-cropping. (3-D max-pooling is in pool.cu and trilinear / nearest
// upsampling in upsample.cu, one body with the 2-D kernels there.)
//
// NumPy reference: unet_np/nn/conv3d_reference.py (vol2col, col2vol, channels_first_nd, batch_first_nd
// in conv3d_forward_reference / conv3d_backward_reference / conv_transpose3d_*_reference) and
// unet_np/nn/concat.py (pad3d_forward, pad3d_backward, center_crop_forward, center_crop_backward).
// The CPU (Numba) twins, same names and loop structure: kernels/cpu_conv3d.py (vol2col_band,
// col2vol_band). 2-D twins: conv.cu, elementwise.cu.
// Python side: kernels/cupy_vol.py (Volumes, mixed into unet_np/backends/cupy_backend.py's CudaKernels).

// Layouts (all row-major, contiguous):
//   x     (N, C, D, H, W)                    a volume
//   cols  (C*kd*kh*kw, Nt*Dt*Ho*Wo)          a TILE of the column buffer: samples [0, Nt) of the array
//                                            passed in (the Python side passes x[n0:n1]) and output
//                                            depths [d0, d0 + Dt) (a band, as vol2col_band's d0..d1):
//         cols[(c,i,j,k), (n,r,oh,ow)] = x[n, c, (d0+r)*sd - pd + i*dd, oh*sh - ph + j*dh, ow*sw - pw + k*dw]
//                                            (0 in the padding). With Nt = N, d0 = 0, Dt = Do it is the
//                                            reference's whole vol2col(x).
// A conv3d forward is  W (O, C*kd*kh*kw) @ cols  -> (O, Nt*Dt*Ho*Wo), put back into (N, O, Do, Ho, Wo)
// (bias and an optional ReLU added) by tile_to_vol. col2vol is vol2col's adjoint: every voxel GATHERS
// the column entries that were copied from it (no atomics: deterministic).
//
// Every kernel is a grid-stride loop over its outputs; both dtypes: a template body and two
// extern "C" entry points, <name>_f32 and <name>_f64. The convolution passes are templates over the
// index type I as well (int when every index fits INDEX32_LIMIT, else long long; see conv.cu, whose
// rule this is: 64-bit divisions are slow on a GPU). The tests build this file with -DINDEX32_LIMIT=0 too.
#ifndef INDEX32_LIMIT
#define INDEX32_LIMIT 2147483647LL
#endif

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); \
         i += (long long)blockDim.x * gridDim.x)

// ---------------------------------------------------------------------------------------------------
// vol2col: x (Nt, C, D, H, W) -> cols (C*kd*kh*kw, Nt*Dt*Ho*Wo), or with transposed != 0 its transpose
// colsT (Nt*Dt*Ho*Wo, C*kd*kh*kw) (the weight gradient's operand, as conv.cu's im2col).
// One thread per (channel c, column (n, r, oh, ow)): the index divisions once, then the kd*kh*kw entries
// of the window with additions only. (Do is not needed: the band [d0, d0 + Dt) lies inside it.)
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void vol2col(const T* __restrict__ x, T* __restrict__ cols, long long transposed,
                        I Nt, I C, I D, I H, I W, I kd, I kh, I kw, I Do, I Ho, I Wo,
                        I sd, I sh, I sw, I pd, I ph, I pw, I dd, I dh, I dw, I d0, I Dt) {
    const I M = Nt * Dt * Ho * Wo;                    // columns of the tile
    const I kk = kd * kh * kw;
    const I K = C * kk;                               // rows
    const long long total = (long long)C * M;
    GRID_STRIDE(t, total) {
        const I idx = (I)t;
        const I c = idx / M, col = idx - c * M;
        const I ow = col % Wo, t1 = col / Wo;
        const I oh = t1 % Ho, t2 = t1 / Ho;
        const I r = t2 % Dt, n = t2 / Dt;
        const T* xc = x + (n * C + c) * D * H * W;
        const I z0 = (d0 + r) * sd - pd, h0 = oh * sh - ph, w0 = ow * sw - pw;
        // entry (row, col) of cols is at row * M + col, of colsT at col * K + row
        const I step = transposed ? (I)1 : M;
        I dst = transposed ? col * K + c * kk : c * kk * M + col;
        for (I i = 0, z = z0; i < kd; ++i, z += dd) {
            const bool z_in = z >= 0 && z < D;
            for (I j = 0, h = h0; j < kh; ++j, h += dh) {
                const bool zh_in = z_in && h >= 0 && h < H;
                for (I k = 0, w = w0; k < kw; ++k, w += dw, dst += step)
                    cols[dst] = (zh_in && w >= 0 && w < W) ? xc[(z * H + h) * W + w] : (T)0;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// col2vol: cols (C*kd*kh*kw, Nt*Dt*Ho*Wo) -> x (Nt, C, D, H, W), the adjoint of vol2col.
// One thread per voxel (n, c, z, h, w): it sums every entry (c, i, j, k, n, r, oh, ow) of the tile with
// (d0+r)*sd - pd + i*dd == z, oh*sh - ph + j*dh == h, ow*sw - pw + k*dw == w, in the order of the kernel
// offsets (as the reference adds them). accumulate == 0: the sum starts from the bias (has_bias) or 0,
// so voxels no window of the tile reaches are written too; accumulate != 0: it starts from x (the later
// depth bands of one sample add onto the first band's result, in a fixed order).
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void col2vol(const T* __restrict__ cols, T* __restrict__ x, const T* __restrict__ bias,
                        long long has_bias, long long accumulate,
                        I Nt, I C, I D, I H, I W, I kd, I kh, I kw, I Do, I Ho, I Wo,
                        I sd, I sh, I sw, I pd, I ph, I pw, I dd, I dh, I dw, I d0, I Dt) {
    const I M = Nt * Dt * Ho * Wo;
    const long long total = (long long)Nt * C * D * H * W;
    const bool unit_stride = sd == 1 && sh == 1 && sw == 1;
    GRID_STRIDE(t, total) {
        const I idx = (I)t;
        const I w = idx % W, t1 = idx / W;
        const I h = t1 % H, t2 = t1 / H;
        const I z = t2 % D, t3 = t2 / D;
        const I c = t3 % C, n = t3 / C;
        const T* cc = cols + c * kd * kh * kw * M + n * Dt * Ho * Wo;   // row (c, 0, 0, 0), column (n, 0, 0, 0)
        T acc = accumulate ? x[idx] : (has_bias ? bias[c] : (T)0);
        for (I i = 0; i < kd; ++i) {
            const I zz = z + pd - i * dd;             // = od * sd for the window that reads z
            I od;
            if (unit_stride) od = zz;
            else { if (zz < 0 || zz % sd != 0) continue; od = zz / sd; }
            const I r = od - d0;
            if (r < 0 || r >= Dt) continue;
            for (I j = 0; j < kh; ++j) {
                const I hh = h + ph - j * dh;
                I oh;
                if (unit_stride) oh = hh;
                else { if (hh < 0 || hh % sh != 0) continue; oh = hh / sh; }
                if (oh < 0 || oh >= Ho) continue;
                for (I k = 0; k < kw; ++k) {
                    const I ww = w + pw - k * dw;
                    I ow;
                    if (unit_stride) ow = ww;
                    else { if (ww < 0 || ww % sw != 0) continue; ow = ww / sw; }
                    if (ow < 0 || ow >= Wo) continue;
                    acc += cc[((i * kh + j) * kw + k) * M + (r * Ho + oh) * Wo + ow];
                }
            }
        }
        x[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// tile_to_vol: src (A, Nt, Dt, P) -> dst (Nt, A, Do, P) at depths d0 .. d0 + Dt - 1:
//   dst[n, a, d0 + r, p] = act(src[a, n, r, p] + bias[a])
// The GEMM's output pass of a tile (conv3d forward: A = O, P = Ho*Wo; batch_first_nd plus the bias and
// an optional ReLU), and the input gradient's of the transposed convolution. A whole tile (Dt = Do) is
// conv.cu's swap01_bias_act.
// vol_to_tile: the other way, without bias: dst (A, Nt, Dt, P) = src (Nt, A, Do, P)[:, :, d0:d0+Dt]
// transposed (channels_first_nd of one tile: dy for the weight gradient, x for the transposed conv).
// One thread per element, in the order of the strided side's rows (reads and writes coalesced along p).
// ---------------------------------------------------------------------------------------------------
template <typename T, typename I>
__device__ void tile_to_vol(const T* __restrict__ src, T* __restrict__ dst, const T* __restrict__ bias,
                            long long has_bias, long long relu, I A, I Nt, I Dt, I Do, I P, I d0) {
    const long long total = (long long)A * Nt * Dt * P;
    GRID_STRIDE(t, total) {
        const I idx = (I)t;                           // (n, a, r, p)
        const I p = idx % P, t1 = idx / P;
        const I r = t1 % Dt, t2 = t1 / Dt;
        const I a = t2 % A, n = t2 / A;
        T v = src[((a * Nt + n) * Dt + r) * P + p];
        if (has_bias) v += bias[a];
        if (relu && v < (T)0) v = (T)0;               // max(v, 0); a NaN stays NaN, as np.maximum
        dst[((n * A + a) * Do + d0 + r) * P + p] = v;
    }
}

template <typename T, typename I>
__device__ void vol_to_tile(const T* __restrict__ src, T* __restrict__ dst, I A, I Nt, I Dt, I Do, I P,
                            I d0) {
    const long long total = (long long)A * Nt * Dt * P;
    GRID_STRIDE(t, total) {
        const I idx = (I)t;                           // (a, n, r, p)
        const I p = idx % P, t1 = idx / P;
        const I r = t1 % Dt, t2 = t1 / Dt;
        const I n = t2 % Nt, a = t2 / Nt;
        dst[idx] = src[((n * A + a) * Do + d0 + r) * P + p];
    }
}

// ---------------------------------------------------------------------------------------------------
// Padding and windows.
// window3d_copy: dst (NC, Dd, Hd, Wd)[nc, z, h, w] = src (NC, Ds, Hs, Ws)[nc, z + oz, h + oh, w + ow]
// inside src, else fill: a constant pad (offsets -front, -top, -left, fill = value), its backward
// (offsets front, top, left), a centre crop (its offsets) and the crop's backward (minus them, fill 0).
// reflect3d_pad_fwd: y (NC, f+D+k, t+H+b, l+W+r) mirrors x about its edge voxels, every axis
// (x[-1] := x[1], as torch's F.pad(mode='reflect'); each pad smaller than its axis).
// reflect3d_pad_bwd GATHERS: one thread per input voxel sums dy over the (up to 3 per axis) padded
// positions that copied it: the middle one, its mirror in the 'before' pad and in the 'after' pad.
// ---------------------------------------------------------------------------------------------------
template <typename T>
__device__ void window3d_copy(const T* __restrict__ src, T* __restrict__ dst, long long NC, long long Ds,
                              long long Hs, long long Ws, long long Dd, long long Hd, long long Wd,
                              long long oz, long long oh, long long ow, T fill) {
    const long long total = NC * Dd * Hd * Wd;
    GRID_STRIDE(idx, total) {
        const long long w = idx % Wd, h = (idx / Wd) % Hd, z = (idx / (Wd * Hd)) % Dd, nc = idx / (Wd * Hd * Dd);
        const long long zs = z + oz, hs = h + oh, ws = w + ow;
        const bool inside = zs >= 0 && zs < Ds && hs >= 0 && hs < Hs && ws >= 0 && ws < Ws;
        dst[idx] = inside ? src[((nc * Ds + zs) * Hs + hs) * Ws + ws] : fill;
    }
}

// The input index a padded position p reads along an axis of n entries with `before` padding.
__device__ __forceinline__ long long reflect_index(long long p, long long before, long long n) {
    long long i = p - before;
    if (i < 0) i = -i;
    else if (i >= n) i = 2 * (n - 1) - i;
    return i;
}

// The padded positions that read input i (reflect_index(p) == i): *count of them into pos[0..2].
__device__ __forceinline__ void reflect_sources(long long i, long long before, long long after, long long n,
                                                long long* pos, int* count) {
    int c = 0;
    pos[c++] = before + i;                                  // the middle
    if (i >= 1 && i <= before) pos[c++] = before - i;       // the 'before' pad's mirror
    const long long m = n - 1 - i;                          // distance from the last entry
    if (m >= 1 && m <= after) pos[c++] = before + n - 1 + m;
    *count = c;
}

template <typename T>
__device__ void reflect3d_pad_fwd(const T* __restrict__ x, T* __restrict__ y, long long NC, long long D,
                                  long long H, long long W, long long f, long long k, long long t, long long b,
                                  long long l, long long r) {
    const long long Dp = f + D + k, Hp = t + H + b, Wp = l + W + r;
    const long long total = NC * Dp * Hp * Wp;
    GRID_STRIDE(idx, total) {
        const long long w = idx % Wp, h = (idx / Wp) % Hp, z = (idx / (Wp * Hp)) % Dp, nc = idx / (Wp * Hp * Dp);
        y[idx] = x[((nc * D + reflect_index(z, f, D)) * H + reflect_index(h, t, H)) * W + reflect_index(w, l, W)];
    }
}

template <typename T>
__device__ void reflect3d_pad_bwd(const T* __restrict__ dy, T* __restrict__ dx, long long NC, long long D,
                                  long long H, long long W, long long f, long long k, long long t, long long b,
                                  long long l, long long r) {
    const long long Dp = f + D + k, Hp = t + H + b, Wp = l + W + r;
    const long long total = NC * D * H * W;
    GRID_STRIDE(idx, total) {
        const long long x3 = idx % W, x2 = (idx / W) % H, x1 = (idx / (W * H)) % D, nc = idx / (W * H * D);
        long long pz[3], ph[3], pw[3];
        int nz, nh, nw;
        reflect_sources(x1, f, k, D, pz, &nz);
        reflect_sources(x2, t, b, H, ph, &nh);
        reflect_sources(x3, l, r, W, pw, &nw);
        const T* vol = dy + nc * Dp * Hp * Wp;
        T acc = (T)0;
        for (int a = 0; a < nz; ++a)
            for (int c = 0; c < nh; ++c)
                for (int e = 0; e < nw; ++e) acc += vol[(pz[a] * Hp + ph[c]) * Wp + pw[e]];
        dx[idx] = acc;
    }
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
#define VOL_ARGS long long Nt, long long C, long long D, long long H, long long W, long long kd, long long kh, \
    long long kw, long long Do, long long Ho, long long Wo, long long sd, long long sh, long long sw, long long pd, \
    long long ph, long long pw, long long dd, long long dh, long long dw, long long d0, long long Dt
#define VOL_PASS Nt, C, D, H, W, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw, d0, Dt
// The largest index vol2col and col2vol form: into x (Nt*C*D*H*W), into the tile's columns
// (C*kd*kh*kw * Nt*Dt*Ho*Wo), and the window offsets along each axis.
#define VOL_FITS32 (C * kd * kh * kw * Nt * Dt * Ho * Wo < INDEX32_LIMIT && Nt * C * D * H * W < INDEX32_LIMIT && \
                    Do * sd + kd * dd + pd + D < INDEX32_LIMIT && Ho * sh + kh * dh + ph + H < INDEX32_LIMIT && \
                    Wo * sw + kw * dw + pw + W < INDEX32_LIMIT)
#define BAND_ARGS long long A, long long Nt, long long Dt, long long Do, long long P, long long d0
#define BAND_PASS A, Nt, Dt, Do, P, d0
#define BAND_FITS32 (Nt * A * Do * P < INDEX32_LIMIT)

extern "C" __global__ void vol2col_f32(const float* x, float* cols, long long transposed, VOL_ARGS) {
    if (VOL_FITS32) vol2col<float, int>(x, cols, transposed, VOL_PASS);
    else vol2col<float, long long>(x, cols, transposed, VOL_PASS);
}
extern "C" __global__ void vol2col_f64(const double* x, double* cols, long long transposed, VOL_ARGS) {
    if (VOL_FITS32) vol2col<double, int>(x, cols, transposed, VOL_PASS);
    else vol2col<double, long long>(x, cols, transposed, VOL_PASS);
}
extern "C" __global__ void col2vol_f32(const float* cols, float* x, const float* bias, long long has_bias,
                                       long long accumulate, VOL_ARGS) {
    if (VOL_FITS32) col2vol<float, int>(cols, x, bias, has_bias, accumulate, VOL_PASS);
    else col2vol<float, long long>(cols, x, bias, has_bias, accumulate, VOL_PASS);
}
extern "C" __global__ void col2vol_f64(const double* cols, double* x, const double* bias, long long has_bias,
                                       long long accumulate, VOL_ARGS) {
    if (VOL_FITS32) col2vol<double, int>(cols, x, bias, has_bias, accumulate, VOL_PASS);
    else col2vol<double, long long>(cols, x, bias, has_bias, accumulate, VOL_PASS);
}
extern "C" __global__ void tile_to_vol_f32(const float* src, float* dst, const float* bias, long long has_bias,
                                           long long relu, BAND_ARGS) {
    if (BAND_FITS32) tile_to_vol<float, int>(src, dst, bias, has_bias, relu, BAND_PASS);
    else tile_to_vol<float, long long>(src, dst, bias, has_bias, relu, BAND_PASS);
}
extern "C" __global__ void tile_to_vol_f64(const double* src, double* dst, const double* bias, long long has_bias,
                                           long long relu, BAND_ARGS) {
    if (BAND_FITS32) tile_to_vol<double, int>(src, dst, bias, has_bias, relu, BAND_PASS);
    else tile_to_vol<double, long long>(src, dst, bias, has_bias, relu, BAND_PASS);
}
extern "C" __global__ void vol_to_tile_f32(const float* src, float* dst, BAND_ARGS) {
    if (BAND_FITS32) vol_to_tile<float, int>(src, dst, BAND_PASS);
    else vol_to_tile<float, long long>(src, dst, BAND_PASS);
}
extern "C" __global__ void vol_to_tile_f64(const double* src, double* dst, BAND_ARGS) {
    if (BAND_FITS32) vol_to_tile<double, int>(src, dst, BAND_PASS);
    else vol_to_tile<double, long long>(src, dst, BAND_PASS);
}

#define WIN3_ARGS long long NC, long long Ds, long long Hs, long long Ws, long long Dd, long long Hd, long long Wd, \
    long long oz, long long oh, long long ow
#define WIN3_PASS NC, Ds, Hs, Ws, Dd, Hd, Wd, oz, oh, ow
extern "C" __global__ void window3d_copy_f32(const float* src, float* dst, WIN3_ARGS, float fill) {
    window3d_copy<float>(src, dst, WIN3_PASS, fill);
}
extern "C" __global__ void window3d_copy_f64(const double* src, double* dst, WIN3_ARGS, double fill) {
    window3d_copy<double>(src, dst, WIN3_PASS, fill);
}
#define PAD3_ARGS long long NC, long long D, long long H, long long W, long long front, long long back, \
    long long top, long long bottom, long long left, long long right
#define PAD3_PASS NC, D, H, W, front, back, top, bottom, left, right
extern "C" __global__ void reflect3d_pad_fwd_f32(const float* x, float* y, PAD3_ARGS) {
    reflect3d_pad_fwd<float>(x, y, PAD3_PASS);
}
extern "C" __global__ void reflect3d_pad_fwd_f64(const double* x, double* y, PAD3_ARGS) {
    reflect3d_pad_fwd<double>(x, y, PAD3_PASS);
}
extern "C" __global__ void reflect3d_pad_bwd_f32(const float* dy, float* dx, PAD3_ARGS) {
    reflect3d_pad_bwd<float>(dy, dx, PAD3_PASS);
}
extern "C" __global__ void reflect3d_pad_bwd_f64(const double* dy, double* dx, PAD3_ARGS) {
    reflect3d_pad_bwd<double>(dy, dx, PAD3_PASS);
}

"""Winograd for volumes: kd x 3 x 3 stride-1 convolutions (3x3x3, and nnU-Net's 1x3x3) as F(4x4, 3x3)
in every plane, the depth taps summed directly.

Read conv3d_reference.py first (the plain vol2col version every result here is checked against),
then the 2-D Winograd F(4x4, 3x3) of conv_fast.py and kernels/cpu_winograd.py: this file reuses its
transforms unchanged and adds only the bookkeeping of the third axis.

The idea. A 3-D correlation is a sum over its depth taps k of 2-D correlations of input planes:
    y[:, :, d] = sum_{k < kd} conv2d(x[:, :, d - pd + k], w[:, :, k])          (stride 1; pd: depth lead)
Each 2-D correlation runs as F(4x4, 3x3), a 4x4 output block from a 6x6 input tile:
    U_k (36, O, C) = G w[:, :, k] G^T      the weight transform, per tap
    V_z (36, C, T) = B^T x_z B              the input transform, per input plane z (T: tiles of a plane)
    M_d (36, O, T) = sum_k U_k @ V_{d - pd + k}
    y_d            = A^T M_d A (+ bias)     the output transform, per output plane
Every input plane is transformed ONCE and then read by the kd output planes it feeds. With the
planes of V stored one after another (V (36, planes, C, T)), the kd planes an output plane reads
are consecutive, so the sum over taps is ONE GEMM per position with the taps stacked along K:
    M_d[p] = [U_0[p] U_1[p] U_2[p]] (O, kd C)  @  V[p, d - pd : d - pd + kd] (kd C, T)
(``stacked_weights`` and ``tap_windows``: a sliding-window view, no copy).

The weight gradient is the adjoint in w, per tap: with Z_d = A^T-adjoint of dy (Z_d (36, O, T) =
A dy_d A^T, the 2-D grad_transform),
    dU_k = sum_d Z_d @ V_{d - pd + k}^T,   dw[:, :, k] = G^T dU_k G.
Here V and Z are stored channel by channel (V (36, C, planes * T)), so for each tap the sum over the
planes and tiles is one GEMM with the long axis inside. The input gradient of a stride-1 convolution
is the forward of dy with the kernel flipped in space and transposed (conv3d_fast.data_grad_tiles),
so it runs here too.

Why not F(2x2x2, 3x3x3), Winograd along all three axes (this file's first version)? Per 8 outputs it
needs 64 products (8 per output, against 27 direct); this scheme needs 36 / 16 * 3 = 6.75 per output,
its transformed input is 2.25x the input instead of 8x, and its GEMMs have K = 3C instead of C,
which BLAS runs nearer its peak (at C = 16 the K = C GEMMs were memory-bound, 25 GFLOP/s on one
thread). Measured on one thread, 16 -> 16 channels at 64^3, forward: 66 ms against 103 ms
(benchmarks/results/3d holds the network figures).

Rounding: as the 2-D F(4x4, 3x3), whose transforms multiply by up to 8 (A) and 5 (B) and run in
float64, rounded once when stored: a float32 result is about 10x further from the exact one than a
direct convolution's (measured 2.3e-6 relative at 32 -> 16 channels, for y and both gradients;
vol2col: 2e-7; tests/backends/test_numba_backend.py).

Tiles are processed a band of output planes at a time (``bands``), so V and M stay within
``conv3d_fast.TILE_BYTES``.
"""
import numpy as np

from . import conv_reference

WINO3D_MIN_CHANNELS = 8        # min(C, O); the tests set it to 1 to force the fast path on tiny shapes
WINO3D_MIN_VOXELS = 512        # output voxels of all images; below, the weight transforms dominate


def plane_tiles(Ho, Wo):
    """(TH, TW): the 4x4 output blocks covering an Ho x Wo plane (the last ones partial)."""
    return (Ho + 3) // 4, (Wo + 3) // 4


def winograd3d_ok(kern, C, O, kernel, stride, dilation, N, out_size):
    """Whether a convolution of C -> O channels with N x out_size outputs runs as Winograd: a
    kd x 3 x 3 kernel (any depth), stride 1 and dilation 1, enough channels and voxels."""
    return (conv_reference.FAST_PATHS and getattr(kern, "winograd", None) is not None
            and tuple(kernel[1:]) == (3, 3) and tuple(stride) == (1, 1, 1)
            and tuple(dilation) == (1, 1, 1) and min(C, O) >= WINO3D_MIN_CHANNELS
            and N * int(np.prod(out_size)) >= WINO3D_MIN_VOXELS)


def stacked_weights(w, wg):
    """w (O, C, kd, 3, 3) -> U3 (36, O, kd C), U3[p, o, k C + c] = (G w[o, c, k] G^T)[p]: the taps'
    weight transforms side by side along K (wg.weight_transform is the 2-D one)."""
    O, C, kd = w.shape[:3]
    U = np.empty((kd, 36, O, C), dtype=w.dtype)
    for k in range(kd):
        wg.weight_transform(np.ascontiguousarray(w[:, :, k]), U[k])
    return np.ascontiguousarray(U.transpose(1, 2, 0, 3)).reshape(36, O, kd * C)


def tap_windows(V, kd, count):
    """V (36, planes, C, T) -> (count, 36, kd C, T), window i = V[:, i:i + kd] with its taps and
    channels merged into one axis: a view (overlapping windows share V's memory)."""
    s = V.strides
    return np.lib.stride_tricks.as_strided(V, shape=(count, 36, kd * V.shape[2], V.shape[3]),
                                           strides=(s[1], s[0], s[2], s[3]), writeable=False)


def bands(Do, kd, per_plane, budget):
    """Bands (d0, d1) of the Do output planes whose buffers, ``per_plane`` bytes for each output plane
    and each of the kd - 1 extra input planes, fit ``budget`` (at least one plane)."""
    nb = max(1, budget // max(1, per_plane) - (kd - 1))
    return [(d0, min(Do, d0 + nb)) for d0 in range(0, Do, nb)]


def input_planes(x, V, z0, lead, TH, TW, wg):
    """V[:, j] (36, C, N T) = B^T x[:, :, z0 + j] B for each plane j of V (all images' tiles; zero for
    the planes outside x)."""
    N, D = x.shape[0], x.shape[2]
    for j in range(V.shape[1]):
        z = z0 + j
        if 0 <= z < D:
            wg.input_transform(x[:, :, z], 0, N * TH, TH, TW, lead[1], lead[2], V[:, j])
        else:
            V[:, j] = 0


def winograd3d_forward(x, w, y, lead, wg, workspace, budget, b=None):
    """y (N, O, *out) = conv3d(x, w) (+ b) for a kd x 3 x 3 kernel, stride 1, leading padding
    ``lead`` (the trailing padding follows from y's size). wg: the kernel table's 2-D F(4x4, 3x3)
    transforms (weight_transform, input_transform, output_transform, grad_transform,
    weight_grad_transform) and matmul_stack; workspace(key, count, dtype): scratch arrays."""
    N, C = x.shape[:2]
    O, kd = w.shape[0], w.shape[2]
    Do, Ho, Wo = y.shape[2:]
    TH, TW = plane_tiles(Ho, Wo)
    NT = N * TH * TW
    U3 = stacked_weights(w, wg)
    bias = np.zeros(O, dtype=y.dtype) if b is None else np.ascontiguousarray(b, dtype=y.dtype)
    for d0, d1 in bands(Do, kd, 36 * NT * max(C, O) * x.itemsize, budget):
        nb = d1 - d0
        V = workspace("cols", 36 * (nb + kd - 1) * C * NT, x.dtype).reshape(36, nb + kd - 1, C, NT)
        input_planes(x, V, d0 - lead[0], lead, TH, TW, wg)
        M = workspace("dcols", nb * 36 * O * NT, x.dtype).reshape(nb, 36, O, NT)
        wg.matmul_stack(np.broadcast_to(U3, (nb,) + U3.shape), tap_windows(V, kd, nb), M)
        for i in range(nb):
            wg.output_transform(M[i], 0, N * TH, TH, TW, bias, b is not None, y[:, :, d0 + i])
    return y


def winograd3d_weight_grad(x, dy, lead, kd, wg, workspace, budget):
    """dw (O, C, kd, 3, 3) of the kd x 3 x 3 stride-1 convolution of x with leading padding
    ``lead``. Per image and band of output planes: V (36, C, planes T) of the input planes the band
    reads, Z (36, O, band T) of dy, then for each tap dU_k += Z @ V[:, :, tap's planes]^T; the parts
    are added in a fixed order, in float64."""
    N, C, D = x.shape[:3]
    O, Do, Ho, Wo = dy.shape[1:]
    TH, TW = plane_tiles(Ho, Wo)
    T = TH * TW
    dU = np.zeros((kd, 36, O, C), dtype=np.float64)
    part = np.empty((36, O, C), dtype=x.dtype)
    for n in range(N):
        for d0, d1 in bands(Do, kd, 36 * T * max(C, O) * x.itemsize, budget):
            nb = d1 - d0
            z0 = d0 - lead[0]                                   # the first input plane read
            j0, j1 = min(nb + kd - 1, max(0, -z0)), max(0, min(nb + kd - 1, D - z0))
            V = workspace("cols", 36 * C * (nb + kd - 1) * T, x.dtype).reshape(36, C, -1)
            V[:, :, :j0 * T] = 0                                # planes before and after x
            V[:, :, max(j0, j1) * T:] = 0
            if j1 > j0:
                wg.input_transform(x[n, :, z0 + j0:z0 + j1].transpose(1, 0, 2, 3), 0, (j1 - j0) * TH,
                                   TH, TW, lead[1], lead[2], V[:, :, j0 * T:j1 * T])
            Z = workspace("dcols", 36 * O * nb * T, x.dtype).reshape(36, O, nb * T)
            wg.grad_transform(dy[n, :, d0:d1].transpose(1, 0, 2, 3), 0, nb * TH, TH, TW, Z)
            for k in range(kd):
                dU[k] += wg.matmul_stack(Z, V[:, :, k * T:(k + nb) * T].transpose(0, 2, 1), part)
    dw = np.empty((O, C, kd, 3, 3), dtype=dy.dtype)
    for k in range(kd):
        dw[:, :, k] = wg.weight_grad_transform(np.ascontiguousarray(dU[k], dtype=dy.dtype),
                                               np.empty((O, C, 3, 3), dtype=dy.dtype))
    return dw

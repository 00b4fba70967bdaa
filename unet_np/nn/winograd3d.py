"""Winograd F(2x2x2, 3x3x3): 3x3x3 stride-1 convolutions over volumes with 3.4x fewer multiplies.

Read conv3d_reference.py first (the plain vol2col version every result here is checked against),
then the 2-D F(4x4, 3x3) in conv_fast.py / kernels/cpu_winograd.py: this is the same idea with one
more axis and the smaller F(2, 3).

The 1-D algorithm. Two outputs of a 3-tap correlation y_i = sum_k g_k d_{i+k}, read from a 4-sample
input tile d, are
    y = A^T [(G g) * (B^T d)]       (* element-wise; G g and B^T d have 4 entries)
    B^T = [[1,  0, -1,  0],     G = [[1,    0,   0],      A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],          [1/2,  1/2, 1/2],            [0, 1, -1, -1]]
           [0, -1,  1,  0],          [1/2, -1/2, 1/2],
           [0,  1,  0, -1]]          [0,    0,   1]]
(check: y_0 = (d0 - d2) g0 + (d1 + d2)(g0 + g1 + g2)/2 + (d2 - d1)(g0 - g1 + g2)/2 = g0 d0 + g1 d1
+ g2 d2). Four multiplies instead of six.

In 3-D the transforms are applied along each axis in turn (a Kronecker product): a 2x2x2 output
block comes from a 4x4x4 input tile d (neighbouring tiles overlap by 2) as
    Y = A^T_3 [ (G_3 g) * (B^T_3 d) ],   X_3 = X applied along depth, rows and columns,
64 products instead of 8 * 27 = 216. Summed over input channels, the product at each of the 64 tile
positions p = 16 a + 4 b + c is a matrix product, so a convolution is 64 GEMMs:
    U (64, O, C) = G_3 w[o, c]               (the weight transform, once per call)
    V (64, C, T) = B^T_3 d for every tile     (the input transform, kernels/cpu_winograd3d.py)
    M_p = U_p @ V_p          (O, T)           (64 GEMMs, split over threads)
    y = A^T_3 M[:, o, t] per tile (+ bias)    (the output transform)
The weight gradient is the adjoint in g: with Z (64, O, T) = A_3 dy_tile (the grad transform),
    dU_p = sum over tiles Z_p @ V_p^T,   dw = G^T_3 dU.
The input gradient of a stride-1 convolution is the forward of dy with the kernel flipped in space and
transposed (C, O, 3, 3, 3) and the padding 2 - lead (conv3d_fast.data_grad_tiles), so it runs here too.

Cost against vol2col: V is 8x the input (64 values per 8 outputs) where the columns were 27x, and
the GEMMs do 64 / 216 of the multiplies. Rounding: B and A have entries 0 and +-1, G halves, so the
float32 result stays within a few ulps of the direct one's error. The weight transforms run in
float64 and are rounded once; the tile transforms (sums and differences only) in the array's dtype.

Tiles are processed a chunk of whole depth slabs at a time (r = n * TD + td), so V and M stay within
``conv3d_fast.TILE_BYTES``.
"""
import numpy as np

from . import conv_reference

# The matrices above, as arrays (used by the weight transforms; the tile transforms are written out
# in kernels/cpu_winograd3d.py).
WINO3D_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
WINO3D_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
WINO3D_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)

WINO3D_MIN_CHANNELS = 8        # min(C, O); the tests set it to 1 to force the fast path on tiny shapes
WINO3D_MIN_VOXELS = 512        # output voxels of all images; below, the weight transforms dominate


def tiles(out_size):
    """(TD, TH, TW): the 2x2x2 output blocks covering out_size (the last ones partial)."""
    return tuple((n + 1) // 2 for n in out_size)


def winograd3d_ok(kern, C, O, kernel, stride, dilation, N, out_size):
    """Whether a convolution of C -> O channels with N x out_size outputs runs as Winograd."""
    return (conv_reference.FAST_PATHS and getattr(kern, "winograd", None) is not None
            and tuple(kernel) == (3, 3, 3) and tuple(stride) == (1, 1, 1)
            and tuple(dilation) == (1, 1, 1) and min(C, O) >= WINO3D_MIN_CHANNELS
            and N * int(np.prod(out_size)) >= WINO3D_MIN_VOXELS)


def weight_transform(w):
    """w (O, C, 3, 3, 3) -> U (64, O, C), U[16 a + 4 b + c, o, i] = (G_3 w[o, i])[a, b, c], in
    float64 and rounded once. The readable version of the kernel table's weight_transform (compiled
    in kernels/cpu_winograd3d.py; einsum here took 0.15 s at 128 x 128 channels)."""
    O, C = w.shape[:2]
    G = WINO3D_G
    u = np.einsum("ai,bj,ck,xyijk->abcxy", G, G, G, w.astype(np.float64), optimize=True)
    return np.ascontiguousarray(u.reshape(64, O, C), dtype=w.dtype)


def weight_grad_transform(dU, dtype):
    """dU (64, O, C) -> dw (O, C, 3, 3, 3) = G^T_3 dU[:, o, i] (the adjoint of weight_transform);
    the readable version of the kernel table's weight_grad_transform."""
    _, O, C = dU.shape
    G = WINO3D_G
    dw = np.einsum("ai,bj,ck,abcxy->xyijk", G, G, G, dU.astype(np.float64).reshape(4, 4, 4, O, C),
                   optimize=True)
    return np.ascontiguousarray(dw, dtype=dtype)


def chunks(R, TP, width, itemsize, budget):
    """Chunks (r0, r1) of the R = N * TD tile slabs (TP tiles each) whose (64, width, tiles) buffers
    fit ``budget`` bytes (at least one slab)."""
    rc = max(1, budget // (64 * width * TP * itemsize))
    return [(r0, min(R, r0 + rc)) for r0 in range(0, R, rc)]


def winograd3d_forward(x, w, y, lead, wg, workspace, budget, b=None):
    """y (N, O, *out) = conv3d(x, w) (+ b) for a 3x3x3 kernel, stride 1, leading padding ``lead``
    (the trailing padding follows from y's size). wg: the kernel table's transforms
    (weight_transform(w, U), weight_grad_transform(dU, dw), input_transform, output_transform,
    grad_transform) and matmul_stack; workspace(key, count, dtype): scratch arrays."""
    N, C = x.shape[:2]
    O = y.shape[1]
    TD, TH, TW = tiles(y.shape[2:])
    U = wg.weight_transform(np.ascontiguousarray(w), np.empty((64, O, C), dtype=w.dtype))
    bias = np.zeros(O, dtype=y.dtype) if b is None else np.ascontiguousarray(b, dtype=y.dtype)
    for r0, r1 in chunks(N * TD, TH * TW, max(C, O), x.itemsize, budget):
        T = (r1 - r0) * TH * TW
        V = workspace("cols", 64 * C * T, x.dtype).reshape(64, C, T)
        wg.input_transform(x, r0, r1, TD, TH, TW, lead[0], lead[1], lead[2], V)
        M = workspace("dcols", 64 * O * T, x.dtype).reshape(64, O, T)
        wg.matmul_stack(U, V, M)
        wg.output_transform(M, r0, r1, TD, TH, TW, bias, b is not None, y)
    return y


def winograd3d_weight_grad(x, dy, lead, wg, workspace, budget):
    """dw (O, C, 3, 3, 3) of the 3x3x3 stride-1 convolution of x with leading padding ``lead``.
    Per chunk dU^T (64, C, O) += V_p @ Z_p^T (the long tile axis inside, as weight_grad_tiles does);
    the chunks are added in order."""
    N, C = x.shape[:2]
    O = dy.shape[1]
    TD, TH, TW = tiles(dy.shape[2:])
    dUt = np.zeros((64, C, O), dtype=np.float64)
    part = np.empty((64, C, O), dtype=x.dtype)
    for r0, r1 in chunks(N * TD, TH * TW, max(C, O), x.itemsize, budget):
        T = (r1 - r0) * TH * TW
        V = workspace("cols", 64 * C * T, x.dtype).reshape(64, C, T)
        wg.input_transform(x, r0, r1, TD, TH, TW, lead[0], lead[1], lead[2], V)
        Z = workspace("dcols", 64 * O * T, x.dtype).reshape(64, O, T)
        wg.grad_transform(dy, r0, r1, TD, TH, TW, Z)
        dUt += wg.matmul_stack(V, Z.transpose(0, 2, 1), part)
    return wg.weight_grad_transform(np.ascontiguousarray(dUt.transpose(0, 2, 1)),
                                    np.empty((O, C, 3, 3, 3), dtype=dy.dtype))

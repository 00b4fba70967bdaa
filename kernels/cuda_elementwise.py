"""Elementwise and data-movement kernels for Numba-CUDA: activations, bias + ReLU, bilinear and
nearest upsampling, concat / crop / pad copies.

NumPy references, to read side by side:
  relu_forward_kernel, relu_backward_kernel        unet_np/nn/activation.py relu_forward / relu_backward
  sigmoid_forward_kernel, sigmoid_backward_kernel  unet_np/nn/activation.py sigmoid_forward / _backward
  bias_relu_kernel                                 conv.py's bias add (``_batch_first``) followed by ReLU
                                                   (the GEMM kernels in cuda_gemm.py fuse the same
                                                   epilogue into their output pass)
  upsample_bilinear_*_kernel                       unet_np/nn/upsample.py upsample_bilinear2d_forward /
                                                   _backward (align_corners=False, integer scale)
  upsample_nearest_*_kernel                        unet_np/nn/upsample.py upsample_nearest2d_*
  copy_box_kernel, fill_kernel                     unet_np/nn/concat.py concat_*, center_crop_*,
                                                   pad2d_* (constant mode)
  reflect_index, reflect_source                    the index maps of reflect padding (unet_np/nn/concat.py
                                                   pad2d_* / pad3d_*, mode 'reflect'); the kernels are
                                                   cuda_vol.reflect_pad3d_*_kernel, which pad an image
                                                   as a volume of depth 1

Every kernel walks a flat index with a grid-stride loop (launch shapes: cuda_launch.grid_1d) and
takes flat arrays. Backward passes are gathers (each output element sums what reaches it), so there
are no atomics and the sums are deterministic.
"""
import math

from numba import cuda


# -- activations ------------------------------------------------------------------------------------
@cuda.jit
def relu_forward_kernel(x, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        y[i] = v if (v > 0 or v != v) else 0        # a NaN stays NaN, as with np.maximum


@cuda.jit
def relu_backward_kernel(dy, y, dx):
    """dx = dy * 1[y > 0] (the derivative at 0 is 0, as PyTorch). Where y <= 0 dx is dy * 0, not 0,
    so a NaN (or inf) in dy stays NaN there too, as in NumPy's dy * (y > 0) and elementwise.cu."""
    for i in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        dx[i] = dy[i] if y[i] > 0 else dy[i] * 0


@cuda.jit
def sigmoid_forward_kernel(x, y):
    """y = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) otherwise: exp never sees a large argument."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        e = math.exp(-abs(v))
        y[i] = 1 / (1 + e) if v >= 0 else e / (1 + e)


@cuda.jit
def sigmoid_backward_kernel(dy, y, dx):
    for i in range(cuda.grid(1), dy.size, cuda.gridsize(1)):
        s = y[i]
        dx[i] = dy[i] * s * (1 - s)


@cuda.jit
def bias_relu_kernel(x, bias, C, plane, relu, y):
    """y[n, c, p] = max(x[n, c, p] + bias[c], 0) (no max when relu is False); x, y flat NCHW."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (i // plane) % C
        v = x[i] + bias[c]
        if relu and v < 0:
            v = 0
        y[i] = v


# -- upsampling --------------------------------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def linear_taps(o, s, L):
    """The two taps of output o along an axis of length L upsampled by s: inputs i0, i1 with weights
    w0, w1, exactly as upsample.cu's taps(). o = s*i + r sits at source position i + d,
    d = (2r + 1 - s) / (2s) (PyTorch's align_corners=False): d < 0 reads x[i-1] (weight -d) and x[i]
    (1 + d); d >= 0 reads x[i] (1 - d) and x[i+1] (d). At the edges (and where d = 0) the second
    weight is 0 and the second tap repeats the first."""
    i = o // s
    r = o - i * s
    d = (2 * r + 1 - s) / (2 * s)
    if d < 0:
        if i == 0:
            return 0, 0, 1.0, 0.0
        return i - 1, i, -d, 1 + d
    if i == L - 1 or d == 0:
        return i, i, 1.0, 0.0
    return i, i + 1, 1 - d, d


@cuda.jit(device=True, inline=True)
def corner_taps(o, s, L):
    """The two taps of output o along an axis of length L upsampled by s with align_corners=True, as a
    row of upsample.align_corners_matrix: source position pos = o (L - 1) / (s L - 1), inputs
    i0 = min(floor(pos), L - 2) and i0 + 1 with weights 1 - (pos - i0) and pos - i0 (L = 1: x[0])."""
    if L == 1:
        return 0, 0, 1.0, 0.0
    pos = o * ((L - 1) / (s * L - 1))
    i0 = min(int(math.floor(pos)), L - 2)
    w = pos - i0
    return i0, i0 + 1, 1 - w, w


@cuda.jit(device=True, inline=True)
def axis_taps(o, s, L, corners):
    """(i0, i1, w0, w1): the taps of output o along one axis, align_corners True or False."""
    if corners:
        return corner_taps(o, s, L)
    return linear_taps(o, s, L)


@cuda.jit(device=True, inline=True)
def tap_weight(o, i, s, L, corners):
    """The weight with which output o (along one axis) reads input i: 0 when it does not
    (align_corners True or False; the 2-D bilinear passes False, cuda_vol's trilinear either)."""
    i0, i1, w0, w1 = axis_taps(o, s, L, corners)
    w = 0.0
    if i0 == i:
        w += w0
    if i1 == i:
        w += w1
    return w


@cuda.jit
def upsample_bilinear_forward_kernel(x, y, g):
    """y (N, C, sh*H, sw*W) from x (N, C, H, W); g = (N, C, H, W, sh, sw). One thread per output;
    the same sums in the same order as upsample.cu's bilinear_fwd (rows along W first, then H)."""
    N, C, H, W, sh, sw = g
    Ho, Wo = H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * Ho * Wo, cuda.gridsize(1)):
        ow = idx % Wo
        t = idx // Wo
        oh = t % Ho
        nc = t // Ho
        h0, h1, a0, a1 = linear_taps(oh, sh, H)
        c0, c1, b0, b1 = linear_taps(ow, sw, W)
        base = nc * H * W
        z0 = x[base + h0 * W + c0] * b0                   # row h0 interpolated along W
        if b1 != 0:
            z0 += b1 * x[base + h0 * W + c1]
        v = z0 * a0
        if a1 != 0:
            z1 = x[base + h1 * W + c0] * b0               # row h1 interpolated along W
            if b1 != 0:
                z1 += b1 * x[base + h1 * W + c1]
            v += a1 * z1
        y[idx] = v


@cuda.jit
def upsample_bilinear_backward_kernel(dy, dx, g):
    """dx = A_h^T dy A_w as a gather (upsample.cu's bilinear_bwd): input row i is read only by output
    rows in [s(i-1), s(i+2)), each with the weight tap_weight gives."""
    N, C, H, W, sh, sw = g
    Ho, Wo = H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        j = idx % W
        t = idx // W
        i = t % H
        nc = t // H
        acc = 0.0
        for oh in range(max(0, sh * (i - 1)), min(Ho, sh * (i + 2))):
            a = tap_weight(oh, i, sh, H, False)
            if a == 0:
                continue
            row = 0.0
            for ow in range(max(0, sw * (j - 1)), min(Wo, sw * (j + 2))):
                b = tap_weight(ow, j, sw, W, False)
                if b != 0:
                    row += b * dy[(nc * Ho + oh) * Wo + ow]
            acc += a * row
        dx[idx] = acc


@cuda.jit
def upsample_nearest_forward_kernel(x, y, g):
    N, C, H, W, sh, sw = g
    Ho, Wo = H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * Ho * Wo, cuda.gridsize(1)):
        ow = idx % Wo
        t = idx // Wo
        oh = t % Ho
        nc = t // Ho
        y[idx] = x[(nc * H + oh // sh) * W + ow // sw]


@cuda.jit
def upsample_nearest_backward_kernel(dy, dx, g):
    """dx[i, j] = sum of dy over the sh x sw block that copied it."""
    N, C, H, W, sh, sw = g
    Ho, Wo = H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        j = idx % W
        t = idx // W
        i = t % H
        nc = t // H
        acc = 0.0
        for a in range(sh):
            for b in range(sw):
                acc += dy[(nc * Ho + i * sh + a) * Wo + j * sw + b]
        dx[idx] = acc


# -- copies: concatenation, crop, constant padding ---------------------------------------------------
@cuda.jit
def copy_box_kernel(src, dst, box, s_shape, s_off, d_shape, d_off):
    """dst[n, d_off + (c, h, w)] = src[n, s_off + (c, h, w)] for (n, c, h, w) in the box (N, C, H, W).

    s_shape, d_shape: (C, H, W) of the two NCHW arrays; s_off, d_off: (c, h, w) corners. Concat writes
    each input at a channel offset, its backward reads slabs back; a centre crop reads a window; its
    backward and constant padding write one."""
    N, C, H, W = box
    sC, sH, sW = s_shape
    sc, shh, sww = s_off
    dC, dH, dW = d_shape
    dc, dhh, dww = d_off
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
        dst[((n * dC + c + dc) * dH + h + dhh) * dW + w + dww] = \
            src[((n * sC + c + sc) * sH + h + shh) * sW + w + sww]


@cuda.jit
def scale_kernel(a, f, out):
    """out = a * f (also a dtype cast when out's dtype differs)."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = a[i] * f


@cuda.jit
def fill_kernel(a, value):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = value


# -- reflect padding: the index maps (the kernels of images and volumes: cuda_vol.reflect_pad3d_*) --
@cuda.jit(device=True, inline=True)
def reflect_index(k, L):
    """Index k in [-(L-1), 2L-2] mirrored into [0, L) without repeating the edge (torch's 'reflect')."""
    if k < 0:
        return -k
    if k >= L:
        return 2 * (L - 1) - k
    return k


@cuda.jit(device=True, inline=True)
def reflect_source(k, i, n, lead, trail):
    """The k-th (k = 0, 1, 2) padded position along one axis that copied input index i, or -1 if there is
    none: i + lead itself; lead - i (the leading mirror, when 1 <= i <= lead); lead + n + (n - 2 - i) (the
    trailing mirror, when 0 <= n - 2 - i < trail). reflect_sources in elementwise.cu lists the same."""
    if k == 0:
        return i + lead
    if k == 1:
        return lead - i if 1 <= i <= lead else -1
    j = n - 2 - i
    return lead + n + j if 0 <= j < trail else -1

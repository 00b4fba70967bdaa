"""Volume (N, C, D, H, W) kernels for Numba-CUDA: vol2col / col2vol, 3-D max-pooling, trilinear and
nearest upsampling, reflect padding. The 2-D twins are cuda_conv.py, cuda_pool.py and
cuda_elementwise.py; the Numba CPU twins of vol2col / col2vol and the max-pool are in cpu_conv3d.py
(vol2col_band, col2vol_band, maxpool3d_tiled_*), with the same names and loops, to read side by side.
unet_np/backends/numba_cuda_vol.py (VolOps) runs them, with cuda_gemm's GEMMs around the columns.

NumPy references (same layouts, same results):
  vol2col_kernel, col2vol_kernel           unet_np/nn/conv3d_reference.py vol2col / col2vol
  maxpool3d_forward_kernel, _backward      unet_np/nn/pool.py maxpool3d_forward / maxpool3d_backward
  upsample_trilinear3d_*_kernel            unet_np/nn/upsample.py upsample_trilinear3d_forward /
                                           _backward (align_corners False: _interp_axis once per axis;
                                           True: linear_align_corners_forward's matrices)
  upsample_nearest3d_*_kernel              unet_np/nn/upsample.py upsample_nearest3d_*
  reflect_pad3d_*_kernel                   unet_np/nn/concat.py pad3d_forward / pad3d_backward
                                           ('reflect'; 'constant' and the centre crop are
                                           cuda_elementwise.copy_box_kernel on (N*C, D, H, W) views);
                                           pad2d_* too: an image is a volume of depth 1, f = k = 0

Every kernel walks a flat index with a grid-stride loop (launch shapes: cuda_launch.grid_1d) over flat
arrays. Every backward is a gather (one thread per input voxel sums what reached it, in a fixed order):
no atomics, results identical from run to run.
"""
import math

from numba import cuda

from .cuda_elementwise import axis_taps, reflect_index, reflect_source, tap_weight


@cuda.jit(device=True, inline=True)
def voxel_of(idx, D, H, W):
    """Flat index idx of an (NC, D, H, W) array -> (nc, z, h, w) (also a row (c, i, j, k) of the
    columns, with (kd, kh, kw) for (D, H, W))."""
    w = idx % W
    t = idx // W
    h = t % H
    t = t // H
    return t // D, t % D, h, w


# -- vol2col / col2vol: the column buffer of the 3-D convolutions -------------------------------------
# Geometry tuple g = (N, C, D, H, W, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw):
# (D, H, W) the volume, (Do, Ho, Wo) the grid of windows, (pd, ph, pw) the leading (front, top, left)
# padding. Window (od, oh, ow), offset (i, j, k) reads voxel (od*sd + i*dd - pd, oh*sh + j*dh - ph,
# ow*sw + k*dw - pw), zero outside the volume.
@cuda.jit
def vol2col_kernel(x, cols, g):
    """cols (C*kd*kh*kw, N*Do*Ho*Wo)[(c, i, j, k), (n, od, oh, ow)] = x (N, C, D, H, W)[n, c, z, h, w]
    at the voxel above (0 in the padding). One thread per element of cols. Mirrors vol2col."""
    N, C, D, H, W, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw = g
    ncol = N * Do * Ho * Wo
    total = C * kd * kh * kw * ncol
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        row = idx // ncol
        col = idx - row * ncol
        n, od, oh, ow = voxel_of(col, Do, Ho, Wo)
        c, i, j, k = voxel_of(row, kd, kh, kw)
        z = od * sd + i * dd - pd
        h = oh * sh + j * dh - ph
        w = ow * sw + k * dw - pw
        if 0 <= z < D and 0 <= h < H and 0 <= w < W:
            cols[idx] = x[(((n * C + c) * D + z) * H + h) * W + w]
        else:
            cols[idx] = 0


@cuda.jit(device=True, inline=True)
def window_of(v, p, i, d, s, n_out):
    """The window o along one axis whose offset i reads input v (o*s + i*d - p = v), or -1."""
    vv = v + p - i * d
    if vv < 0 or vv % s != 0:
        return -1
    o = vv // s
    return o if o < n_out else -1


@cuda.jit
def col2vol_kernel(dcols, out, g, bias, has_bias):
    """out (N, C, D, H, W)[n, c, z, h, w] = the sum of the dcols (C*kd*kh*kw, N*Do*Ho*Wo) entries
    vol2col copied from that voxel [+ bias[c]]. A gather, one thread per voxel, the offsets (i, j, k)
    summed in row-major order: no atomics. Mirrors col2vol (its adjoint: vol2col)."""
    N, C, D, H, W, kd, kh, kw, Do, Ho, Wo, sd, sh, sw, pd, ph, pw, dd, dh, dw = g
    ncol = N * Do * Ho * Wo
    for idx in range(cuda.grid(1), N * C * D * H * W, cuda.gridsize(1)):
        nc, z, h, w = voxel_of(idx, D, H, W)
        c = nc % C
        n = nc // C
        acc = 0.0
        for i in range(kd):
            od = window_of(z, pd, i, dd, sd, Do)
            if od < 0:
                continue
            for j in range(kh):
                oh = window_of(h, ph, j, dh, sh, Ho)
                if oh < 0:
                    continue
                for k in range(kw):
                    ow = window_of(w, pw, k, dw, sw, Wo)
                    if ow >= 0:
                        acc += dcols[(((c * kd + i) * kh + j) * kw + k) * ncol
                                     + ((n * Do + od) * Ho + oh) * Wo + ow]
        if has_bias:
            acc += bias[c]
        out[idx] = acc


# -- max-pooling ---------------------------------------------------------------------------------------
# g = (N, C, D, H, W, Do, Ho, Wo, kd, kh, kw, sd, sh, sw, pd, ph, pw)
@cuda.jit
def maxpool3d_forward_kernel(x, y, arg, g):
    """y (N, C, Do, Ho, Wo) = the max over each window (padding counts as -inf, a NaN propagates as
    np.maximum's), arg = the window offset (i*kh + j)*kw + k of the first maximum: a later offset wins
    only when strictly larger, as maxpool3d_forward's ``v > y``. One thread per window."""
    N, C, D, H, W, Do, Ho, Wo, kd, kh, kw, sd, sh, sw, pd, ph, pw = g
    for idx in range(cuda.grid(1), N * C * Do * Ho * Wo, cuda.gridsize(1)):
        nc, od, oh, ow = voxel_of(idx, Do, Ho, Wo)
        base = nc * D * H * W
        best = -math.inf
        where = 0
        pos = 0
        for i in range(kd):
            z = od * sd + i - pd
            for j in range(kh):
                h = oh * sh + j - ph
                for k in range(kw):
                    w = ow * sw + k - pw
                    v = -math.inf
                    if 0 <= z < D and 0 <= h < H and 0 <= w < W:
                        v = x[base + (z * H + h) * W + w]
                    if pos == 0:
                        best = v
                    else:
                        if v > best:
                            where = pos
                        if v != v or (best == best and v > best):   # np.maximum: NaN wins
                            best = v
                    pos += 1
        y[idx] = best
        arg[idx] = where


@cuda.jit(device=True, inline=True)
def window_range(v, p, k, s, n_out):
    """[lo, hi]: the windows along one axis (kernel k, stride s, leading padding p) holding input v."""
    return max(0, (v + p - k + s) // s), min(n_out - 1, (v + p) // s)


@cuda.jit
def maxpool3d_backward_kernel(dy, arg, dx, g):
    """dx (N, C, D, H, W)[.., z, h, w] = the sum of dy (N, C, Do, Ho, Wo) over the windows whose argmax
    is that voxel. A gather, one thread per voxel, windows in row-major order."""
    N, C, D, H, W, Do, Ho, Wo, kd, kh, kw, sd, sh, sw, pd, ph, pw = g
    for idx in range(cuda.grid(1), N * C * D * H * W, cuda.gridsize(1)):
        nc, z, h, w = voxel_of(idx, D, H, W)
        acc = 0.0
        d_lo, d_hi = window_range(z, pd, kd, sd, Do)
        h_lo, h_hi = window_range(h, ph, kh, sh, Ho)
        w_lo, w_hi = window_range(w, pw, kw, sw, Wo)
        for od in range(d_lo, d_hi + 1):
            i = z + pd - od * sd
            for oh in range(h_lo, h_hi + 1):
                j = h + ph - oh * sh
                for ow in range(w_lo, w_hi + 1):
                    k = w + pw - ow * sw
                    o = ((nc * Do + od) * Ho + oh) * Wo + ow
                    if arg[o] == (i * kh + j) * kw + k:
                        acc += dy[o]
        dx[idx] = acc


# -- trilinear upsampling --------------------------------------------------------------------------------
# The taps of one axis (axis_taps: align_corners False or True) and tap_weight are cuda_elementwise's,
# shared with the 2-D bilinear kernels.
@cuda.jit(device=True, inline=True)
def axis_reach(i, s, L, corners):
    """[lo, hi): the outputs along one axis that may read input i (a superset; tap_weight decides).
    align_corners False: [s(i-1), s(i+2)); True: the outputs whose position lies in (i-1, i+1)."""
    So = s * L
    if not corners:
        return max(0, s * (i - 1)), min(So, s * (i + 2))
    if L == 1:
        return 0, So
    return max(0, ((i - 1) * (So - 1)) // (L - 1)), min(So, ((i + 1) * (So - 1)) // (L - 1) + 2)


@cuda.jit(device=True, inline=True)
def lerp_row(x, base, c0, c1, e0, e1):
    """One row interpolated along W: x[base + c0] e0 + x[base + c1] e1."""
    v = x[base + c0] * e0
    if e1 != 0:
        v += e1 * x[base + c1]
    return v


@cuda.jit(device=True, inline=True)
def lerp_plane(x, base, W, h0, h1, b0, b1, c0, c1, e0, e1):
    """One plane interpolated along W, then H."""
    v = lerp_row(x, base + h0 * W, c0, c1, e0, e1) * b0
    if b1 != 0:
        v += b1 * lerp_row(x, base + h1 * W, c0, c1, e0, e1)
    return v


@cuda.jit
def upsample_trilinear3d_forward_kernel(x, y, g, corners):
    """y (N, C, sd*D, sh*H, sw*W) from x (N, C, D, H, W), g = (N, C, D, H, W, sd, sh, sw); corners:
    align_corners. One thread per output voxel, interpolated along W, then H, then D, as the
    reference's passes."""
    N, C, D, H, W, sd, sh, sw = g
    Do, Ho, Wo = D * sd, H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * Do * Ho * Wo, cuda.gridsize(1)):
        nc, od, oh, ow = voxel_of(idx, Do, Ho, Wo)
        d0, d1, a0, a1 = axis_taps(od, sd, D, corners)
        h0, h1, b0, b1 = axis_taps(oh, sh, H, corners)
        c0, c1, e0, e1 = axis_taps(ow, sw, W, corners)
        base = nc * D * H * W
        v = lerp_plane(x, base + d0 * H * W, W, h0, h1, b0, b1, c0, c1, e0, e1) * a0
        if a1 != 0:
            v += a1 * lerp_plane(x, base + d1 * H * W, W, h0, h1, b0, b1, c0, c1, e0, e1)
        y[idx] = v


@cuda.jit
def upsample_trilinear3d_backward_kernel(dy, dx, g, corners):
    """dx = A_w^T A_h^T A_d^T dy as a gather: input voxel (z, h, w) sums the outputs that read it
    (axis_reach along each axis), each times the product of the three axis weights."""
    N, C, D, H, W, sd, sh, sw = g
    Do, Ho, Wo = D * sd, H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * D * H * W, cuda.gridsize(1)):
        nc, z, h, w = voxel_of(idx, D, H, W)
        d_lo, d_hi = axis_reach(z, sd, D, corners)
        h_lo, h_hi = axis_reach(h, sh, H, corners)
        w_lo, w_hi = axis_reach(w, sw, W, corners)
        acc = 0.0
        for od in range(d_lo, d_hi):
            a = tap_weight(od, z, sd, D, corners)
            if a == 0:
                continue
            plane = 0.0
            for oh in range(h_lo, h_hi):
                b = tap_weight(oh, h, sh, H, corners)
                if b == 0:
                    continue
                row = 0.0
                for ow in range(w_lo, w_hi):
                    e = tap_weight(ow, w, sw, W, corners)
                    if e != 0:
                        row += e * dy[((nc * Do + od) * Ho + oh) * Wo + ow]
                plane += b * row
            acc += a * plane
        dx[idx] = acc


# -- nearest upsampling ------------------------------------------------------------------------------------
@cuda.jit
def upsample_nearest3d_forward_kernel(x, y, g):
    """y[n, c, a, b, e] = x[n, c, a // sd, b // sh, e // sw]; g = (N, C, D, H, W, sd, sh, sw)."""
    N, C, D, H, W, sd, sh, sw = g
    Do, Ho, Wo = D * sd, H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * Do * Ho * Wo, cuda.gridsize(1)):
        nc, od, oh, ow = voxel_of(idx, Do, Ho, Wo)
        y[idx] = x[((nc * D + od // sd) * H + oh // sh) * W + ow // sw]


@cuda.jit
def upsample_nearest3d_backward_kernel(dy, dx, g):
    """dx[z, h, w] = the sum of dy over the sd x sh x sw block that copied it (row-major order)."""
    N, C, D, H, W, sd, sh, sw = g
    Do, Ho, Wo = D * sd, H * sh, W * sw
    for idx in range(cuda.grid(1), N * C * D * H * W, cuda.gridsize(1)):
        nc, z, h, w = voxel_of(idx, D, H, W)
        acc = 0.0
        for a in range(sd):
            for b in range(sh):
                for e in range(sw):
                    acc += dy[((nc * Do + z * sd + a) * Ho + h * sh + b) * Wo + w * sw + e]
        dx[idx] = acc


# -- reflect padding ----------------------------------------------------------------------------------------
# g = (N, C, D, H, W, l, r, t, b, f, k): pads in torch's F.pad order (left, right, top, bottom, front, back)
@cuda.jit
def reflect_pad3d_forward_kernel(x, y, g):
    """y (N, C, f+D+k, t+H+b, l+W+r)[.., p, q, u] = x[.., reflect(p - f), reflect(q - t), reflect(u - l)]:
    pad3d_forward's three mirror passes, as one index map per axis (cuda_elementwise.reflect_index)."""
    N, C, D, H, W, l, r, t, b, f, k = g
    Dp, Hp, Wp = D + f + k, H + t + b, W + l + r
    for idx in range(cuda.grid(1), N * C * Dp * Hp * Wp, cuda.gridsize(1)):
        nc, p, q, u = voxel_of(idx, Dp, Hp, Wp)
        y[idx] = x[((nc * D + reflect_index(p - f, D)) * H + reflect_index(q - t, H)) * W
                   + reflect_index(u - l, W)]


@cuda.jit
def reflect_pad3d_backward_kernel(dy, dx, g):
    """dx[z, h, w] = the sum of dy over the padded voxels that copied (z, h, w): at most 3 per axis
    (cuda_elementwise.reflect_source), summed in a fixed order."""
    N, C, D, H, W, l, r, t, b, f, k = g
    Dp, Hp, Wp = D + f + k, H + t + b, W + l + r
    for idx in range(cuda.grid(1), N * C * D * H * W, cuda.gridsize(1)):
        nc, z, h, w = voxel_of(idx, D, H, W)
        acc = 0.0
        for kd in range(3):
            p = reflect_source(kd, z, D, f, k)
            if p < 0:
                continue
            for kr in range(3):
                q = reflect_source(kr, h, H, t, b)
                if q < 0:
                    continue
                for kc in range(3):
                    u = reflect_source(kc, w, W, l, r)
                    if u >= 0:
                        acc += dy[((nc * Dp + p) * Hp + q) * Wp + u]
        dx[idx] = acc

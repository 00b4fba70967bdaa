"""im2col / col2im for Numba-CUDA: the column buffer of the convolutions and its adjoint.

NumPy reference: unet_np/nn/conv.py ``_im2col`` and ``_col2im`` (same layout: cols has shape
(C*kh*kw, N*Ho*Wo), row (c, i, j), column (n, ho, wo)), used by conv2d_forward / conv2d_backward /
conv_transpose2d_forward / conv_transpose2d_backward. The GEMMs around them are in cuda_gemm.py;
unet_np/backends/numba_cuda_backend.py puts the pieces together:

    conv forward        y     = GEMM(W, cols) (+ bias, in the GEMM's output pass)
    conv input grad     dx    = col2im(GEMM(W^T, dy))
    conv weight grad    dW    = GEMM(dy, cols^T)
    convT forward       y     = col2im(GEMM(W^T, x)) (+ bias, in col2im's pass)
    convT input grad    dx    = GEMM(W, im2col(dy))
    convT weight grad   dW    = GEMM(x, im2col(dy)^T)

Geometry tuple ``g`` passed to both kernels:
    (N, C, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw)
where (H, W) is the image, (Ho, Wo) the grid of windows, (ph, pw) the leading (top, left) padding:
window (ho, wo), offset (i, j) reads image pixel (ho*sh + i*dh - ph, wo*sw + j*dw - pw), zero when
that falls outside the image.
"""
from numba import cuda


@cuda.jit
def im2col_kernel(x, cols, g):
    """cols[(c, i, j), (n, ho, wo)] = x[n, c, ho*sh + i*dh - ph, wo*sw + j*dw - pw] (0 in the padding).
    One thread per element of cols (grid-stride); x and cols flat."""
    N, C, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw = g
    ncol = N * Ho * Wo
    total = C * kh * kw * ncol
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        row = idx // ncol
        col = idx - row * ncol
        wo = col % Wo
        t = col // Wo
        ho = t % Ho
        n = t // Ho
        j = row % kw
        t = row // kw
        i = t % kh
        c = t // kh
        h = ho * sh + i * dh - ph
        w = wo * sw + j * dw - pw
        if 0 <= h < H and 0 <= w < W:
            cols[idx] = x[((n * C + c) * H + h) * W + w]
        else:
            cols[idx] = 0


@cuda.jit
def col2im_kernel(dcols, out, g, bias, has_bias):
    """out[n, c, h, w] = sum of the cols entries copied from (n, c, h, w) [+ bias[c]].

    A gather, one thread per image pixel, so no atomics and a deterministic sum: offset i reaches row
    h from window ho = (h + ph - i*dh) / sh when that is a whole number in [0, Ho) (likewise j, wo)."""
    N, C, H, W, kh, kw, Ho, Wo, sh, sw, ph, pw, dh, dw = g
    ncol = N * Ho * Wo
    total = N * C * H * W
    for idx in range(cuda.grid(1), total, cuda.gridsize(1)):
        w = idx % W
        t = idx // W
        h = t % H
        t = t // H
        c = t % C
        n = t // C
        acc = 0.0
        for i in range(kh):
            hh = h + ph - i * dh
            if hh < 0 or hh % sh != 0:
                continue
            ho = hh // sh
            if ho >= Ho:
                continue
            for j in range(kw):
                ww = w + pw - j * dw
                if ww < 0 or ww % sw != 0:
                    continue
                wo = ww // sw
                if wo >= Wo:
                    continue
                acc += dcols[((c * kh + i) * kw + j) * ncol + (n * Ho + ho) * Wo + wo]
        if has_bias:
            acc += bias[c]
        out[idx] = acc

"""Softmax cross-entropy for Numba-CUDA, with class weights, a per-pixel weight map and ignore_index.

NumPy reference: unet_np/nn/loss.py softmax_cross_entropy_forward / softmax_cross_entropy_backward.
One thread per pixel i = (n, m) of the (N, C, M) logits (flat, M = H*W):

  forward    m_i = max_c x_ic,  l_i = log sum_c exp(x_ic - m_i) - (x_i,t_i - m_i)
             w_i = class_weight[t_i] (1 without), 0 where t_i == ignore_index
             num_i = pw_i w_i l_i and den_i = w_i are written out; cuda_reduce.sum_pair_kernel sums
             both and loss = sum num / sum den.
  backward   dx_ic = coef_i (softmax(x_i)_c - [c == t_i]),  coef_i = pw_i w_i / sum den
             (the softmax is recomputed from the logits: nothing of size N*C*M is cached).

The per-pixel arithmetic is done in float64 whatever the logits' dtype.
"""
import math

from numba import cuda


@cuda.jit(device=True, inline=True)
def _pixel_weight(t, tgt, cw, has_cw, pw, has_pw, ignore, i):
    if tgt == ignore:
        return 0.0
    w = cw[tgt] * 1.0 if has_cw else 1.0
    if has_pw:
        w *= pw[i]
    return w


@cuda.jit
def ce_forward_kernel(x, t, cw, has_cw, pw, has_pw, ignore, N, C, M, num, den):
    for i in range(cuda.grid(1), N * M, cuda.gridsize(1)):
        n = i // M
        m = i - n * M
        tgt = t[i]
        if tgt == ignore:
            num[i] = 0
            den[i] = 0
            continue
        base = n * C * M + m
        mx = -math.inf
        for c in range(C):
            v = x[base + c * M]
            if v > mx:
                mx = v
        s = 0.0
        for c in range(C):
            s += math.exp(x[base + c * M] - mx)
        nll = math.log(s) - (x[base + tgt * M] - mx)
        w = cw[tgt] * 1.0 if has_cw else 1.0
        den[i] = w
        if has_pw:
            w *= pw[i]
        num[i] = w * nll


@cuda.jit
def ce_backward_kernel(x, t, cw, has_cw, pw, has_pw, ignore, N, C, M, inv_den, dx):
    for i in range(cuda.grid(1), N * M, cuda.gridsize(1)):
        n = i // M
        m = i - n * M
        tgt = t[i]
        base = n * C * M + m
        coef = _pixel_weight(t, tgt, cw, has_cw, pw, has_pw, ignore, i) * inv_den
        if coef == 0:
            for c in range(C):
                dx[base + c * M] = 0
            continue
        mx = -math.inf
        for c in range(C):
            v = x[base + c * M]
            if v > mx:
                mx = v
        s = 0.0
        for c in range(C):
            s += math.exp(x[base + c * M] - mx)
        for c in range(C):
            p = math.exp(x[base + c * M] - mx) / s
            dx[base + c * M] = coef * (p - 1.0) if c == tgt else coef * p

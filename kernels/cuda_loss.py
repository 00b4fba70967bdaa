"""Losses for Numba-CUDA: softmax cross-entropy (class weights, a per-pixel weight map, ignore_index),
binary cross-entropy with logits (pos_weight) and soft Dice (softmax and sigmoid), forward and backward.

NumPy references, to read side by side (unet_np/nn/loss.py):
  ce_forward_kernel, ce_backward_kernel           softmax_cross_entropy_forward / _backward
  bce_forward_kernel, bce_backward_kernel         bce_with_logits_forward / _backward
  softmax_stats_kernel, softmax_dice_sums_kernel,
  dice_finish_kernel, softmax_dice_backward_kernel    softmax_dice_forward / _backward
  sigmoid_dice_sums_kernel, dice_finish_kernel,
  sigmoid_dice_backward_kernel                    sigmoid_dice_forward / _backward

Cross-entropy. One thread per pixel i = (n, m) of the (N, C, M) logits (flat, M = H*W):

  forward    m_i = max_c x_ic,  l_i = log sum_c exp(x_ic - m_i) - (x_i,t_i - m_i)
             w_i = class_weight[t_i] (1 without), 0 where t_i == ignore_index
             num_i = pw_i w_i l_i and den_i = w_i are written out; cuda_reduce.sum_pair_kernel sums
             both and loss = sum num / sum den.
  backward   dx_ic = coef_i (softmax(x_i)_c - [c == t_i]),  coef_i = pw_i w_i / sum den
             (the softmax is recomputed from the logits: nothing of size N*C*M is cached).

Binary cross-entropy with logits. One thread per element i (flat, any shape):

  forward    l_i = (1 - t_i) x_i + lw_i softplus(-x_i),  lw_i = 1 + (pw_i - 1) t_i (1 without pos_weight)
             softplus(-x) = max(-x, 0) + log1p(exp(-|x|)); l is written out and
             cuda_reduce.channel_reduce_kernel sums it; loss = sum l / n.
  backward   dx_i = ((1 - t_i) - lw_i s(-x_i)) / n,  s(-x) = e / (1 + e) for x >= 0, 1 / (1 + e)
             otherwise (e = exp(-|x|)).
  pos_weight broadcasts against the target as in NumPy (trailing axes line up): element i reads
  pw[sum_k idx_k(i) * pstride_k], with dims the target's shape and pstride_k = 0 on pos_weight's
  size-1 (or missing) axes (_broadcast_index).

Soft Dice. Per class c, summed over the batch and every pixel together (sums (3, C) in float64):
  I_c = sum_i m_i p_ic y_ic,  P_c = sum_i m_i p_ic,  T_c = sum_i m_i y_ic
  (softmax: p = softmax over C, y one-hot of the class target, m_i = 0 on ignored pixels;
   sigmoid: p = s(x), y the float target, m = 1, each channel its own class)

  softmax_stats_kernel       one thread per pixel: m_i = max_c x_ic, s_i = sum_c exp(x_ic - m_i)
  *_dice_sums_kernel(T)      one block per class, T threads: the three sums, tree-reduced in shared
                             memory as cuda_reduce does
  dice_finish_kernel         one thread: D_c = (2 I_c + smooth) / den_c, den_c = max(P_c + T_c + smooth,
                             eps); loss = 1 - sum_{c >= first} D_c / k (k = C - first; first = 1 leaves the
                             background class out); beta_c = D_c / (k den_c) (0 where the eps clamp is
                             active), alpha_c = -2 / (k den_c) (both 0 for c < first)
  softmax_dice_backward      one thread per pixel: r_i = sum_c p_ic beta_c + alpha_t p_it,
                             dx_ic = m_i (p_ic (beta_c - r_i) + [c == t_i] alpha_t p_it)
  sigmoid_dice_backward      one thread per element: dx = (beta_c + alpha_c t) p (1 - p)

The per-pixel arithmetic is done in float64 whatever the logits' dtype.
"""
import math

from numba import cuda, float64


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


# -- binary cross-entropy with logits ----------------------------------------------------------------
@cuda.jit(device=True, inline=True)
def _broadcast_index(i, dims, pstride):
    """The index into a broadcast operand of flat element i of an array of shape dims."""
    j = 0
    r = i
    for k in range(dims.size - 1, -1, -1):
        d = dims[k]
        q = r // d
        j += (r - q * d) * pstride[k]
        r = q
    return j


@cuda.jit(device=True, inline=True)
def _bce_weight(pw, has_pw, dims, pstride, i, tt):
    """lw_i = 1 + (pw_i - 1) t_i (1 without pos_weight)."""
    if not has_pw:
        return 1.0
    return (pw[_broadcast_index(i, dims, pstride)] - 1.0) * tt + 1.0


@cuda.jit
def bce_forward_kernel(x, t, pw, has_pw, dims, pstride, ell):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i] * 1.0
        tt = t[i] * 1.0
        sp = max(-v, 0.0) + math.log1p(math.exp(-abs(v)))       # softplus(-x), no overflow
        ell[i] = (1.0 - tt) * v + _bce_weight(pw, has_pw, dims, pstride, i, tt) * sp


@cuda.jit
def bce_backward_kernel(x, t, pw, has_pw, dims, pstride, inv_n, dx):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i] * 1.0
        tt = t[i] * 1.0
        e = math.exp(-abs(v))
        s_neg = e / (1.0 + e) if v >= 0 else 1.0 / (1.0 + e)     # s(-x), stable on both sides
        dx[i] = ((1.0 - tt) - _bce_weight(pw, has_pw, dims, pstride, i, tt) * s_neg) * inv_n


# -- soft Dice -----------------------------------------------------------------------------------------
@cuda.jit
def softmax_stats_kernel(x, N, C, M, mx, s):
    """mx[i] = max_c x_ic, s[i] = sum_c exp(x_ic - mx[i]) for every pixel i = (n, m)."""
    for i in range(cuda.grid(1), N * M, cuda.gridsize(1)):
        n = i // M
        base = n * C * M + i - n * M
        m = -math.inf
        for c in range(C):
            v = x[base + c * M]
            if v > m:
                m = v
        acc = 0.0
        for c in range(C):
            acc += math.exp(x[base + c * M] - m)
        mx[i] = m
        s[i] = acc


@cuda.jit(device=True, inline=True)
def _tree_sum3(a, b, d, tid, threads):
    """a[0], b[0], d[0] = the sums of a, b, d (shared arrays of ``threads`` entries, a power of 2)."""
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if tid < half:
            a[tid] += a[tid + half]
            b[tid] += b[tid + half]
            d[tid] += d[tid + half]
        cuda.syncthreads()
        half //= 2


@cuda.jit(device=True, inline=True)
def _sigmoid(v):
    """s(v) in float64, exp never of a positive argument."""
    e = math.exp(-abs(v * 1.0))
    return 1.0 / (1.0 + e) if v >= 0 else e / (1.0 + e)


_cache = {}


def softmax_dice_sums_kernel(threads):
    """kernel[blocks, threads](x, t, mx, s, ignore, N, C, M, sums): sums[c], sums[C + c],
    sums[2C + c] = I_c, P_c, T_c of the softmax Dice (mx, s from softmax_stats_kernel). Block b handles
    classes b, b + gridDim, ... ."""
    key = ("softmax", threads)
    if key in _cache:
        return _cache[key]
    T = threads

    @cuda.jit
    def kernel(x, t, mx, s, ignore, N, C, M, sums):
        pi = cuda.shared.array(T, dtype=float64)
        pp = cuda.shared.array(T, dtype=float64)
        pt = cuda.shared.array(T, dtype=float64)
        tid = cuda.threadIdx.x
        for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
            si = 0.0
            sp = 0.0
            st = 0.0
            for i in range(tid, N * M, T):
                tgt = t[i]
                if tgt == ignore:
                    continue
                n = i // M
                p = math.exp(x[(n * C + c) * M + i - n * M] - mx[i]) / s[i]
                sp += p
                if tgt == c:
                    si += p
                    st += 1.0
            pi[tid] = si
            pp[tid] = sp
            pt[tid] = st
            _tree_sum3(pi, pp, pt, tid, T)
            if tid == 0:
                sums[c] = pi[0]
                sums[C + c] = pp[0]
                sums[2 * C + c] = pt[0]
            cuda.syncthreads()

    _cache[key] = kernel
    return kernel


def sigmoid_dice_sums_kernel(threads):
    """kernel[blocks, threads](x, t, N, C, M, sums): sums[c], sums[C + c], sums[2C + c] = I_c, P_c,
    T_c of the sigmoid Dice, x and t flat (N, C, M)."""
    key = ("sigmoid", threads)
    if key in _cache:
        return _cache[key]
    T = threads

    @cuda.jit
    def kernel(x, t, N, C, M, sums):
        pi = cuda.shared.array(T, dtype=float64)
        pp = cuda.shared.array(T, dtype=float64)
        pt = cuda.shared.array(T, dtype=float64)
        tid = cuda.threadIdx.x
        for c in range(cuda.blockIdx.x, C, cuda.gridDim.x):
            si = 0.0
            sp = 0.0
            st = 0.0
            for e in range(tid, N * M, T):
                n = e // M
                j = (n * C + c) * M + e - n * M
                p = _sigmoid(x[j])
                tt = t[j] * 1.0
                si += p * tt
                sp += p
                st += tt
            pi[tid] = si
            pp[tid] = sp
            pt[tid] = st
            _tree_sum3(pi, pp, pt, tid, T)
            if tid == 0:
                sums[c] = pi[0]
                sums[C + c] = pp[0]
                sums[2 * C + c] = pt[0]
            cuda.syncthreads()

    _cache[key] = kernel
    return kernel


@cuda.jit
def dice_finish_kernel(sums, C, smooth, eps, first, coef, loss):
    """One thread: coef[c] = beta_c, coef[C + c] = alpha_c, loss[0] = the Dice loss (see the top)."""
    if cuda.grid(1) != 0:
        return
    k = C - first
    total = 0.0
    for c in range(C):
        raw = sums[C + c] + sums[2 * C + c] + smooth
        live = raw >= eps
        den = raw if live else eps
        D = (2.0 * sums[c] + smooth) / den
        beta = 0.0
        alpha = 0.0
        if c >= first:
            total += D
            a = 1.0 / (k * den)
            if live:
                beta = a * D
            alpha = -2.0 * a
        coef[c] = beta
        coef[C + c] = alpha
    loss[0] = 1.0 - total / k


@cuda.jit
def softmax_dice_backward_kernel(x, t, mx, s, ignore, coef, N, C, M, dx):
    for i in range(cuda.grid(1), N * M, cuda.gridsize(1)):
        n = i // M
        base = n * C * M + i - n * M
        tgt = t[i]
        if tgt == ignore:
            for c in range(C):
                dx[base + c * M] = 0
            continue
        m = mx[i]
        inv = 1.0 / s[i]
        at = coef[C + tgt] * (math.exp(x[base + tgt * M] - m) * inv)     # alpha_t p_it
        r = at
        for c in range(C):
            r += math.exp(x[base + c * M] - m) * inv * coef[c]
        for c in range(C):
            v = math.exp(x[base + c * M] - m) * inv * (coef[c] - r)
            if c == tgt:
                v += at
            dx[base + c * M] = v


@cuda.jit
def sigmoid_dice_backward_kernel(x, t, coef, C, M, dx):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        c = (i // M) % C
        p = _sigmoid(x[i])
        dx[i] = (coef[c] + coef[C + c] * t[i]) * p * (1.0 - p)

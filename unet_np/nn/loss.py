"""Losses: softmax cross-entropy (with class weights, ignore_index and a per-pixel weight map),
binary cross-entropy with logits, and soft Dice.

Each primitive is a pair: ``<op>_forward(logits, target, ...) -> (loss, cache)`` returns the loss as
a 0-d array in the logits' dtype, and ``<op>_backward(cache) -> dlogits`` returns d(loss)/d(logits)
(the upstream gradient of a scalar loss is 1). Every primitive works on any number of spatial axes:
it flattens ``(N, C, *S)`` to ``(N, C, M)`` and restores the shape on the way out. The loss classes at
the bottom check their inputs, call the primitives through ``self.ops`` and return a Python float.

The primitives pick the array module of their input (NumPy, or CuPy for a CuPy array) and use only
functions both provide, so a GPU backend may start from them (only the NumPy path is tested here).
Derivations in long form:
docs/backprop.md#softmax-and-cross-entropy, docs/backprop.md#binary-cross-entropy-with-logits and
docs/backprop.md#soft-dice.
"""
import numpy as np

from .module import Module, check_input

OPS = ("softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
       "bce_with_logits_forward", "bce_with_logits_backward",
       "softmax_dice_forward", "softmax_dice_backward",
       "sigmoid_dice_forward", "sigmoid_dice_backward")


def _xp(a):
    """The array module of ``a``: cupy for a CuPy array, numpy otherwise."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def _flat(logits):
    """(N, C, *S) -> (N, C, M) view (a copy only if the input is not contiguous)."""
    return logits.reshape(logits.shape[0], logits.shape[1], -1)


def _softmax_parts(x, xp):
    """For x (N, C, M): z = x - max_c x (so z <= 0), e = exp(z), s = sum_c e (s >= 1: no overflow,
    no underflow to 0, for logits of any magnitude)."""
    z = x - x.max(axis=1, keepdims=True)
    e = xp.exp(z)
    return z, e, e.sum(axis=1)


# -- softmax cross-entropy ---------------------------------------------------------------------------

def softmax_cross_entropy_forward(logits, target, class_weight=None, ignore_index=-100, pixel_weight=None):
    """Mean weighted cross-entropy of softmax(logits) against integer class indices.

    logits: (N, C, *S) float; target: (N, *S) integer in [0, C) or ``ignore_index`` (already checked);
    class_weight: (C,) in the logits' dtype, or None; pixel_weight: (N, *S) in the logits' dtype, or
    None.  Returns (loss, cache), loss a 0-d array in the logits' dtype:

        l_i = -log softmax(x_i)[t_i] = log sum_c exp(x_ic - m_i) - (x_i,t_i - m_i),  m_i = max_c x_ic
        w_i = class_weight[t_i] (1 without weights), 0 where t_i == ignore_index
        loss = sum_i pw_i w_i l_i / sum_i w_i          (pw = 1 without a pixel weight map)

    With pw = 1 this is PyTorch's reduction='mean'. The normaliser deliberately leaves pw out, so a
    weight map scales each pixel's share of the loss without re-normalising it away. When every
    pixel is ignored (sum_i w_i = 0) the loss is NaN, as in PyTorch.
    """
    xp = _xp(logits)
    N, C = logits.shape[:2]
    x = _flat(logits)                                    # (N, C, M)
    t = target.reshape(N, -1)                            # (N, M)
    valid = t != ignore_index
    t0 = xp.where(valid, t, 0)                           # a safe index where the pixel is ignored
    z, e, s = _softmax_parts(x, xp)                      # (N, C, M), (N, C, M), (N, M)
    z_t = xp.take_along_axis(z, t0[:, None, :], axis=1)[:, 0]
    nll = xp.log(s) - z_t                                # (N, M), -log p_t >= 0
    if class_weight is None:
        w = valid.astype(logits.dtype)
    else:
        w = class_weight[t0] * valid
    denom = w.sum()                                      # sum_i w_i, 0-d
    lw = w if pixel_weight is None else w * pixel_weight.reshape(N, -1)
    if float(denom) == 0:
        loss = xp.asarray(xp.nan, dtype=logits.dtype)
        coef = xp.zeros_like(lw)                         # PyTorch: NaN loss, zero gradient
    else:
        loss = (lw * nll).sum() / denom
        coef = lw / denom                                # (N, M): d loss / d l_i
    return loss, (e, s, t0, coef, logits.shape)


def softmax_cross_entropy_backward(cache):
    """d loss / d logits, shape (N, C, *S), in the logits' dtype.

    l_i = log sum_c exp(x_ic) - x_i,t_i, so d l_i / d x_ic = softmax(x_i)_c - [c == t_i] = p_ic - y_ic.
    The loss is sum_i coef_i l_i with coef_i = pw_i w_i / sum_j w_j (0 on ignored pixels), hence
        dlogits_ic = coef_i (p_ic - y_ic),   p_ic = e_ic / s_i.
    Long form: docs/backprop.md#softmax-and-cross-entropy.
    """
    e, s, t0, coef, shape = cache
    xp = _xp(e)
    N, _, M = e.shape
    dx = e * (coef / s)[:, None, :]                      # coef_i p_ic, one pass over (N, C, M)
    dx[xp.arange(N)[:, None], t0, xp.arange(M)[None, :]] -= coef   # - coef_i y_ic
    return dx.reshape(shape)


# -- binary cross-entropy with logits ----------------------------------------------------------------

def bce_with_logits_forward(logits, target, pos_weight=None):
    """Mean binary cross-entropy of sigmoid(logits) against float targets, without overflow.

    logits, target: same shape (any); pos_weight: None or an array that broadcasts to the target's
    shape (PyTorch's rule: trailing axes line up). Returns (loss, cache), loss 0-d in the logits' dtype:

        l = -[pw t log s(x) + (1 - t) log(1 - s(x))] = (1 - t) x + lw softplus(-x),  lw = 1 + (pw - 1) t
        softplus(-x) = -log s(x) = max(-x, 0) + log(1 + exp(-|x|))     (exp never sees a positive power)

    Without pos_weight l = max(x, 0) - x t + log(1 + exp(-|x|)). loss = mean over every element.
    """
    xp = _xp(logits)
    e = xp.exp(-xp.abs(logits))                          # in (0, 1]
    sp = xp.maximum(-logits, 0) + xp.log1p(e)            # softplus(-x)
    lw = None if pos_weight is None else (pos_weight - 1) * target + 1
    ell = (1 - target) * logits + (sp if lw is None else lw * sp)
    return ell.sum() / logits.size, (logits, target, lw, e)


def bce_with_logits_backward(cache):
    """d loss / d logits, same shape as the logits.

    d/dx [(1 - t) x + lw softplus(-x)] = (1 - t) - lw s(-x), with s(-x) = 1 - s(x); divided by the
    element count for the mean. Without pos_weight (lw = 1) this is (s(x) - t) / n.
    Long form: docs/backprop.md#binary-cross-entropy-with-logits.
    """
    x, t, lw, e = cache
    xp = _xp(x)
    s_neg = xp.where(x >= 0, e / (1 + e), 1 / (1 + e))   # s(-x), stable on both sides
    d = (1 - t) - (s_neg if lw is None else lw * s_neg)
    return d * (1 / x.size)


# -- soft Dice ---------------------------------------------------------------------------------------

def _dice_terms(inter, psum, tsum, smooth, eps):
    """Per-class Dice ratio D_c = (2 I_c + smooth) / max(P_c + T_c + smooth, eps), and whether the
    clamp is inactive (where it is active D_c does not depend on P_c)."""
    raw = psum + tsum + smooth
    den = raw if eps <= 0 else _xp(raw).maximum(raw, eps)
    return (2 * inter + smooth) / den, den, raw >= eps


def softmax_dice_forward(logits, target, smooth=1.0, eps=1e-7, ignore_index=-100, include_background=True):
    """Multi-class soft Dice loss on softmax probabilities against integer class indices.

    logits: (N, C, *S) float; target: (N, *S) integer in [0, C) or ``ignore_index`` (checked).
    With p = softmax over C, y the one-hot target and m_i = 0 on ignored pixels (1 elsewhere), the
    sums run over the batch and every pixel together:
        I_c = sum_i m_i p_ic y_ic,   P_c = sum_i m_i p_ic,   T_c = sum_i m_i y_ic
        D_c = (2 I_c + smooth) / max(P_c + T_c + smooth, eps)
        loss = 1 - mean_{c in K} D_c,   K = all classes, or 1..C-1 when include_background is False.
    Returns (loss, cache), loss 0-d in the logits' dtype.
    """
    xp = _xp(logits)
    dt = logits.dtype
    N, C = logits.shape[:2]
    x = _flat(logits)
    t = target.reshape(N, -1)
    valid = t != ignore_index
    masked = not bool(valid.all())
    t0 = xp.where(valid, t, 0)
    _, e, s = _softmax_parts(x, xp)
    p = e / s[:, None, :]                                # (N, C, M)
    p_t = xp.take_along_axis(p, t0[:, None, :], axis=1)[:, 0]    # (N, M): p of the true class
    if masked:
        m = valid.astype(dt)
        psum = xp.matmul(p, m[:, :, None]).sum(axis=0)[:, 0]      # P_c
        idx, wts = t0[valid], p_t[valid]
    else:
        m = None
        psum = p.sum(axis=(0, 2))
        idx, wts = t0.reshape(-1), p_t.reshape(-1)
    inter = xp.bincount(idx, weights=wts, minlength=C).astype(dt)     # I_c
    tsum = xp.bincount(idx, minlength=C).astype(dt)                   # T_c
    D, den, live = _dice_terms(inter, psum, tsum, smooth, eps)
    sel = xp.ones(C, dtype=dt)
    if not include_background:
        sel[0] = 0
    k = C if include_background else C - 1
    loss = 1 - (D * sel).sum() / k
    # d loss / d p_ic = m_i (beta_c + alpha_c y_ic), see softmax_dice_backward
    a = sel / (k * den)
    beta = a * D * live
    alpha = -2 * a
    return loss, (p, p_t, t0, m, beta, alpha, logits.shape)


def softmax_dice_backward(cache):
    """d loss / d logits, shape (N, C, *S).

    With a_c = [c in K] / (|K| den_c): d loss / d I_c = -2 a_c, d loss / d P_c = a_c D_c (0 where the
    eps clamp is active), d loss / d T_c is irrelevant (T is constant). So
        g_ic = d loss / d p_ic = m_i (beta_c + alpha_c y_ic),   beta_c = a_c D_c,  alpha_c = -2 a_c,
    and through the softmax dx_ic = p_ic (g_ic - sum_k p_ik g_ik), where
        sum_k p_ik g_ik = m_i (sum_k p_ik beta_k + alpha_t p_it) = m_i r_i.
    Long form: docs/backprop.md#soft-dice.
    """
    p, p_t, t0, m, beta, alpha, shape = cache
    xp = _xp(p)
    N, _, M = p.shape
    at = alpha[t0] * p_t                                 # (N, M): alpha_{t_i} p_{i t_i}
    r = xp.matmul(beta, p) + at                          # (N, M)
    dx = p * (beta[None, :, None] - r[:, None, :])
    dx[xp.arange(N)[:, None], t0, xp.arange(M)[None, :]] += at
    if m is not None:
        dx *= m[:, None, :]
    return dx.reshape(shape)


def sigmoid_dice_forward(logits, target, smooth=1.0, eps=1e-7):
    """Soft Dice loss on sigmoid probabilities, each channel a binary (foreground) mask.

    logits, target: (N, C, *S), target float in [0, 1] (C = 1 for the binary case). With p = s(x),
    sums over the batch and every pixel, per channel c:
        I_c = sum p t,  P_c = sum p,  T_c = sum t,  D_c = (2 I_c + smooth) / max(P_c + T_c + smooth, eps)
        loss = 1 - mean_c D_c.
    Returns (loss, cache), loss 0-d in the logits' dtype.
    """
    xp = _xp(logits)
    C = logits.shape[1]
    x = _flat(logits)
    t = _flat(target)
    e = xp.exp(-xp.abs(x))
    p = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))       # s(x), stable
    inter = (p * t).sum(axis=(0, 2))
    D, den, live = _dice_terms(inter, p.sum(axis=(0, 2)), t.sum(axis=(0, 2)), smooth, eps)
    loss = 1 - D.sum() / C
    a = 1 / (C * den)
    return loss, (p, t, a * D * live, -2 * a, logits.shape)


def sigmoid_dice_backward(cache):
    """d loss / d logits, shape (N, C, *S).

    d loss / d p_ic = beta_c + alpha_c t_ic with beta_c = D_c / (C den_c) (0 where the eps clamp is
    active) and alpha_c = -2 / (C den_c); then ds/dx = s (1 - s).
    Long form: docs/backprop.md#soft-dice.
    """
    p, t, beta, alpha, shape = cache
    g = beta[None, :, None] + alpha[None, :, None] * t
    return (g * p * (1 - p)).reshape(shape)


# -- input checks --------------------------------------------------------------------------------------

def _check_logits(owner, logits, xp, min_ndim=2):
    x = check_input(owner, logits, ndim=None, xp=xp)
    if x.ndim < min_ndim:
        raise ValueError(f"{owner}: expected logits of shape (N, C, H, W) or (N, C), got {x.ndim}-D "
                         f"with shape {tuple(x.shape)}")
    return x


def _array_like(owner, what, a):
    if not hasattr(a, "shape") or not hasattr(a, "dtype") or isinstance(a, (str, bytes)):
        raise TypeError(f"{owner}: {what} must be an array, got {type(a).__name__}")


_NO_IGNORE = np.iinfo(np.int64).min   # an ignore_index no int64 target can hold: nothing is ignored

_POSITION_NAMES = {1: "(n)", 2: "(n, w)", 3: "(n, h, w)", 4: "(n, d, h, w)"}


def _check_class_target(owner, target, logits, ignore_index, xp):
    """Integer class indices of shape (N, *S) with values in [0, C) or ignore_index (None: no value is
    ignored), as int64."""
    _array_like(owner, "target", target)
    kind = np.dtype(target.dtype).kind
    if kind not in "iu":
        what = {"f": "float", "b": "bool", "c": "complex"}.get(kind, str(target.dtype))
        raise TypeError(f"{owner}: target must hold integer class indices, got {what} dtype "
                        f"{target.dtype} (convert a label map with target.astype(np.int64))")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{owner}: target shape {tuple(target.shape)} does not fit logits shape "
                         f"{tuple(logits.shape)}: expected target shape {expected}")
    t = xp.asarray(target).astype(xp.int64, copy=False)
    C = logits.shape[1]
    bad = (t < 0) | (t >= C)
    if ignore_index is not None:
        bad &= t != ignore_index
    if bool(bad.any()):
        first = int(bad.reshape(-1).argmax())
        pos = tuple(int(i) for i in np.unravel_index(first, t.shape))
        names = _POSITION_NAMES.get(t.ndim, "index")
        raise ValueError(f"{owner}: target value {int(t[pos])} at position {names} = {pos} is not a "
                         f"class index in [0, {C})"
                         + ("" if ignore_index is None else f" nor ignore_index={ignore_index}"))
    return t


def _check_float_target(owner, target, logits, xp):
    """A float target of exactly the logits' shape, cast to the logits' dtype."""
    _array_like(owner, "target", target)
    kind = np.dtype(target.dtype).kind
    if kind != "f":
        what = {"i": "integer", "u": "unsigned integer", "b": "bool", "c": "complex"}.get(
            kind, str(target.dtype))
        raise TypeError(f"{owner}: target must be a float array (probabilities in [0, 1]), got {what} "
                        f"dtype {target.dtype} (convert with target.astype(logits.dtype))")
    if tuple(target.shape) != tuple(logits.shape):
        raise ValueError(f"{owner}: target shape {tuple(target.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}")
    return xp.asarray(target, dtype=logits.dtype)


def _weight_vector(owner, name, weight):
    """An optional 1-D real weight as a float64 NumPy array (cast to the logits' dtype per call)."""
    if weight is None:
        return None
    w = np.asarray(weight.get() if hasattr(weight, "get") else weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"{owner}: {name} must be a real array, got dtype {w.dtype}")
    return w.astype(np.float64)


def _int_or_none(owner, name, value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    return int(value)


class _Loss(Module):
    """A loss: ``forward(logits, target, ...) -> float`` and ``backward(dy=1.0) -> dlogits``.

    ``dtype`` is accepted for uniformity with the layers; a loss computes in the dtype of the logits
    it is given, and its gradient has that dtype.
    """

    def backward(self, dy=1.0):
        """d(loss)/d(logits). dy: the upstream gradient of the scalar loss (1 by default; pass a
        factor to weight this loss inside a sum of losses)."""
        if np.ndim(dy) != 0:
            raise ValueError(f"{type(self).__name__}.backward: dy must be a scalar, got shape {np.shape(dy)}")
        dx = self._backward(self._take())
        return dx if float(dy) == 1.0 else dx * float(dy)


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy on logits (N, C, H, W) (or (N, C)) and integer targets (N, H, W) (or (N,)).

    weight: optional class weights (C,); ignore_index: a target value whose pixels count for nothing.
    The mean is PyTorch's: sum_i w_{t_i} l_i / sum_i w_{t_i} over the pixels not ignored.
    ``forward(logits, target, pixel_weight=None)``: pixel_weight (N, H, W) multiplies each pixel's
    loss (the U-Net paper's weight map w(x)); the normaliser stays sum_i w_{t_i}, so
        loss = sum_i pw_i w_{t_i} l_i / sum_i w_{t_i},
    and pw = 1 gives PyTorch's value. If every pixel is ignored the loss is NaN (as in PyTorch) and
    the gradient is zero.
    """

    def __init__(self, weight=None, ignore_index=-100, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        self.weight = _weight_vector("CrossEntropyLoss", "weight", weight)
        if self.weight is not None and (self.weight.ndim != 1 or self.weight.size == 0):
            raise ValueError(f"CrossEntropyLoss: weight must be a 1-D array of one weight per class, "
                             f"got shape {self.weight.shape}")
        self.ignore_index = _int_or_none("CrossEntropyLoss", "ignore_index", ignore_index)
        if self.ignore_index is None:
            raise TypeError("CrossEntropyLoss: ignore_index must be an int, got None")

    def forward(self, logits, target, pixel_weight=None):
        x = _check_logits("CrossEntropyLoss", logits, self.xp)
        t = _check_class_target("CrossEntropyLoss", target, x, self.ignore_index, self.xp)
        cw = None
        if self.weight is not None:
            if self.weight.shape[0] != x.shape[1]:
                raise ValueError(f"CrossEntropyLoss: weight has {self.weight.shape[0]} entries but the "
                                 f"logits have {x.shape[1]} classes (shape {tuple(x.shape)})")
            cw = self.xp.asarray(self.weight, dtype=x.dtype)
        pw = None
        if pixel_weight is not None:
            _array_like("CrossEntropyLoss", "pixel_weight", pixel_weight)
            if np.dtype(pixel_weight.dtype).kind not in "fiu":
                raise TypeError(f"CrossEntropyLoss: pixel_weight must be real numbers, got dtype "
                                f"{pixel_weight.dtype}")
            if tuple(pixel_weight.shape) != tuple(t.shape):
                raise ValueError(f"CrossEntropyLoss: pixel_weight shape {tuple(pixel_weight.shape)} does "
                                 f"not match target shape {tuple(t.shape)}")
            pw = self.xp.asarray(pixel_weight, dtype=x.dtype)
        loss, cache = self.ops.softmax_cross_entropy_forward(x, t, cw, self.ignore_index, pw)
        self._keep(cache)
        return float(loss)

    def _backward(self, cache):
        return self.ops.softmax_cross_entropy_backward(cache)

    def extra_repr(self):
        w = "" if self.weight is None else f"weight={self.weight.tolist()}, "
        return f"{w}ignore_index={self.ignore_index}"


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross-entropy in one stable step, mean over every element.

    logits and a float target of the same shape (any). pos_weight (optional) weighs the positive
    term, l = -[pw t log s(x) + (1 - t) log(1 - s(x))], and broadcasts against the target exactly as
    in PyTorch: trailing axes line up, so a (C,) pos_weight meets the *last* axis (W) of an
    (N, C, H, W) target; give per-channel weights as shape (C, 1, 1).
    """

    def __init__(self, pos_weight=None, backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        self.pos_weight = _weight_vector("BCEWithLogitsLoss", "pos_weight", pos_weight)

    def forward(self, logits, target):
        x = _check_logits("BCEWithLogitsLoss", logits, self.xp, min_ndim=0)
        t = _check_float_target("BCEWithLogitsLoss", target, x, self.xp)
        pw = None
        if self.pos_weight is not None:
            try:
                shape = np.broadcast_shapes(self.pos_weight.shape, tuple(t.shape))
            except ValueError:
                shape = None
            if shape != tuple(t.shape):
                raise ValueError(f"BCEWithLogitsLoss: pos_weight of shape {self.pos_weight.shape} does not "
                                 f"broadcast to target shape {tuple(t.shape)} (trailing axes line up; for "
                                 f"per-channel weights on (N, C, H, W) use shape (C, 1, 1))")
            pw = self.xp.asarray(self.pos_weight, dtype=x.dtype)
        loss, cache = self.ops.bce_with_logits_forward(x, t, pw)
        self._keep(cache)
        return float(loss)

    def _backward(self, cache):
        return self.ops.bce_with_logits_backward(cache)


class DiceLoss(_Loss):
    """Soft Dice loss, 1 - mean over classes of (2 I_c + smooth) / (P_c + T_c + smooth).

    I_c = sum p_c y_c, P_c = sum p_c, T_c = sum y_c, summed over the batch and all pixels together.
    mode='softmax': logits (N, C, H, W), integer targets (N, H, W); p = softmax over C, y one-hot;
    pixels equal to ignore_index take no part; include_background=False leaves class 0 out of the mean
    (the softmax still runs over every class). mode='sigmoid': logits and float targets (N, C, H, W)
    (C = 1 for a binary mask), p = sigmoid, each channel its own foreground class.

    smooth (>= 0) is added to numerator and denominator: it keeps the ratio defined when a class is
    absent from both prediction and target (then D_c -> 1, not 0/0) and softens the gradient of small
    classes. eps (>= 0) is a floor on the denominator, max(P_c + T_c + smooth, eps); it only binds when
    smooth is 0 (or below eps). smooth and eps may not both be 0. ignore_index=None ignores nothing.
    """

    def __init__(self, smooth=1.0, eps=1e-7, mode="softmax", include_background=True, ignore_index=-100,
                 backend="numpy", dtype=None):
        super().__init__(backend=backend, dtype=dtype)
        if mode not in ("softmax", "sigmoid"):
            raise ValueError(f"DiceLoss: mode must be 'softmax' or 'sigmoid', got {mode!r}")
        for name, v in (("smooth", smooth), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"DiceLoss: {name} must be a number, got {type(v).__name__}")
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"DiceLoss: {name} must be a finite number >= 0, got {v}")
        if smooth == 0 and eps == 0:
            raise ValueError("DiceLoss: smooth and eps cannot both be 0 (a class absent from prediction "
                             "and target would give 0/0)")
        if mode == "sigmoid" and not include_background:
            raise ValueError("DiceLoss: include_background=False applies to mode='softmax' only; in "
                             "sigmoid mode every channel is a foreground class")
        self.smooth, self.eps, self.mode = float(smooth), float(eps), mode
        self.include_background = bool(include_background)
        self.ignore_index = _int_or_none("DiceLoss", "ignore_index", ignore_index)

    def forward(self, logits, target):
        if self.mode == "softmax":
            x = _check_logits("DiceLoss", logits, self.xp)
            if not self.include_background and x.shape[1] < 2:
                raise ValueError(f"DiceLoss: include_background=False needs at least 2 classes, got "
                                 f"logits of shape {tuple(x.shape)}")
            t = _check_class_target("DiceLoss", target, x, self.ignore_index, self.xp)
            ignore = _NO_IGNORE if self.ignore_index is None else self.ignore_index
            loss, cache = self.ops.softmax_dice_forward(x, t, self.smooth, self.eps, ignore,
                                                        self.include_background)
        else:
            x = _check_logits("DiceLoss", logits, self.xp)
            t = _check_float_target("DiceLoss", target, x, self.xp)
            loss, cache = self.ops.sigmoid_dice_forward(x, t, self.smooth, self.eps)
        self._keep(cache)
        return float(loss)

    def _backward(self, cache):
        if self.mode == "softmax":
            return self.ops.softmax_dice_backward(cache)
        return self.ops.sigmoid_dice_backward(cache)

    def extra_repr(self):
        return (f"smooth={self.smooth}, eps={self.eps}, mode={self.mode!r}, "
                f"include_background={self.include_background}, ignore_index={self.ignore_index}")

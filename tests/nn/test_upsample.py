import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, strategies as st

from unet_np import gradcheck
from unet_np.nn import Upsample
from unet_np.nn.upsample import upsample_bilinear2d_backward, upsample_bilinear2d_forward
from tests.helpers import TOL32, TOL64, n, rel_err, t

DTYPES = [(np.float64, TOL64), (np.float32, TOL32)]


def _torch(xt, scale, mode):
    kw = dict(align_corners=False) if mode == "bilinear" else {}
    return F.interpolate(xt, scale_factor=scale, mode=mode, **kw)


def _compare(x, scale, mode, tol, seed=0):
    layer = Upsample(scale, mode)
    y = layer(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    xt = t(x, requires_grad=True)
    yt = _torch(xt, scale, mode)
    yt.backward(t(dy))
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.shape == tuple(yt.shape)
    assert rel_err(y, n(yt)) < tol
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("shape,scale", [
    ((2, 3, 8, 8), 2), ((1, 2, 5, 7), 2), ((2, 1, 4, 3), 3), ((1, 1, 3, 5), 4),
    ((1, 1, 1, 1), 2), ((1, 2, 1, 4), 3), ((3, 1, 6, 1), 2), ((1, 1, 4, 4), 1),
    ((1, 2, 3, 4), (2, 3)),
])
def test_matches_torch(shape, scale, mode, dtype, tol):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    _compare(x, scale, mode, tol)


@given(N=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9),
       sh=st.integers(1, 5), sw=st.integers(1, 5), mode=st.sampled_from(["bilinear", "nearest"]),
       f32=st.booleans(), seed=st.integers(0, 2**16))
def test_hypothesis_matches_torch(N, C, H, W, sh, sw, mode, f32, seed):
    dtype, tol = DTYPES[1] if f32 else DTYPES[0]
    x = np.random.default_rng(seed).standard_normal((N, C, H, W)).astype(dtype)
    _compare(x, (sh, sw), mode, tol, seed)


def _matrix(L, s):
    """The dense interpolation matrix A (s*L x L) of PyTorch's formula, built row by row."""
    A = np.zeros((s * L, L))
    for o in range(s * L):
        src = max((o + 0.5) / s - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, L - 1)
        lam = src - i0
        A[o, i0] += 1 - lam
        A[o, i1] += lam
    return A


@pytest.mark.parametrize("H,W,s", [(5, 4, 2), (3, 1, 3), (1, 6, 4), (7, 7, 5)])
def test_equals_the_separable_matrices_and_their_adjoint(H, W, s):
    """y = A_h x A_w^T and dx = A_h^T dy A_w, the formulation the docs derive."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, H, W))
    Ah, Aw = _matrix(H, s), _matrix(W, s)
    y, cache = upsample_bilinear2d_forward(x, s)
    assert rel_err(y, Ah @ x @ Aw.T) < 1e-14
    dy = rng.standard_normal(y.shape)
    assert rel_err(upsample_bilinear2d_backward(dy, cache), Ah.T @ dy @ Aw) < 1e-14
    # the adjoint identity <A x, dy> = <x, A^T dy>
    lhs = np.sum(y * dy)
    rhs = np.sum(x * upsample_bilinear2d_backward(dy, cache))
    assert abs(lhs - rhs) < 1e-12 * max(1.0, abs(lhs))


def test_scale_one_returns_a_copy():
    x = np.ones((1, 1, 2, 2))
    y = Upsample(1)(x)
    y[...] = 5
    assert x[0, 0, 0, 0] == 1


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("scale", [2, 3])
def test_gradcheck(mode, scale):
    x = np.random.default_rng(3).standard_normal((1, 2, 3, 2))
    err = gradcheck(Upsample(scale, mode, dtype=np.float64), x)
    assert err["input"] < 1e-7, err


def test_accepts_an_integral_float_scale():
    assert Upsample(2.0)(np.ones((1, 1, 2, 3), dtype=np.float32)).shape == (1, 1, 4, 6)


@pytest.mark.parametrize("bad,exc,words", [
    ([[1.0]], TypeError, "list"), (None, TypeError, "NoneType"),
    (np.ones((1, 1, 2, 2), dtype=np.int32), TypeError, "integer"),
    (np.ones((1, 2, 2)), ValueError, "4-D"),
    (np.ones((1, 1, 0, 2)), ValueError, "empty"),
])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc, match=words):
        Upsample()(bad)
    with pytest.raises(exc, match="Upsample"):
        Upsample()(bad)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(scale_factor=1.5), ValueError, "positive integer"),
    (dict(scale_factor=0), ValueError, "positive integer"),
    (dict(scale_factor="2"), TypeError, "positive integer"),
    (dict(scale_factor=(2, 2, 2)), ValueError, "pair"),
    (dict(mode="bicubic"), ValueError, "bilinear, nearest"),
])
def test_bad_construction(kw, exc, words):
    with pytest.raises(exc, match=words):
        Upsample(**kw)


def test_backward_errors():
    layer = Upsample()
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 1, 4, 4)))
    layer(np.ones((1, 1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Upsample: backward expected dy of shape \(1, 1, 4, 4\)"):
        layer.backward(np.ones((1, 1, 2, 2), dtype=np.float32))

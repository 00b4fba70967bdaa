import numpy as np
import pytest
import torch.nn.functional as F
from hypothesis import given, strategies as st

from unet_np import gradcheck
from unet_np.nn import MaxPool2d
from unet_np.nn import pool
from tests.helpers import TOL32, TOL64, n, rel_err, t

DTYPES = [(np.float64, TOL64), (np.float32, TOL32)]


def _compare(x, k, s, p, tol, seed=0):
    layer = MaxPool2d(k, s, p, dtype=x.dtype)
    y = layer(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    xt = t(x, requires_grad=True)
    yt = F.max_pool2d(xt, k, s if s is not None else k, p)
    yt.backward(t(dy))
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.shape == tuple(yt.shape)
    assert rel_err(y, n(yt)) < tol
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,k,s,p", [
    ((2, 3, 8, 8), 2, None, 0),        # the U-Net's case (fast path)
    ((2, 3, 7, 9), 2, 2, 0),           # odd sizes floor (fast path)
    ((1, 2, 9, 9), 3, 2, 1),           # overlapping windows with padding
    ((1, 2, 6, 7), 2, 3, 1),           # stride > kernel
    ((2, 1, 5, 5), 3, 1, 1),           # stride 1: every input in many windows
    ((1, 1, 4, 6), (2, 3), (1, 2), (1, 0)),
    ((1, 1, 1, 1), 1, 1, 0),           # 1x1 map
    ((1, 1, 1, 3), (1, 2), None, (0, 1)),
])
def test_matches_torch(shape, k, s, p, dtype, tol):
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    _compare(x, k, s, p, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1), (2, 1, 0), (3, 2, 1), (4, 3, 2)])
def test_ties_go_to_the_first_maximum(k, s, p, dtype, tol):
    """Inputs with many equal values: the gradient goes where PyTorch sends it."""
    rng = np.random.default_rng(2)
    _compare(rng.integers(0, 2, (2, 3, 9, 8)).astype(dtype), k, s, p, tol)
    _compare(np.zeros((1, 2, 6, 6), dtype=dtype), k, s, p, tol)


def test_ties_fast_path_every_pattern():
    """All 16 zero/one patterns of a 2x2 window: the first maximum in row-major order wins."""
    patterns = np.array([[(i >> 3) & 1, (i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(16)], float)
    x = patterns.reshape(1, 16, 2, 2)
    y, (arg, *_) = pool.maxpool2d_forward(x, 2, 2, 0)
    np.testing.assert_array_equal(arg.ravel(), patterns.argmax(axis=1))
    np.testing.assert_array_equal(y.ravel(), patterns.max(axis=1))
    assert arg.dtype == np.uint8


@given(N=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9),
       kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 5), sw=st.integers(1, 5),
       ph=st.integers(0, 2), pw=st.integers(0, 2), ties=st.booleans(), f32=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hypothesis_matches_torch(N, C, H, W, kh, kw, sh, sw, ph, pw, ties, f32, seed):
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    if H + 2 * ph < kh or W + 2 * pw < kw:
        return
    dtype, tol = DTYPES[1] if f32 else DTYPES[0]
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (N, C, H, W)) if ties else rng.standard_normal((N, C, H, W))
    _compare(x.astype(dtype), (kh, kw), (sh, sw), (ph, pw), tol, seed)


@given(N=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(2, 11), W=st.integers(2, 11),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_fast_path_equals_general_path(N, C, H, W, ties, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (N, C, H, W)) if ties else rng.standard_normal((N, C, H, W))
    x = x.astype(np.float32)
    y_fast, arg_fast = pool._maxpool2x2_forward(x)
    y_gen, arg_gen = pool._maxpool_windows_forward(x, (2, 2), (2, 2), (0, 0))
    np.testing.assert_array_equal(y_fast, y_gen)
    np.testing.assert_array_equal(arg_fast, arg_gen)
    assert arg_fast.dtype == arg_gen.dtype == np.uint8
    dy = rng.standard_normal(y_fast.shape).astype(np.float32)
    np.testing.assert_array_equal(pool._maxpool2x2_backward(dy, arg_fast, x.shape),
                                  pool._maxpool_windows_backward(dy, arg_gen, x.shape, (2, 2),
                                                                 (2, 2), (0, 0)))


def test_fast_path_handles_non_contiguous_input():
    x = np.random.default_rng(3).standard_normal((2, 6, 6, 3)).transpose(0, 3, 1, 2)
    _compare(x, 2, 2, 0, TOL64)


def test_large_window_uses_a_wider_index():
    x = np.random.default_rng(4).standard_normal((1, 1, 17, 17))
    y, (arg, *_) = pool.maxpool2d_forward(x, 16, 1, 0)
    assert arg.dtype == np.uint16
    _compare(x, 16, 1, 0, TOL64)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (2, 1, 0)])
def test_gradcheck(k, s, p):
    # distinct values a safe distance apart, so the +-eps nudges never change an argmax
    x = np.random.default_rng(5).permutation(2 * 5 * 5).reshape(1, 2, 5, 5) * 0.1
    err = gradcheck(MaxPool2d(k, s, p, dtype=np.float64), x)
    assert err["input"] < 1e-7, err


def test_no_grad_keeps_nothing():
    from unet_np.nn import no_grad
    layer = MaxPool2d(2)
    with no_grad():
        layer(np.ones((1, 1, 2, 2), dtype=np.float32))
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 1, 1, 1), dtype=np.float32))


@pytest.mark.parametrize("bad,exc,words", [
    ([[1.0]], TypeError, "list"), (None, TypeError, "NoneType"),
    (np.ones((1, 1, 2, 2), dtype=np.int64), TypeError, "integer"),
    (np.ones((1, 2, 2)), ValueError, "4-D"),
    (np.ones((1, 1, 1, 5)), ValueError, "smaller than the kernel 2x2"),
])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc, match=words):
        MaxPool2d(2)(bad)
    with pytest.raises(exc, match="MaxPool2d"):
        MaxPool2d(2)(bad)


@pytest.mark.parametrize("args,exc,words", [
    ((0,), ValueError, "kernel_size must be positive"),
    ((2, 0), ValueError, "stride must be positive"),
    ((2, 2, -1), ValueError, "padding must be >= 0"),
    ((2, 2, 2), ValueError, "at most half the kernel"),
    ((2.5,), TypeError, "kernel_size"),
    (((2, 2, 2),), ValueError, "pair"),
])
def test_bad_construction(args, exc, words):
    with pytest.raises(exc, match=words):
        MaxPool2d(*args)


def test_backward_shape_error():
    layer = MaxPool2d(2)
    layer(np.ones((1, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d: backward expected dy of shape \(1, 1, 2, 2\)"):
        layer.backward(np.ones((1, 1, 4, 4), dtype=np.float32))

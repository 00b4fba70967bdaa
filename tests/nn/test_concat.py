import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from unet_np import gradcheck
from unet_np.nn import CenterCrop, Concat, Pad2d
from unet_np.nn.concat import pad2d_backward, pad2d_forward
from tests.helpers import TOL32, TOL64, n, rel_err, t

DTYPES = [(np.float64, TOL64), (np.float32, TOL32)]


# -- Concat --------------------------------------------------------------------------------------
def _compare_concat(xs, axis, tol, seed=0):
    layer = Concat(axis)
    y = layer(*xs)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(y.dtype)
    dxs = layer.backward(dy)
    xts = [t(x, requires_grad=True) for x in xs]
    yt = torch.cat(xts, dim=axis)
    yt.backward(t(dy))
    assert isinstance(dxs, tuple) and len(dxs) == len(xs)
    assert y.dtype == xs[0].dtype
    assert rel_err(y, n(yt)) < tol
    for dx, xt in zip(dxs, xts):
        assert dx.dtype == xs[0].dtype
        assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("channels,axis", [((3, 5), 1), ((1,), 1), ((2, 1, 4), 1), ((2, 3), -3),
                                           ((2, 2), 0), ((2, 3), 3)])
def test_concat_matches_torch(channels, axis, dtype, tol):
    rng = np.random.default_rng(1)
    base = [2, 4, 3, 5]
    xs = []
    for c in channels:
        shape = list(base)
        shape[axis] = c
        xs.append(rng.standard_normal(shape).astype(dtype))
    _compare_concat(xs, axis, tol)


@given(N=st.integers(1, 2), cs=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       H=st.integers(1, 5), W=st.integers(1, 5), f32=st.booleans(), seed=st.integers(0, 2**16))
def test_concat_hypothesis(N, cs, H, W, f32, seed):
    dtype, tol = DTYPES[1] if f32 else DTYPES[0]
    rng = np.random.default_rng(seed)
    _compare_concat([rng.standard_normal((N, c, H, W)).astype(dtype) for c in cs], 1, tol, seed)


def test_concat_accepts_a_list_and_gradchecks():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((1, 2, 2, 2)), rng.standard_normal((1, 1, 2, 2))
    np.testing.assert_array_equal(Concat()([a, b]), np.concatenate([a, b], axis=1))
    err = gradcheck(Concat(dtype=np.float64), (a, b))
    assert max(err.values()) < 1e-7, err


@pytest.mark.parametrize("xs,exc,words", [
    ((np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 5))), ValueError,
     r"input 1 has shape \(2, 3, 4, 5\).*input 0's shape \(2, 3, 4, 4\)"),
    ((np.ones((2, 3, 4, 4)), np.ones((1, 3, 4, 4))), ValueError, "input 1 has shape"),
    ((np.ones((2, 3, 4, 4)), np.ones((2, 1, 4, 4)), np.ones((2, 1, 3, 4))), ValueError,
     "input 2 has shape"),
    ((np.ones((2, 3, 4, 4)), np.ones((2, 3, 4))), ValueError, "input 1 is 3-D"),
    ((np.ones((2, 3, 4, 4)), np.ones((2, 3, 4, 4), dtype=np.float32)), TypeError,
     "input 1 has dtype float32"),
    ((np.ones((2, 3, 4, 4)), [[1.0]]), TypeError, r"Concat \(input 1\).*list"),
    ((np.ones((2, 3, 4, 4), dtype=np.int64),), TypeError, r"Concat \(input 0\).*integer"),
    ((), ValueError, "at least one input"),
])
def test_concat_bad_input(xs, exc, words):
    with pytest.raises(exc, match=words):
        Concat()(*xs)


def test_concat_bad_axis():
    with pytest.raises(ValueError, match="Concat: axis 4 is out of range"):
        Concat(4)(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))
    with pytest.raises(TypeError, match="Concat: axis must be an int"):
        Concat(1.0)


def test_concat_backward_errors():
    layer = Concat()
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 2, 1, 1)))
    layer(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"Concat: backward expected dy of shape \(1, 2, 1, 1\)"):
        layer.backward(np.ones((1, 3, 1, 1)))


# -- CenterCrop -------------------------------------------------------------------------------------
def _compare_crop(x, size, tol, seed=0, layer_size=None):
    layer = CenterCrop(layer_size)
    y = layer(x, size) if size is not None else layer(x)
    h, w = (layer_size if size is None else size)
    H, W = x.shape[2:]
    top, left = (H - h) // 2, (W - w) // 2
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    xt = t(x, requires_grad=True)
    yt = xt[:, :, top:top + h, left:left + w]  # the crop the spec defines, in torch
    yt.backward(t(dy))
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert rel_err(y, n(yt)) < tol
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape,size", [((2, 3, 8, 8), (4, 4)), ((1, 2, 9, 6), (4, 3)),
                                        ((1, 1, 5, 5), (5, 5)), ((1, 1, 4, 7), (1, 1))])
def test_crop_matches_torch(shape, size, dtype, tol):
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    _compare_crop(x, size, tol)
    _compare_crop(x, None, tol, layer_size=size)


@given(H=st.integers(1, 9), W=st.integers(1, 9), dh=st.integers(0, 5), dw=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_crop_hypothesis(H, W, dh, dw, seed):
    x = np.random.default_rng(seed).standard_normal((2, 2, H + dh, W + dw))
    _compare_crop(x, (H, W), TOL64, seed)


def test_crop_offset_and_size_forms():
    x = np.arange(7 * 6, dtype=np.float64).reshape(1, 1, 7, 6)
    y = CenterCrop()(x, 4)                      # offset ((7-4)//2, (6-4)//2) = (1, 1)
    np.testing.assert_array_equal(y, x[:, :, 1:5, 1:5])
    np.testing.assert_array_equal(CenterCrop()(x, np.zeros((2, 3, 4, 4))), y)  # size from an array
    err = gradcheck(CenterCrop((3, 2), dtype=np.float64), x[:, :, :4, :4] / 10)
    assert err["input"] < 1e-7, err


@pytest.mark.parametrize("x,size,exc,words", [
    (np.ones((1, 1, 4, 4)), (5, 4), ValueError, r"crop size 5x4 is larger than the input's "
                                               r"spatial size 4x4"),
    (np.ones((1, 1, 4, 4)), (4, 6), ValueError, "larger"),
    (np.ones((1, 1, 4, 4)), None, ValueError, "no size given"),
    (np.ones((1, 1, 4, 4)), (0, 2), ValueError, "positive"),
    (np.ones((1, 1, 4, 4)), (2.0, 2), TypeError, "size must be"),
    (np.ones((1, 4, 4)), (2, 2), ValueError, "4-D"),
    (np.ones((1, 1, 4, 4), dtype=np.int8), (2, 2), TypeError, "integer"),
])
def test_crop_bad_input(x, size, exc, words):
    with pytest.raises(exc, match=words):
        CenterCrop()(x, size)
    with pytest.raises(exc, match="CenterCrop"):
        CenterCrop()(x, size)


def test_crop_backward_errors():
    layer = CenterCrop(2)
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 1, 2, 2)))
    layer(np.ones((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"CenterCrop: backward expected dy of shape \(1, 1, 2, 2\)"):
        layer.backward(np.ones((1, 1, 3, 3)))


# -- Pad2d --------------------------------------------------------------------------------------
def _compare_pad(x, pads, mode, tol, seed=0, value=0.0):
    layer = Pad2d(pads, mode, value=value)
    y = layer(x)
    dy = np.random.default_rng(seed).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    xt = t(x, requires_grad=True)
    yt = F.pad(xt, layer.padding, mode=mode, **({"value": value} if mode == "constant" else {}))
    yt.backward(t(dy))
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert y.shape == tuple(yt.shape)
    assert rel_err(y, n(yt)) < tol
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("mode", ["reflect", "constant"])
@pytest.mark.parametrize("shape,pads", [
    ((2, 3, 6, 5), 1), ((1, 2, 5, 4), (1, 2, 3, 1)), ((1, 1, 5, 4), (0, 3, 0, 4)),
    ((1, 1, 5, 4), (3, 0, 4, 0)), ((1, 1, 4, 4), (2, 1)), ((1, 1, 2, 2), 1),
    ((1, 1, 1, 3), (2, 2, 0, 0)),
])
def test_pad_matches_torch(shape, pads, mode, dtype, tol):
    x = np.random.default_rng(4).standard_normal(shape).astype(dtype)
    _compare_pad(x, pads, mode, tol)


@given(H=st.integers(1, 7), W=st.integers(1, 7), pads=st.lists(st.integers(0, 6), min_size=4,
       max_size=4), mode=st.sampled_from(["reflect", "constant"]), f32=st.booleans(),
       seed=st.integers(0, 2**16))
def test_pad_hypothesis(H, W, pads, mode, f32, seed):
    l, r, tp, b = pads
    if mode == "reflect":
        l, r, tp, b = min(l, W - 1), min(r, W - 1), min(tp, H - 1), min(b, H - 1)
    dtype, tol = DTYPES[1] if f32 else DTYPES[0]
    x = np.random.default_rng(seed).standard_normal((2, 2, H, W)).astype(dtype)
    _compare_pad(x, (l, r, tp, b), mode, tol, seed, value=0.0 if mode == "reflect" else 1.5)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_pad_gradcheck(mode):
    x = np.random.default_rng(5).standard_normal((1, 2, 3, 4))
    err = gradcheck(Pad2d((2, 3, 1, 2), mode, dtype=np.float64), x)
    assert err["input"] < 1e-7, err


def test_pad_primitive_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of reflect, constant"):
        pad2d_forward(np.ones((1, 1, 2, 2)), (1, 1, 1, 1), "replicate")
    y, cache = pad2d_forward(np.ones((1, 1, 2, 2)), (1, 0, 0, 0), "constant", 3.0)
    np.testing.assert_array_equal(y[0, 0], [[3, 1, 1], [3, 1, 1]])
    assert pad2d_backward(y, cache).shape == (1, 1, 2, 2)


@pytest.mark.parametrize("x,exc,words", [
    (np.ones((1, 1, 3, 3)), ValueError, r"reflect padding .* must be smaller than the input's "
                                        r"spatial size 3x3"),
    ([[1.0]], TypeError, "list"),
    (np.ones((1, 3, 3)), ValueError, "4-D"),
    (np.ones((1, 1, 5, 5), dtype=np.uint8), TypeError, "unsigned integer"),
])
def test_pad_bad_input(x, exc, words):
    with pytest.raises(exc, match=words):
        Pad2d(3)(x)
    with pytest.raises(exc, match="Pad2d"):
        Pad2d(3)(x)


@pytest.mark.parametrize("args,exc,words", [
    ((1, "replicate"), ValueError, "mode must be one of"),
    ((-1,), ValueError, ">= 0"),
    (((1, 2, 3),), ValueError, "left, right, top, bottom"),
    ((1.5,), TypeError, "tuple of ints"),
])
def test_pad_bad_construction(args, exc, words):
    with pytest.raises(exc, match=words):
        Pad2d(*args)


def test_pad_backward_errors():
    layer = Pad2d(1)
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 1, 4, 4)))
    layer(np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"Pad2d: backward expected dy of shape \(1, 1, 4, 4\)"):
        layer.backward(np.ones((1, 1, 2, 2)))

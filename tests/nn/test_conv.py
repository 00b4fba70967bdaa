"""Conv2d and ConvTranspose2d against torch.nn.functional.conv2d / conv_transpose2d, finite differences,
the fast paths against the general path, initialisation statistics and every bad-input error.

Tolerances: relative error (tests.helpers.rel_err) < TOL64 = 1e-10 in float64 and < TOL32 = 1e-5 in
float32, for the output and every gradient (input, weight, bias).
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_np import gradcheck, no_grad
from unet_np.nn import Conv2d, ConvTranspose2d
from unet_np.nn import conv as conv_mod
from unet_np.nn import conv_reference
from unet_np.nn import init as init_mod
from tests.helpers import TOL32, TOL64, n, rel_err, t

TOLS = {np.float64: TOL64, np.float32: TOL32}

# PyTorch warns that it pads a copy for 'same' with an even kernel; that is its business, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _run_ours(layer, x, dy):
    layer.zero_grad()
    y = layer(x)
    dx = layer.backward(dy)
    grads = {"input": dx, "weight": layer.weight.grad}
    if layer.bias is not None:
        grads["bias"] = layer.bias.grad
    return y, grads


def _run_torch(fn, layer, x, dy, **kw):
    xt = t(x, requires_grad=True)
    wt = t(layer.weight.data, requires_grad=True)
    bt = t(layer.bias.data, requires_grad=True) if layer.bias is not None else None
    yt = fn(xt, wt, bt, **kw)
    yt.backward(t(dy))
    grads = {"input": n(xt.grad), "weight": n(wt.grad)}
    if bt is not None:
        grads["bias"] = n(bt.grad)
    return n(yt), grads


def _torch_conv_kwargs(layer):
    return dict(stride=layer.stride, padding=layer.padding if isinstance(layer.padding, str) else layer.padding,
                dilation=layer.dilation)


def compare_conv(layer, x, seed=0):
    """Worst relative error of Conv2d `layer` against F.conv2d over output and every gradient."""
    dtype = layer.dtype.type
    out_shape = layer.output_shape(x.shape)
    dy = np.random.default_rng(seed).standard_normal(out_shape).astype(dtype)
    y, g = _run_ours(layer, x, dy)
    yt, gt = _run_torch(F.conv2d, layer, x, dy, **_torch_conv_kwargs(layer))
    assert y.dtype == dtype and all(v.dtype == dtype for v in g.values())
    assert y.shape == yt.shape
    errs = {"output": rel_err(y, yt)}
    errs.update({k: rel_err(g[k], gt[k]) for k in gt})
    return errs


def compare_conv_transpose(layer, x, seed=0):
    dtype = layer.dtype.type
    out_shape = layer.output_shape(x.shape)
    dy = np.random.default_rng(seed).standard_normal(out_shape).astype(dtype)
    y, g = _run_ours(layer, x, dy)
    yt, gt = _run_torch(F.conv_transpose2d, layer, x, dy, stride=layer.stride, padding=layer.padding,
                        output_padding=layer.output_padding, dilation=layer.dilation)
    assert y.dtype == dtype and all(v.dtype == dtype for v in g.values())
    assert y.shape == yt.shape
    errs = {"output": rel_err(y, yt)}
    errs.update({k: rel_err(g[k], gt[k]) for k in gt})
    return errs


def _x(shape, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# fixed cases
# ------------------------------------------------------------------------------------------------
# (input shape, (in, out, kernel), keyword arguments)
CONV_CASES = [
    ((2, 3, 8, 7), (3, 4, 3), dict(padding=1)),                               # the U-Net's 3x3 pad 1
    ((2, 5, 6, 6), (5, 3, 1), dict()),                                        # 1x1 (fast path)
    ((2, 3, 7, 9), (3, 2, 3), dict(padding="valid")),
    ((2, 3, 9, 8), (3, 2, 4), dict(padding="same", dilation=2)),              # even kernel, odd total pad
    ((1, 2, 7, 6), (2, 3, (2, 3)), dict(padding="same", dilation=(1, 2))),
    ((2, 3, 7, 7), (3, 4, 3), dict(padding="same")),
    ((2, 2, 11, 10), (2, 3, 2), dict(stride=3)),                              # stride > kernel
    ((2, 2, 9, 8), (2, 3, 2), dict(stride=2)),                                # kernel == stride, crop
    ((2, 2, 8, 8), (2, 3, 2), dict(stride=2)),                                # kernel == stride, exact
    ((2, 3, 9, 7), (3, 4, 3), dict(stride=2, padding=1)),
    ((1, 3, 10, 9), (3, 2, (3, 2)), dict(stride=(2, 3), padding=(2, 1), dilation=(2, 1))),
    ((2, 3, 1, 1), (3, 4, 1), dict()),                                        # 1x1 maps
    ((2, 3, 1, 1), (3, 4, 3), dict(padding=1)),                               # 1x1 map, 3x3 kernel
    ((1, 1, 5, 5), (1, 1, 5), dict()),                                        # kernel == input
    ((1, 3, 6, 5), (3, 2, 3), dict(padding=1, bias=False)),                   # no bias
    ((2, 4, 5, 6), (4, 3, 1), dict(stride=2)),                                # strided 1x1
    ((1, 2, 5, 5), (2, 2, 3), dict(padding=3)),                               # padding > kernel // 2
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,chans,kw", CONV_CASES)
def test_conv2d_matches_torch(shape, chans, kw, dtype):
    layer = Conv2d(*chans, dtype=dtype, **kw)
    errs = compare_conv(layer, _x(shape, dtype))
    assert max(errs.values()) < TOLS[dtype], errs


CONVT_CASES = [
    ((2, 4, 5, 6), (4, 3, 2), dict(stride=2)),                                # U-Net up-conv (fast path)
    ((1, 3, 1, 1), (3, 2, 2), dict(stride=2)),                                # 1x1 map
    ((2, 3, 4, 5), (3, 2, 3), dict(stride=2, padding=1, output_padding=1)),
    ((2, 3, 4, 5), (3, 2, 3), dict()),
    ((2, 2, 4, 3), (2, 3, 2), dict(stride=3)),                                # stride > kernel
    ((2, 2, 4, 3), (2, 3, 2), dict(stride=3, output_padding=2)),              # op past the last tap
    ((1, 2, 5, 4), (2, 3, (3, 2)), dict(stride=(2, 1), padding=(1, 0), dilation=(2, 3))),
    ((1, 2, 5, 4), (2, 3, 3), dict(stride=1, dilation=3, output_padding=2)),  # op < dilation
    ((2, 3, 4, 4), (3, 5, 1), dict()),                                        # 1x1
    ((2, 3, 4, 4), (3, 5, 1), dict(stride=2, output_padding=1)),
    ((1, 3, 4, 4), (3, 2, 2), dict(stride=2, bias=False)),                    # no bias, fast path
    ((1, 3, 5, 5), (3, 2, 4), dict(stride=2, padding=2, bias=False)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,chans,kw", CONVT_CASES)
def test_conv_transpose2d_matches_torch(shape, chans, kw, dtype):
    layer = ConvTranspose2d(*chans, dtype=dtype, **kw)
    errs = compare_conv_transpose(layer, _x(shape, dtype))
    assert max(errs.values()) < TOLS[dtype], errs


def test_same_padding_keeps_the_size_and_puts_the_extra_row_last():
    layer = Conv2d(1, 1, 4, padding="same", bias=False, dtype=np.float64)
    assert layer._pads == ((1, 2), (1, 2))
    assert layer(np.zeros((1, 1, 6, 5))).shape == (1, 1, 6, 5)
    # A kernel with one 1 at offset (0, 0) shifts the image by the leading padding, 1 pixel.
    layer.weight.data[...] = 0
    layer.weight.data[0, 0, 0, 0] = 1
    x = np.arange(30, dtype=np.float64).reshape(1, 1, 6, 5)
    np.testing.assert_array_equal(layer(x)[0, 0, 1:, 1:], x[0, 0, :-1, :-1])


def test_the_primitives_accept_asymmetric_padding():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((2, 3, 6, 7)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    pads = ((0, 2), (1, 3))
    y, cache = conv_mod.conv2d_forward(x, w, b, (1, 2), pads, (2, 1))
    xt = t(x, requires_grad=True)
    wt, bt = t(w, requires_grad=True), t(b, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (1, 3, 0, 2)), wt, bt, stride=(1, 2), dilation=(2, 1))
    dy = rng.standard_normal(yt.shape)
    yt.backward(t(dy))
    dx, dw, db = conv_mod.conv2d_backward(dy, cache)
    for ours, theirs in [(y, yt), (dx, xt.grad), (dw, wt.grad), (db, bt.grad)]:
        assert rel_err(ours, n(theirs)) < TOL64


@pytest.mark.parametrize("k,s,p,d", [(3, 1, 1, 1), (2, 2, 0, 1), (3, 2, 1, 1), ((2, 3), (3, 1), (1, 0), (1, 2))])
def test_transposed_convolution_is_the_adjoint(k, s, p, d):
    """<conv(z), x> = <z, conv_transpose(x)> with the same weight and hyper-parameters."""
    rng = np.random.default_rng(11)
    k, s, p, d = (conv_reference.pair(v) for v in (k, s, p, d))
    z = rng.standard_normal((2, 3, 9, 8))
    w = rng.standard_normal((4, 3) + k)
    az, _ = conv_mod.conv2d_forward(z, w, None, s, p, d)
    x = rng.standard_normal(az.shape)
    # output_padding recovers z's size where the stride's floor lost rows
    op = tuple(n_ - conv_mod.conv_transpose_output_size(m_, k_, s_, 2 * p_, 0, d_)
               for n_, m_, k_, s_, p_, d_ in zip(z.shape[2:], az.shape[2:], k, s, p, d))
    atx, _ = conv_mod.conv_transpose2d_forward(x, w, None, s, p, op, d)
    assert atx.shape == z.shape
    lhs, rhs = float(np.sum(az * x)), float(np.sum(z * atx))
    assert abs(lhs - rhs) < 1e-12 * max(abs(lhs), 1.0)


@pytest.mark.parametrize("fast", [True, False])
def test_kernel_equal_to_stride_with_trailing_padding(fast, monkeypatch):
    """Windows that tile the image but reach into bottom/right padding must not take the shuffle path."""
    monkeypatch.setattr(conv_reference, "FAST_PATHS", fast)
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 5, 7)), rng.standard_normal((4, 3, 2, 2)), rng.standard_normal(4)
    pads = ((0, 1), (0, 1))
    y, cache = conv_mod.conv2d_forward(x, w, b, 2, pads, 1)
    xt, wt, bt = t(x, requires_grad=True), t(w, requires_grad=True), t(b, requires_grad=True)
    yt = F.conv2d(F.pad(xt, (0, 1, 0, 1)), wt, bt, stride=2)
    dy = rng.standard_normal(yt.shape)
    yt.backward(t(dy))
    for ours, theirs in zip((y,) + conv_mod.conv2d_backward(dy, cache), (yt, xt.grad, wt.grad, bt.grad)):
        assert rel_err(ours, n(theirs)) < TOL64
    # the transposed convolution cropping one trailing row/column: the adjoint of the above
    wT = rng.standard_normal((3, 4, 2, 2))
    yT, cacheT = conv_mod.conv_transpose2d_forward(x, wT, b, 2, pads, 0, 1)
    xt2, wt2, bt2 = t(x, requires_grad=True), t(wT, requires_grad=True), t(b, requires_grad=True)
    full = F.conv_transpose2d(xt2, wt2, bt2, stride=2)
    yt2 = full[:, :, :-1, :-1]
    dy2 = rng.standard_normal(yt2.shape)
    yt2.backward(t(dy2))
    for ours, theirs in zip((yT,) + conv_mod.conv_transpose2d_backward(dy2, cacheT),
                            (yt2, xt2.grad, wt2.grad, bt2.grad)):
        assert rel_err(ours, n(theirs)) < TOL64


def test_primitive_without_bias_returns_none():
    x, w = np.ones((1, 2, 4, 4)), np.ones((3, 2, 3, 3))
    y, cache = conv_mod.conv2d_forward(x, w, None, 1, 1, 1)
    assert conv_mod.conv2d_backward(np.ones_like(y), cache)[2] is None
    y, cache = conv_mod.conv_transpose2d_forward(x, np.ones((2, 3, 2, 2)), None, 2, 0, 0, 1)
    assert conv_mod.conv_transpose2d_backward(np.ones_like(y), cache)[2] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_primitives_keep_the_dtype(dtype):
    x = np.ones((1, 2, 4, 4), dtype=dtype)
    for w, f, b_, args in [(np.ones((3, 2, 3, 3), dtype), conv_mod.conv2d_forward, conv_mod.conv2d_backward,
                            (1, 1, 1)),
                           (np.ones((3, 2, 1, 1), dtype), conv_mod.conv2d_forward, conv_mod.conv2d_backward,
                            (1, 0, 1)),
                           (np.ones((2, 3, 2, 2), dtype), conv_mod.conv_transpose2d_forward,
                            conv_mod.conv_transpose2d_backward, (2, 0, 0, 1)),
                           (np.ones((2, 3, 3, 3), dtype), conv_mod.conv_transpose2d_forward,
                            conv_mod.conv_transpose2d_backward, (2, 1, 1, 1))]:
        b = np.ones(w.shape[0] if f is conv_mod.conv2d_forward else w.shape[1], dtype)
        y, cache = f(x, w, b, *args)
        assert y.dtype == dtype
        assert all(g.dtype == dtype for g in b_(np.ones_like(y), cache))


# ------------------------------------------------------------------------------------------------
# hypothesis: random shapes and hyper-parameters
# ------------------------------------------------------------------------------------------------
@st.composite
def conv_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    # the padded input must hold one dilated kernel
    size = [max(1, d_ * (k_ - 1) + 1 - 2 * p_) + draw(st.integers(0, 6)) for k_, d_, p_ in zip(k, d, p)]
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), size[0], size[1])
    return shape, draw(st.integers(1, 4)), k, s, p, d, draw(st.booleans())


@given(conv_configs(), st.integers(0, 2 ** 16))
def test_conv2d_random_float64(cfg, seed):
    shape, out, k, s, p, d, bias = cfg
    layer = Conv2d(shape[1], out, k, stride=s, padding=p, dilation=d, bias=bias, dtype=np.float64)
    errs = compare_conv(layer, _x(shape, np.float64, seed), seed)
    assert max(errs.values()) < TOL64, (cfg, errs)


@settings(max_examples=6)
@given(conv_configs(), st.integers(0, 2 ** 16))
def test_conv2d_random_float32(cfg, seed):
    shape, out, k, s, p, d, bias = cfg
    layer = Conv2d(shape[1], out, k, stride=s, padding=p, dilation=d, bias=bias, dtype=np.float32)
    errs = compare_conv(layer, _x(shape, np.float32, seed), seed)
    assert max(errs.values()) < TOL32, (cfg, errs)


@st.composite
def conv_transpose_configs(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    op = tuple(draw(st.integers(0, max(s_, d_) - 1)) for s_, d_ in zip(s, d))
    size = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    # keep the output at least 1 pixel: 2p <= (H - 1) s + d (k - 1) + op
    p = tuple(draw(st.integers(0, min(3, ((h - 1) * s_ + d_ * (k_ - 1) + op_) // 2)))
              for h, s_, d_, k_, op_ in zip(size, s, d, k, op))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), size[0], size[1])
    return shape, draw(st.integers(1, 4)), k, s, p, op, d, draw(st.booleans())


@given(conv_transpose_configs(), st.integers(0, 2 ** 16))
def test_conv_transpose2d_random_float64(cfg, seed):
    shape, out, k, s, p, op, d, bias = cfg
    layer = ConvTranspose2d(shape[1], out, k, stride=s, padding=p, output_padding=op, dilation=d,
                            bias=bias, dtype=np.float64)
    errs = compare_conv_transpose(layer, _x(shape, np.float64, seed), seed)
    assert max(errs.values()) < TOL64, (cfg, errs)


@settings(max_examples=6)
@given(conv_transpose_configs(), st.integers(0, 2 ** 16))
def test_conv_transpose2d_random_float32(cfg, seed):
    shape, out, k, s, p, op, d, bias = cfg
    layer = ConvTranspose2d(shape[1], out, k, stride=s, padding=p, output_padding=op, dilation=d,
                            bias=bias, dtype=np.float32)
    errs = compare_conv_transpose(layer, _x(shape, np.float32, seed), seed)
    assert max(errs.values()) < TOL32, (cfg, errs)


# ------------------------------------------------------------------------------------------------
# fast paths against the general path
# ------------------------------------------------------------------------------------------------
def _primitive_results(fast, monkeypatch, fwd, bwd, x, w, b, args, dy):
    monkeypatch.setattr(conv_reference, "FAST_PATHS", fast)
    y, cache = fwd(x, w, b, *args)
    return (y,) + tuple(bwd(dy, cache))


def _forbid_general_path(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the general im2col/col2im loop ran where a fast path should have")
    monkeypatch.setattr(conv_reference, "axis_ranges", boom)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind,w_shape,args,x_shape", [
    ("T", (4, 3, 2, 2), (2, 0, 0, 1), (2, 4, 5, 6)),     # the U-Net's 2x2 stride-2 up-convolution
    ("T", (4, 3, 3, 2), ((3, 2), 0, 0, 1), (2, 4, 3, 4)),
    ("T", (4, 3, 1, 1), (1, 0, 0, 1), (2, 4, 5, 6)),     # 1x1 transposed
    ("C", (3, 4, 1, 1), (1, 0, 1), (2, 4, 5, 6)),        # 1x1
    ("C", (3, 4, 2, 2), (2, 0, 1), (2, 4, 6, 8)),        # patchify: kernel == stride
    ("C", (3, 4, 2, 2), (2, 0, 1), (2, 4, 7, 9)),        # kernel == stride, trailing pixels unused
])
def test_fast_paths_match_the_general_path(kind, w_shape, args, x_shape, dtype, monkeypatch):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
    if kind == "T":
        fwd, bwd, b = conv_mod.conv_transpose2d_forward, conv_mod.conv_transpose2d_backward, w_shape[1]
    else:
        fwd, bwd, b = conv_mod.conv2d_forward, conv_mod.conv2d_backward, w_shape[0]
    b = rng.standard_normal(b).astype(dtype)
    y, _ = fwd(x, w, b, *args)
    dy = rng.standard_normal(y.shape).astype(dtype)
    slow = _primitive_results(False, monkeypatch, fwd, bwd, x, w, b, args, dy)
    with monkeypatch.context() as m:
        _forbid_general_path(m)
        fast = _primitive_results(True, m, fwd, bwd, x, w, b, args, dy)
    for f_, s_ in zip(fast, slow):
        assert f_.dtype == dtype and f_.shape == s_.shape
        assert rel_err(f_, s_) < TOLS[dtype]
    # and against torch
    if kind == "T":
        ref = F.conv_transpose2d(t(x.astype(np.float64)), t(w.astype(np.float64)), t(b.astype(np.float64)),
                                 stride=args[0])
    else:
        ref = F.conv2d(t(x.astype(np.float64)), t(w.astype(np.float64)), t(b.astype(np.float64)),
                       stride=args[0])
    assert rel_err(fast[0], n(ref)) < TOLS[dtype]


def test_pointwise_conv_uses_no_column_buffer():
    x = np.ones((2, 3, 4, 5))
    _, cache = conv_mod.conv2d_forward(x, np.ones((2, 3, 1, 1)), None, 1, 0, 1)
    assert np.shares_memory(cache[0], x)


def test_the_unet_upconv_is_one_gemm_plus_a_shuffle():
    """y[n, o, 2h + i, 2w + j] = sum_c x[n, c, h, w] W[c, o, i, j] + b[o], written out."""
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(2)
    y, _ = conv_mod.conv_transpose2d_forward(x, w, b, 2, 0, 0, 1)
    expect = np.einsum("nchw,coij->nohiwj", x, w).reshape(2, 2, 8, 10) + b[None, :, None, None]
    assert rel_err(y, expect) < TOL64


# ------------------------------------------------------------------------------------------------
# finite differences
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,shape", [
    (lambda: Conv2d(2, 2, 3, padding=1, dtype=np.float64), (1, 2, 4, 3)),
    (lambda: Conv2d(2, 3, (2, 3), stride=2, padding="valid", dilation=(1, 2), dtype=np.float64), (2, 2, 5, 6)),
    (lambda: Conv2d(2, 2, 2, padding="same", dtype=np.float64), (1, 2, 3, 4)),
    (lambda: Conv2d(3, 2, 1, bias=False, dtype=np.float64), (1, 3, 3, 3)),
    (lambda: ConvTranspose2d(2, 2, 2, stride=2, dtype=np.float64), (1, 2, 2, 3)),
    (lambda: ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, dtype=np.float64), (2, 2, 2, 2)),
    (lambda: ConvTranspose2d(2, 2, (2, 3), stride=(3, 1), dilation=(1, 2), bias=False, dtype=np.float64),
     (1, 2, 2, 3)),
])
def test_gradcheck(make, shape):
    x = np.random.default_rng(2).standard_normal(shape)
    errs = gradcheck(make(), x)
    assert max(errs.values()) < 1e-7, errs


# ------------------------------------------------------------------------------------------------
# initialisation
# ------------------------------------------------------------------------------------------------
def _torch_fan_in(shape):
    return torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))[0]


@pytest.mark.parametrize("layer,fan_in", [
    (lambda: Conv2d(16, 32, 3), 16 * 9),
    (lambda: ConvTranspose2d(32, 16, 2, stride=2), 16 * 4),   # PyTorch's fan_in: weight.shape[1] * k * k
])
def test_torch_init_is_uniform_with_pytorchs_bound(layer, fan_in):
    init_mod.seed(0)
    m = layer()
    assert _torch_fan_in(m.weight.shape) == fan_in
    bound = 1 / math.sqrt(fan_in)
    w = m.weight.data
    assert w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(w.mean()) < 0.05 * bound
    assert np.abs(m.bias.data).max() <= bound


@pytest.mark.parametrize("layer,fan_in", [
    (lambda: Conv2d(16, 32, 3, init="he"), 16 * 9),
    (lambda: ConvTranspose2d(64, 32, 2, stride=2, init="he"), 64),          # true fan-in: in*k*k/(s*s)
    (lambda: ConvTranspose2d(16, 32, 3, stride=1, init="he"), 16 * 9),
])
def test_he_init_has_std_sqrt_2_over_fan_in(layer, fan_in):
    init_mod.seed(1)
    m = layer()
    std = math.sqrt(2 / fan_in)
    assert abs(m.weight.data.std() - std) < 0.05 * std
    assert abs(m.weight.data.mean()) < 0.05 * std
    np.testing.assert_array_equal(m.bias.data, 0)


def test_parameters_state_dict_and_dtype():
    m = Conv2d(3, 4, 3, dtype=np.float64)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (4, 3, 3, 3) and m.bias.shape == (4,)
    assert m.weight.data.dtype == np.float64
    m = Conv2d(3, 4, 3, bias=False)
    assert list(m.state_dict()) == ["weight"] and m.bias is None and len(m.parameters()) == 1
    m = ConvTranspose2d(3, 4, (2, 3))
    assert m.weight.shape == (3, 4, 2, 3) and list(m.state_dict()) == ["weight", "bias"]
    assert "Conv2d(3, 4" in repr(Conv2d(3, 4, 3)) and "ConvTranspose2d(3, 4" in repr(m)


def test_input_is_cast_to_the_layer_dtype():
    m = Conv2d(2, 3, 3, padding=1)  # float32
    y = m(np.ones((1, 2, 4, 4), dtype=np.float64))
    assert y.dtype == np.float32
    assert m.backward(np.ones(y.shape)).dtype == np.float32


def test_gradients_accumulate_until_zero_grad():
    rng = np.random.default_rng(0)
    for m in (Conv2d(2, 3, 3, padding=1, dtype=np.float64), ConvTranspose2d(2, 3, 2, stride=2, dtype=np.float64)):
        x = rng.standard_normal((2, 2, 4, 4))
        y = m(x)
        dy = rng.standard_normal(y.shape)
        m.backward(dy)
        once = [p.grad.copy() for p in m.parameters()]
        m(x)
        m.backward(dy)
        for p, g in zip(m.parameters(), once):
            np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-12)
        m.zero_grad()
        assert all(np.all(p.grad == 0) for p in m.parameters())


def test_forward_under_no_grad_keeps_nothing():
    m = Conv2d(1, 1, 3)
    with no_grad():
        m(np.ones((1, 1, 4, 4), dtype=np.float32))
    with pytest.raises(RuntimeError, match="without a forward"):
        m.backward(np.ones((1, 1, 2, 2), dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
LAYERS = [("Conv2d", lambda: Conv2d(3, 2, 3)), ("ConvTranspose2d", lambda: ConvTranspose2d(3, 2, 2, stride=2))]


@pytest.mark.parametrize("name,make", LAYERS)
@pytest.mark.parametrize("bad,exc,words", [
    ([[1.0]], TypeError, "list"), (None, TypeError, "NoneType"), (3.0, TypeError, "float"),
    (np.ones((1, 3, 4, 4), dtype=np.int64), TypeError, "integer"),
    (np.ones((1, 3, 4, 4), dtype=bool), TypeError, "bool"),
    (np.ones((1, 3, 4, 4), dtype=np.complex128), TypeError, "complex"),
    (np.ones((3, 4, 4), dtype=np.float32), ValueError, "4-D.*got 3-D"),
    (np.ones((1, 1, 3, 4, 4), dtype=np.float32), ValueError, "4-D.*got 5-D"),
    (np.ones((1, 5, 4, 4), dtype=np.float32), ValueError, "expected 3 input channels, got 5"),
    (np.ones((0, 3, 4, 4), dtype=np.float32), ValueError, "empty"),
])
def test_bad_input(name, make, bad, exc, words):
    with pytest.raises(exc, match=words):
        make()(bad)
    with pytest.raises(exc, match=name):
        make()(bad)


def test_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"Conv2d: .*5x5.*larger than the padded input 4x4"):
        Conv2d(1, 1, 5, padding=1)(np.ones((1, 1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"spans 5x3 .*dilation 2x1.*padded input 4x6"):
        Conv2d(1, 1, 3, dilation=(2, 1))(np.ones((1, 1, 4, 6), dtype=np.float32))
    with pytest.raises(ValueError, match=r"larger than the padded input"):
        conv_mod.conv2d_forward(np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 3)), None, 1, 0, 1)


def test_transposed_output_that_would_be_empty():
    with pytest.raises(ValueError, match=r"ConvTranspose2d: the output would be -1x-1"):
        ConvTranspose2d(1, 1, 1, padding=1)(np.ones((1, 1, 1, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"output would be"):
        conv_mod.conv_transpose2d_forward(np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), None, 1, 1, 0, 1)


@pytest.mark.parametrize("name,make", LAYERS)
def test_backward_errors(name, make):
    m = make()
    with pytest.raises(RuntimeError, match=f"{name}.backward called without a forward"):
        m.backward(np.ones((1, 2, 2, 2), dtype=np.float32))
    y = m(np.ones((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=re.escape(f"{name}.backward: expected a gradient of shape {y.shape}")):
        m.backward(np.ones((1, 2, 3, 3), dtype=np.float32))
    with pytest.raises(TypeError, match=f"{name}.backward"):
        m.backward([1.0])


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(padding="foo"), ValueError, "padding must be an int, a pair, 'same' or 'valid', got 'foo'"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(kernel_size=(3,)), ValueError, "kernel_size must be an int or a pair"),
    (dict(kernel_size=2.5), TypeError, "kernel_size must be an int, got float"),
    (dict(stride=0), ValueError, "stride must be >= 1, got 0"),
    (dict(dilation=(1, 0)), ValueError, "dilation must be >= 1, got 0"),
    (dict(padding=-1), ValueError, "padding must be >= 0, got -1"),
    (dict(in_channels=0), ValueError, "in_channels must be >= 1, got 0"),
    (dict(out_channels=True), TypeError, "out_channels must be an int, got bool"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (dict(init="xavier"), ValueError, "init must be 'torch' or 'he', got 'xavier'"),
    (dict(dtype=np.int32), TypeError, "dtype must be float32 or float64"),
])
def test_conv2d_bad_arguments(kwargs, exc, words):
    args = dict(in_channels=3, out_channels=2, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=re.escape(words)):
        Conv2d(**args)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(padding="same"), ValueError, "padding must be an int or a pair"),
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1, got 0"),
    (dict(stride=2, output_padding=2), ValueError, "output_padding must be smaller than the stride or"),
    (dict(output_padding=-1), ValueError, "output_padding must be >= 0"),
    (dict(in_channels="3"), TypeError, "in_channels must be an int, got str"),
    (dict(init="xavier"), ValueError, "init must be 'torch' or 'he'"),
])
def test_conv_transpose2d_bad_arguments(kwargs, exc, words):
    args = dict(in_channels=3, out_channels=2, kernel_size=2)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        ConvTranspose2d(**args)


def test_primitives_on_an_empty_batch_give_zero_weight_gradients():
    """The tiled drivers sum per-tile weight gradients; an empty batch has no tiles: zeros, not None."""
    from unet_np.nn.conv import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,
                                 conv_transpose2d_forward)
    x = np.zeros((0, 3, 8, 8))
    y, c = conv2d_forward(x, np.ones((4, 3, 3, 3)), np.ones(4), 1, 1)
    dx, dw, db = conv2d_backward(np.zeros(y.shape), c)
    assert y.shape == (0, 4, 8, 8) and dx.shape == x.shape and dw.shape == (4, 3, 3, 3) and not dw.any()
    y, c = conv_transpose2d_forward(x, np.ones((3, 2, 2, 2)), None, 2)
    dx, dw, db = conv_transpose2d_backward(np.zeros(y.shape), c)
    assert y.shape == (0, 2, 16, 16) and dx.shape == x.shape and dw.shape == (3, 2, 2, 2) and not dw.any()

"""The 3-D layers against PyTorch: Conv3d, ConvTranspose3d, MaxPool3d, Upsample (trilinear, nearest),
Concat, CenterCrop, Pad3d and the losses on (N, C, D, H, W); the tiled driver against the reference
(tiles forced small); the N-d reference against the 2-D one; bad input.

Tolerances: relative error (tests.helpers.rel_err) < TOL64 = 1e-10 in float64 and < TOL32 = 1e-5 in
float32, for the output and every gradient.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from unet_np import nn
from unet_np.nn import conv3d_fast, conv3d_reference, conv_reference
from tests.helpers import TOL32, TOL64, n, rel_err, t

TOLS = {np.float64: TOL64, np.float32: TOL32}
DTYPES = [np.float64, np.float32]
TORCH_DT = {np.float64: torch.float64, np.float32: torch.float32}

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


def _compare(layer, x, torch_fn, dtype, params=()):
    """Run layer forward/backward and torch_fn on the same input and upstream gradient; assert every
    output and gradient within the dtype's tolerance."""
    rng = np.random.default_rng(7)
    x = x.astype(dtype)
    layer.zero_grad()
    y = layer(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    X = torch.tensor(x, requires_grad=True)
    P = {name: torch.tensor(getattr(layer, name).data, requires_grad=True) for name in params
         if getattr(layer, name) is not None}
    Y = torch_fn(X, P)
    Y.backward(torch.tensor(dy))
    tol = TOLS[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert rel_err(y, n(Y)) < tol
    assert rel_err(dx, n(X.grad)) < tol
    for name, p in P.items():
        assert rel_err(getattr(layer, name).grad, n(p.grad)) < tol, name


# ------------------------------------------------------------------------------------------------
# Convolutions
# ------------------------------------------------------------------------------------------------
CONV3D = [
    # x shape, out channels, kernel, stride, padding, dilation, bias
    ((2, 3, 5, 6, 7), 4, 3, 1, 1, 1, True),
    ((1, 2, 3, 6, 5), 3, (1, 3, 3), (1, 2, 1), (0, 1, 1), 1, True),        # nnU-Net's in-plane kernel
    ((2, 2, 7, 6, 5), 3, (2, 3, 2), (2, 1, 3), (1, 2, 0), (1, 2, 1), False),
    ((1, 3, 4, 4, 4), 2, 1, 1, 0, 1, True),                                 # 1x1x1
    ((1, 2, 6, 5, 6), 2, 3, 1, "same", (2, 1, 1), True),
    ((1, 2, 4, 6, 6), 3, (3, 2, 2), 1, "same", 1, True),                    # even kernel: extra after
    ((1, 2, 5, 5, 5), 3, 3, 1, "valid", 1, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out,k,s,p,d,bias", CONV3D)
def test_conv3d_against_torch(shape, out, k, s, p, d, bias, dtype):
    layer = nn.Conv3d(shape[1], out, k, stride=s, padding=p, dilation=d, bias=bias, dtype=dtype)
    x = np.random.default_rng(1).standard_normal(shape)
    _compare(layer, x, lambda X, P: F.conv3d(X, P["weight"], P.get("bias"), s, p, d), dtype,
             ("weight", "bias"))


CONVT3D = [
    # x shape, out channels, kernel, stride, padding, output_padding, dilation
    ((2, 3, 2, 3, 4), 2, 2, 2, 0, 0, 1),                       # the U-Net's up-convolution
    ((1, 2, 2, 3, 3), 3, (1, 2, 2), (1, 2, 2), 0, 0, 1),      # in-plane up-convolution
    ((1, 2, 3, 2, 3), 2, 3, (1, 2, 2), (0, 1, 1), (0, 1, 1), 1),
    ((1, 2, 3, 3, 2), 3, 3, 1, 1, 0, (1, 2, 1)),              # stride 1: the gather path
    ((2, 2, 2, 3, 2), 2, (2, 3, 1), (3, 1, 2), (1, 1, 0), (2, 0, 1), 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,out,k,s,p,op,d", CONVT3D)
def test_conv_transpose3d_against_torch(shape, out, k, s, p, op, d, dtype):
    layer = nn.ConvTranspose3d(shape[1], out, k, stride=s, padding=p, output_padding=op, dilation=d,
                               dtype=dtype)
    x = np.random.default_rng(2).standard_normal(shape)
    _compare(layer, x, lambda X, P: F.conv_transpose3d(X, P["weight"], P["bias"], s, p, op, 1, d),
             dtype, ("weight", "bias"))


sizes = st.integers(1, 3)


@given(k=st.tuples(sizes, sizes, sizes), s=st.tuples(st.integers(1, 2), st.integers(1, 2), sizes),
       p=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
       d=st.tuples(st.integers(1, 2), st.just(1), st.integers(1, 2)), extra=st.tuples(sizes, sizes, sizes),
       channels=st.tuples(st.integers(1, 3), st.integers(1, 3)), batch=st.integers(1, 2),
       dtype=st.sampled_from(DTYPES))
def test_conv3d_hypothesis(k, s, p, d, extra, channels, batch, dtype):
    shape = (batch, channels[0]) + tuple(dd * (kk - 1) + e for kk, dd, e in zip(k, d, extra))
    layer = nn.Conv3d(channels[0], channels[1], k, stride=s, padding=p, dilation=d, dtype=dtype)
    x = np.random.default_rng(3).standard_normal(shape)
    _compare(layer, x, lambda X, P: F.conv3d(X, P["weight"], P["bias"], s, p, d), dtype,
             ("weight", "bias"))


@given(k=st.tuples(sizes, sizes, sizes), s=st.tuples(st.integers(1, 3), st.integers(1, 2), sizes),
       size=st.tuples(sizes, sizes, sizes), channels=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dtype=st.sampled_from(DTYPES))
def test_conv_transpose3d_hypothesis(k, s, size, channels, dtype):
    layer = nn.ConvTranspose3d(channels[0], channels[1], k, stride=s, dtype=dtype)
    x = np.random.default_rng(4).standard_normal((1, channels[0]) + size)
    _compare(layer, x, lambda X, P: F.conv_transpose3d(X, P["weight"], P["bias"], s), dtype,
             ("weight", "bias"))


@pytest.mark.parametrize("case", CONV3D[:3] + CONV3D[4:5])
def test_tiled_driver_matches_reference(case, monkeypatch):
    """Tiles of one depth slice (TILE_BYTES tiny) and the general loops give the reference's numbers."""
    shape, out, k, s, p, d, bias = case
    monkeypatch.setattr(conv3d_fast, "TILE_BYTES", 64)
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape)
    layer = nn.Conv3d(shape[1], out, k, stride=s, padding=p, dilation=d, bias=bias, dtype=np.float64)
    w, b = layer.weight.data, (layer.bias.data if bias else None)
    y, cache = conv3d_fast.conv3d_forward(x, w, b, s, layer._pads, d)
    y_ref, cache_ref = conv3d_reference.conv3d_forward_reference(x, w, b, s, layer._pads, d)
    dy = rng.standard_normal(y.shape)
    assert rel_err(y, y_ref) < TOL64
    for a, r in zip(conv3d_fast.conv3d_backward(dy, cache), conv3d_reference.conv3d_backward_reference(dy, cache_ref)):
        if r is not None:
            assert rel_err(a, r) < TOL64


def test_nd_reference_is_the_2d_reference_in_2d():
    """vol2col / col2vol with two spatial axes compute exactly what im2col / col2im compute."""
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2)), rng.standard_normal(4)
    args = ((2, 1), ((1, 0), (2, 1)), (1, 2))
    y, c = conv3d_reference.conv3d_forward_reference(x, w, b, *args)
    y2, c2 = conv_reference.conv2d_forward_reference(x, w, b, *args)
    dy = rng.standard_normal(y.shape)
    assert rel_err(y, y2) < TOL64
    for a, r in zip(conv3d_reference.conv3d_backward_reference(dy, c),
                    conv_reference.conv2d_backward_reference(dy, c2)):
        assert rel_err(a, r) < TOL64


# ------------------------------------------------------------------------------------------------
# Pooling, upsampling, copies, losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,s,p,shape", [(2, None, 0, (2, 3, 4, 6, 5)), ((1, 2, 2), None, 0, (1, 2, 3, 4, 5)),
                                         (3, (2, 1, 2), 1, (1, 2, 5, 4, 6)), (2, 1, 0, (1, 1, 3, 4, 3))])
def test_maxpool3d_against_torch(k, s, p, shape, dtype):
    x = np.random.default_rng(8).standard_normal(shape)
    x = np.round(x * 2) / 2                                 # many ties: the first maximum must win
    _compare(nn.MaxPool3d(k, s, p), x, lambda X, P: F.max_pool3d(X, k, s, p), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,scale,corners", [("trilinear", 2, False), ("trilinear", (1, 2, 3), False),
                                                ("trilinear", (2, 1, 2), True), ("trilinear", 3, True),
                                                ("nearest", 2, False), ("nearest", (1, 2, 2), False)])
def test_upsample_volume_against_torch(mode, scale, corners, dtype):
    x = np.random.default_rng(9).standard_normal((2, 2, 3, 2, 4))
    kw = {} if mode == "nearest" else {"align_corners": corners}
    _compare(nn.Upsample(scale, mode=mode, **kw), x,
             lambda X, P: F.interpolate(X, scale_factor=scale, mode=mode, **kw), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_copies_on_volumes(dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 2, 5, 4, 6))
    _compare(nn.CenterCrop((3, 3, 4)), x, lambda X, P: X[:, :, 1:4, 0:3, 1:5], dtype)
    _compare(nn.CenterCrop(2), x, lambda X, P: X[:, :, 1:3, 1:3, 2:4], dtype)
    pads = (2, 1, 0, 3, 1, 2)
    _compare(nn.Pad3d(pads), x, lambda X, P: F.pad(X, pads, mode="reflect"), dtype)
    _compare(nn.Pad3d((1, 2, 1), mode="constant", value=-1.5), x,
             lambda X, P: F.pad(X, (1, 1, 2, 2, 1, 1), value=-1.5), dtype)
    cat = nn.Concat()
    a, b = rng.standard_normal((1, 2, 2, 3, 2)).astype(dtype), rng.standard_normal((1, 3, 2, 3, 2)).astype(dtype)
    y = cat(a, b)
    assert np.array_equal(y, np.concatenate([a, b], 1))
    da, db = cat.backward(y)
    assert np.array_equal(da, a) and np.array_equal(db, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_losses_on_volumes(dtype):
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((2, 3, 3, 4, 2)).astype(dtype)
    target = rng.integers(0, 3, (2, 3, 4, 2))
    target[0, 0, 0, 0] = -100
    pw = rng.uniform(0.5, 2, target.shape)
    ce = nn.CrossEntropyLoss()
    L = ce(logits, target, pixel_weight=pw)
    X = torch.tensor(logits, requires_grad=True)
    tt = torch.tensor(target)
    Lt = (F.cross_entropy(X, tt, reduction="none") * torch.tensor(pw, dtype=X.dtype)).sum() / (tt != -100).sum()
    Lt.backward()
    tol = TOLS[dtype]
    assert abs(L - Lt.item()) / abs(Lt.item()) < tol
    assert rel_err(ce.backward(), n(X.grad)) < tol
    bce = nn.BCEWithLogitsLoss()
    ft = rng.uniform(0, 1, logits.shape).astype(dtype)
    L = bce(logits, ft)
    X = torch.tensor(logits, requires_grad=True)
    Lt = F.binary_cross_entropy_with_logits(X, torch.tensor(ft))
    Lt.backward()
    assert abs(L - Lt.item()) / abs(Lt.item()) < tol
    assert rel_err(bce.backward(), n(X.grad)) < tol
    dice = nn.DiceLoss()
    L = dice(logits, np.where(target < 0, 0, target))
    X = torch.tensor(logits, requires_grad=True)
    p = torch.softmax(X, 1)
    y = F.one_hot(torch.tensor(np.where(target < 0, 0, target)), 3).permute(0, 4, 1, 2, 3).to(p.dtype)
    ax = (0, 2, 3, 4)
    Lt = 1 - ((2 * (p * y).sum(ax) + 1) / (p.sum(ax) + y.sum(ax) + 1)).mean()
    Lt.backward()
    assert abs(L - Lt.item()) / abs(Lt.item()) < tol
    assert rel_err(dice.backward(), n(X.grad)) < tol


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer,shape,words", [
    (lambda: nn.Conv3d(2, 3, 3), (1, 2, 5, 5), r"Conv3d: expected a 5-D array \(N, C, D, H, W\), got 4-D.*use Conv2d"),
    (lambda: nn.ConvTranspose3d(2, 3, 2), (1, 2, 5, 5), r"ConvTranspose3d: expected a 5-D.*use ConvTranspose2d"),
    (lambda: nn.Conv2d(2, 3, 3), (1, 2, 5, 5, 5), r"Conv2d: expected a 4-D array \(N, C, H, W\), got 5-D.*use Conv3d"),
    (lambda: nn.ConvTranspose2d(2, 3, 2), (1, 2, 5, 5, 5), r"ConvTranspose2d: expected a 4-D.*use ConvTranspose3d"),
    (lambda: nn.MaxPool3d(2), (1, 2, 4, 4), r"MaxPool3d: expected a 5-D.*use MaxPool2d"),
    (lambda: nn.MaxPool2d(2), (1, 2, 4, 4, 4), r"MaxPool2d: expected a 4-D.*use MaxPool3d"),
    (lambda: nn.Upsample(2, mode="trilinear"), (1, 2, 4, 4), r"trilinear.*5-D.*mode='bilinear'"),
    (lambda: nn.Upsample(2, mode="bilinear"), (1, 2, 4, 4, 4), r"bilinear.*4-D.*mode='trilinear'"),
    (lambda: nn.Pad3d(1), (1, 2, 4, 4), r"Pad3d: expected a 5-D.*use Pad2d"),
    (lambda: nn.Pad2d(1), (1, 2, 4, 4, 4), r"Pad2d: expected a 4-D.*use Pad3d"),
    (lambda: nn.Conv3d(3, 3, 3), (1, 2, 5, 5, 5), r"Conv3d: expected 3 input channels, got 2"),
    (lambda: nn.Conv3d(2, 3, (1, 3, 3)), (1, 2, 4, 2, 5), r"Conv3d: the kernel spans 1x3x3 voxels"),
    (lambda: nn.MaxPool3d((1, 2, 2)), (1, 2, 4, 1, 4), r"smaller than the kernel"),
])
def test_bad_input(layer, shape, words):
    with pytest.raises(ValueError, match=words):
        layer()(np.zeros(shape, dtype=np.float32))


def test_bad_construction():
    with pytest.raises(ValueError, match="triple"):
        nn.Conv3d(2, 3, (3, 3))
    with pytest.raises(ValueError, match="stride 1"):
        nn.Conv3d(2, 3, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="output_padding"):
        nn.ConvTranspose3d(2, 3, 2, stride=2, output_padding=(0, 2, 0))
    with pytest.raises(ValueError, match="half the kernel"):
        nn.MaxPool3d((1, 2, 2), padding=(1, 0, 0))
    with pytest.raises(ValueError, match="triple"):
        nn.Upsample((2, 2), mode="trilinear")
    with pytest.raises(ValueError, match="crop size of 3 entries"):
        nn.CenterCrop((2, 2))(np.zeros((1, 1, 3, 3, 3)))


def test_backend_without_3d_kernels_runs_them_on_the_host():
    """A backend on another array module that keeps a reference 3-D primitive gets a host fallback:
    its arrays go to NumPy and the results come back through its xp.asarray."""
    import types
    from unet_np.backends import Backend
    from unet_np.backends.numpy_backend import HOST_ONLY, reference_ops

    class Device(np.ndarray):                   # stands in for a GPU array type
        pass

    xp = types.SimpleNamespace(__name__="fake_xp", asarray=lambda a, dtype=None: np.asarray(a, dtype).view(Device))
    ref = reference_ops()
    be = Backend("fake", xp, ref)
    for name in HOST_ONLY:
        assert be.ops[name] is not ref[name] and be.ops[name].reference is ref[name]
    assert be.ops["conv2d_forward"] is ref["conv2d_forward"]     # 2-D entries are left alone
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal((1, 2, 3, 4, 3)).view(Device), rng.standard_normal((3, 2, 1, 3, 3))
    y, cache = be.conv3d_forward(x, w, None, 1, (0, 1, 1), 1)
    assert isinstance(y, Device) and y.shape == (1, 3, 3, 4, 3)
    dx, dw, db = be.conv3d_backward(np.ones(y.shape).view(Device), cache)
    assert isinstance(dx, Device) and isinstance(dw, Device) and db is None
    y_ref, _ = ref["conv3d_forward"](np.asarray(x), w, None, 1, (0, 1, 1), 1)
    assert np.array_equal(np.asarray(y), y_ref)


def test_winograd3d_sums_plane_correlations_over_the_depth_taps():
    """unet_np/nn/winograd3d.py's two facts, in NumPy: (1) a kd x 3 x 3 correlation is the sum over
    its depth taps of 2-D correlations of input planes (zero planes past the edges); (2) one GEMM per
    position of stacked_weights (the taps' 2-D weight transforms side by side along K) with a window
    of tap_windows (kd consecutive planes of V) is the sum over taps of U_k @ V_{d + k}."""
    from unet_np.nn import conv_fast, winograd3d as W
    from unet_np.nn.conv3d_reference import conv3d_forward_reference
    from unet_np.nn.conv_reference import conv2d_forward_reference
    rng = np.random.default_rng(5)
    for kd, pads in ((3, ((1, 1), (1, 1), (1, 1))), (1, ((0, 0), (1, 1), (1, 1))), (3, ((2, 0), (0, 2), (1, 0)))):
        x = rng.standard_normal((2, 3, 5, 6, 7))
        w = rng.standard_normal((4, 3, kd, 3, 3))
        y, _ = conv3d_forward_reference(x, w, None, 1, pads, 1)
        pd = pads[0][0]
        planes = []
        for d in range(y.shape[2]):
            acc = 0
            for k in range(kd):
                z = d - pd + k
                if 0 <= z < x.shape[2]:
                    acc = acc + conv2d_forward_reference(x[:, :, z], w[:, :, k], None, 1, pads[1:], 1)[0]
            planes.append(acc)
        assert np.abs(np.stack(planes, axis=2) - y).max() < 1e-12

    class TwoD:             # the kernel table's 2-D weight transform, in its plain NumPy form
        @staticmethod
        def weight_transform(w, out):
            out[...] = conv_fast.wino_weights(w)
            return out
    kd, O, C, T, planes = 3, 4, 5, 7, 6
    w = rng.standard_normal((O, C, kd, 3, 3))
    U3 = W.stacked_weights(w, TwoD)
    V = rng.standard_normal((36, planes, C, T))
    windows = W.tap_windows(V, kd, planes - kd + 1)
    M = np.matmul(np.broadcast_to(U3, (planes - kd + 1,) + U3.shape), windows)
    for d in range(planes - kd + 1):
        want = sum(np.matmul(conv_fast.wino_weights(w[:, :, k]), V[:, d + k]) for k in range(kd))
        assert np.abs(M[d] - want).max() < 1e-12

"""Losses against PyTorch (float64: TOL64, float32: TOL32), finite differences, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from unet_np import backends, gradcheck
from unet_np.nn import BCEWithLogitsLoss, CrossEntropyLoss, DiceLoss, no_grad
from unet_np.nn import loss as loss_mod
from tests.helpers import TOL32, TOL64, n, rel_err, t

DTYPES = [(np.float64, TOL64), (np.float32, TOL32)]


def _labels(rng, shape, C, ignore_frac=0.0, ignore_index=-100):
    y = rng.integers(0, C, size=shape)
    if ignore_frac:
        y[rng.random(shape) < ignore_frac] = ignore_index
    return y


def _torch_ce(x, y, weight=None, ignore_index=-100, pixel_weight=None):
    """PyTorch's loss and d loss / d x; with a pixel weight map, reduction='none' combined by hand:
    sum(pw * w_t * l) / sum(w_t), sum over the pixels not ignored."""
    xt = t(x, requires_grad=True)
    yt = torch.from_numpy(y.astype(np.int64))
    wt = None if weight is None else t(weight.astype(x.dtype))
    if pixel_weight is None:
        lt = F.cross_entropy(xt, yt, weight=wt, ignore_index=ignore_index)
    else:
        per_pixel = F.cross_entropy(xt, yt, weight=wt, ignore_index=ignore_index, reduction="none")
        valid = yt != ignore_index
        w_t = torch.ones_like(per_pixel) if wt is None else wt[torch.where(valid, yt, 0)]
        lt = (t(pixel_weight.astype(x.dtype)) * per_pixel).sum() / (w_t * valid).sum()
    lt.backward()
    return float(lt.detach()), n(xt.grad)


def _check_ce(x, y, tol, weight=None, ignore_index=-100, pixel_weight=None):
    ours = CrossEntropyLoss(weight=weight, ignore_index=ignore_index)
    val = ours(x, y) if pixel_weight is None else ours(x, y, pixel_weight=pixel_weight)
    dx = ours.backward()
    ref, ref_dx = _torch_ce(x, y, weight, ignore_index, pixel_weight)
    assert isinstance(val, float)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert rel_err(val, ref) < tol, (val, ref)
    assert rel_err(dx, ref_dx) < tol


# -- cross-entropy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_ce_matches_torch(dtype, tol, weighted, ignore_frac):
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 5, 7, 6))).astype(dtype)
    y = _labels(rng, (2, 7, 6), 5, ignore_frac)
    w = rng.uniform(0.2, 3.0, 5) if weighted else None
    _check_ce(x, y, tol, weight=w)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ce_2d_logits_and_other_ignore_index(dtype, tol):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 4)).astype(dtype)
    y = _labels(rng, (9,), 4, 0.3, ignore_index=255)
    _check_ce(x, y, tol, weight=rng.uniform(0.5, 2, 4), ignore_index=255)
    _check_ce(x, y.astype(np.int32), tol, ignore_index=255)
    _check_ce(x, y.astype(np.uint8), tol, ignore_index=255)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_ce_pixel_weight_map_matches_torch_none_reduction(dtype, tol, weighted):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    y = _labels(rng, (2, 6, 5), 3, 0.2)
    pw = rng.uniform(0.0, 10.0, y.shape).astype(dtype)
    _check_ce(x, y, tol, weight=rng.uniform(0.5, 2, 3) if weighted else None, pixel_weight=pw)


def test_ce_pixel_weight_of_ones_is_plain_ce():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4))
    y = _labels(rng, (2, 4, 4), 3, 0.2)
    w = rng.uniform(0.5, 2, 3)
    a, b = CrossEntropyLoss(weight=w), CrossEntropyLoss(weight=w)
    assert a(x, y, pixel_weight=np.ones(y.shape)) == b(x, y)
    np.testing.assert_array_equal(a.backward(), b.backward())
    # integer weight maps are accepted too
    assert a(x, y, pixel_weight=np.ones(y.shape, dtype=np.int64)) == b(x, y)


@given(N=st.integers(1, 3), C=st.integers(1, 6), H=st.integers(1, 6), W=st.integers(1, 6),
       weighted=st.booleans(), ignore=st.sampled_from([0.0, 0.4]), use_pw=st.booleans(),
       dtype_i=st.integers(0, 1), seed=st.integers(0, 2**31))
def test_ce_hypothesis(N, C, H, W, weighted, ignore, use_pw, dtype_i, seed):
    dtype, tol = DTYPES[dtype_i]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C, H, W)) * rng.uniform(0.1, 20)).astype(dtype)
    y = _labels(rng, (N, H, W), C, ignore)
    y.reshape(-1)[0] = rng.integers(0, C)       # at least one pixel counts
    w = rng.uniform(0.1, 3, C) if weighted else None
    pw = rng.uniform(0, 5, (N, H, W)).astype(dtype) if use_pw else None
    _check_ce(x, y, tol, weight=w, pixel_weight=pw)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_ce_stable_for_huge_logits(dtype, tol):
    rng = np.random.default_rng(4)
    x = (1e4 * rng.standard_normal((2, 3, 4, 4))).astype(dtype)
    x[0, :, 0, 0] = [1e4, -1e4, 1e4]
    y = _labels(rng, (2, 4, 4), 3)
    ours = CrossEntropyLoss()
    val = ours(x, y)
    dx = ours.backward()
    assert np.isfinite(val) and np.all(np.isfinite(dx))
    _check_ce(x, y, tol)


def test_ce_all_ignored_is_nan_with_zero_gradient_like_torch():
    x = np.random.default_rng(5).standard_normal((1, 3, 2, 2))
    y = np.full((1, 2, 2), -100)
    ours = CrossEntropyLoss()
    assert np.isnan(ours(x, y))
    ref, ref_dx = _torch_ce(x, y)
    assert np.isnan(ref)
    np.testing.assert_array_equal(ours.backward(), ref_dx)
    np.testing.assert_array_equal(ours.backward(), np.zeros_like(x))


def test_ce_backward_scales_by_dy_and_keeps_dtype():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 3, 3)).astype(np.float32)
    y = _labels(rng, (2, 3, 3), 3)
    ours = CrossEntropyLoss()
    ours(x, y)
    g1, g3 = ours.backward(), ours.backward(3.0)
    assert g1.dtype == g3.dtype == np.float32
    np.testing.assert_allclose(g3, 3 * g1, rtol=1e-6)


# -- binary cross-entropy with logits ----------------------------------------------------------------

def _check_bce(x, y, tol, pos_weight=None):
    ours = BCEWithLogitsLoss(pos_weight=pos_weight)
    val = ours(x, y)
    dx = ours.backward()
    xt = t(x, requires_grad=True)
    pwt = None if pos_weight is None else t(np.asarray(pos_weight, dtype=x.dtype))
    lt = F.binary_cross_entropy_with_logits(xt, t(y), pos_weight=pwt)
    lt.backward()
    assert isinstance(val, float) and dx.dtype == x.dtype
    assert rel_err(val, float(lt.detach())) < tol
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("pw_shape", [None, (3, 1, 1), (5,), (1,), ()])
def test_bce_matches_torch(dtype, tol, pw_shape):
    rng = np.random.default_rng(7)
    x = (3 * rng.standard_normal((2, 3, 4, 5))).astype(dtype)
    y = rng.uniform(0, 1, x.shape).astype(dtype)
    y[0, 0] = rng.integers(0, 2, y[0, 0].shape)
    pw = None if pw_shape is None else rng.uniform(0.2, 4.0, pw_shape)
    _check_bce(x, y, tol, pw)


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), use_pw=st.booleans(),
       dtype_i=st.integers(0, 1), seed=st.integers(0, 2**31))
def test_bce_hypothesis(shape, use_pw, dtype_i, seed):
    dtype, tol = DTYPES[dtype_i]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 30)).astype(dtype)
    y = rng.uniform(0, 1, shape).astype(dtype)
    pw = rng.uniform(0.1, 5, shape[-1:]) if use_pw else None
    _check_bce(x, y, tol, pw)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_bce_stable_for_huge_logits(dtype, tol):
    x = np.array([[[[-1e4, 1e4, 0.0, 1e4, -1e4]]]], dtype=dtype)
    y = np.array([[[[0.0, 1.0, 0.5, 0.0, 1.0]]]], dtype=dtype)
    ours = BCEWithLogitsLoss()
    assert np.isfinite(ours(x, y)) and np.all(np.isfinite(ours.backward()))
    _check_bce(x, y, tol)
    _check_bce(x, y, tol, pos_weight=np.array([2.0]))


# -- soft Dice -----------------------------------------------------------------------------------------

def _torch_dice_softmax(xt, y, smooth, eps, ignore_index, include_background):
    """The Dice formula written with torch autograd: the reference for DiceLoss(mode='softmax')."""
    C = xt.shape[1]
    yt = torch.from_numpy(y)
    valid = yt != ignore_index if ignore_index is not None else torch.ones_like(yt, dtype=torch.bool)
    p = torch.softmax(xt, dim=1)
    onehot = F.one_hot(torch.where(valid, yt, 0), C).movedim(-1, 1).to(xt.dtype)
    m = valid.unsqueeze(1).to(xt.dtype)
    dims = (0,) + tuple(range(2, xt.ndim))
    inter = (p * onehot * m).sum(dims)
    den = ((p * m).sum(dims) + (onehot * m).sum(dims) + smooth).clamp_min(eps)
    dice = (2 * inter + smooth) / den
    return 1 - (dice if include_background else dice[1:]).mean()


def _torch_dice_sigmoid(xt, yt, smooth, eps):
    p = torch.sigmoid(xt)
    dims = (0,) + tuple(range(2, xt.ndim))
    den = (p.sum(dims) + yt.sum(dims) + smooth).clamp_min(eps)
    return 1 - ((2 * (p * yt).sum(dims) + smooth) / den).mean()


def _check_dice(x, y, tol, **kw):
    ours = DiceLoss(**kw)
    val = ours(x, y)
    dx = ours.backward()
    xt = t(x, requires_grad=True)
    smooth, eps = kw.get("smooth", 1.0), kw.get("eps", 1e-7)
    if kw.get("mode", "softmax") == "softmax":
        lt = _torch_dice_softmax(xt, y, smooth, eps, kw.get("ignore_index", -100),
                                 kw.get("include_background", True))
    else:
        lt = _torch_dice_sigmoid(xt, t(y), smooth, eps)
    lt.backward()
    assert isinstance(val, float) and dx.dtype == x.dtype and dx.shape == x.shape
    assert rel_err(val, float(lt.detach())) < tol, (val, float(lt.detach()))
    assert rel_err(dx, n(xt.grad)) < tol


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"smooth": 0.0}, {"smooth": 5.0}, {"include_background": False},
                                {"ignore_index": None}, {"smooth": 0.0, "include_background": False}])
@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
def test_dice_softmax_matches_torch_formula(dtype, tol, kw, ignore_frac):
    rng = np.random.default_rng(8)
    x = (2 * rng.standard_normal((2, 4, 6, 5))).astype(dtype)
    y = _labels(rng, (2, 6, 5), 4, ignore_frac if kw.get("ignore_index", -100) is not None else 0.0)
    _check_dice(x, y, tol, **kw)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"smooth": 0.0}, {"smooth": 3.0, "eps": 1e-3}])
@pytest.mark.parametrize("C", [1, 3])
def test_dice_sigmoid_matches_torch_formula(dtype, tol, kw, C):
    rng = np.random.default_rng(9)
    x = (2 * rng.standard_normal((2, C, 5, 6))).astype(dtype)
    y = (rng.random(x.shape) < 0.4).astype(dtype)
    _check_dice(x, y, tol, mode="sigmoid", **kw)


def test_dice_eps_clamp_active_matches_torch():
    # smooth = 0 and a class absent from the target, its probability ~0: the eps floor binds.
    x = np.zeros((1, 2, 2, 2))
    x[:, 0] = 60.0
    y = np.zeros((1, 2, 2), dtype=np.int64)
    _check_dice(x, y, TOL64, smooth=0.0, eps=1e-3)
    xs = np.full((1, 1, 2, 2), -60.0)
    _check_dice(xs, np.zeros_like(xs), TOL64, mode="sigmoid", smooth=0.0, eps=1e-3)


@given(N=st.integers(1, 3), C=st.integers(2, 5), H=st.integers(1, 6), W=st.integers(1, 6),
       mode=st.sampled_from(["softmax", "sigmoid"]), smooth=st.sampled_from([0.0, 1.0, 2.5]),
       include_background=st.booleans(), ignore=st.sampled_from([0.0, 0.3]),
       dtype_i=st.integers(0, 1), seed=st.integers(0, 2**31))
def test_dice_hypothesis(N, C, H, W, mode, smooth, include_background, ignore, dtype_i, seed):
    dtype, tol = DTYPES[dtype_i]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, C, H, W)) * rng.uniform(0.1, 5)).astype(dtype)
    if mode == "softmax":
        y = _labels(rng, (N, H, W), C, ignore)
        _check_dice(x, y, tol, smooth=smooth, include_background=include_background)
    else:
        y = rng.uniform(0, 1, x.shape).astype(dtype)
        _check_dice(x, y, tol, mode="sigmoid", smooth=smooth)


# -- finite differences ---------------------------------------------------------------------------------

def test_gradcheck_all_losses():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 3, 2))
    y = _labels(rng, (2, 3, 2), 3, 0.25)
    y[0, 0, 0] = 1
    yf = rng.uniform(0, 1, x.shape)
    pw = rng.uniform(0, 4, y.shape)
    cases = [
        (CrossEntropyLoss(), y, {}),
        (CrossEntropyLoss(weight=[0.5, 2.0, 1.0]), y, {"pixel_weight": pw}),
        (BCEWithLogitsLoss(), yf, {}),
        (BCEWithLogitsLoss(pos_weight=np.array([[[2.0]], [[0.5]], [[3.0]]])), yf, {}),
        (DiceLoss(), y, {}),
        (DiceLoss(smooth=0.0, include_background=False), y, {}),
        (DiceLoss(mode="sigmoid"), yf, {}),
    ]
    for loss, target, kw in cases:
        err = gradcheck(loss, x, target=target, **kw)
        assert err["input"] < 1e-7, (loss, err)


# -- plumbing ------------------------------------------------------------------------------------------

def test_primitives_are_in_the_numpy_backend():
    b = backends.get("numpy")
    for name in loss_mod.OPS:
        assert getattr(b, name) is getattr(loss_mod, name)


def test_primitive_softmax_cross_entropy_direct_call():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 4, 4))
    y = _labels(rng, (2, 4, 4), 3, 0.2)
    loss, cache = loss_mod.softmax_cross_entropy_forward(x, y, None, -100, None)
    dx = loss_mod.softmax_cross_entropy_backward(cache)
    ref, ref_dx = _torch_ce(x, y)
    assert rel_err(loss, ref) < TOL64 and rel_err(dx, ref_dx) < TOL64


@pytest.mark.parametrize("make,target", [
    (CrossEntropyLoss, np.zeros((1, 2, 2), dtype=np.int64)),
    (DiceLoss, np.zeros((1, 2, 2), dtype=np.int64)),
    (BCEWithLogitsLoss, np.zeros((1, 2, 2, 2))),
])
def test_backward_needs_a_forward_that_kept_its_cache(make, target):
    loss = make()
    with pytest.raises(RuntimeError, match="without a forward"):
        loss.backward()
    with no_grad():
        loss(np.zeros((1, 2, 2, 2)), target)
    with pytest.raises(RuntimeError, match="without a forward"):
        loss.backward()


def test_backward_dy_must_be_scalar():
    loss = CrossEntropyLoss()
    loss(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="scalar"):
        loss.backward(np.ones(3))


# -- bad input -----------------------------------------------------------------------------------------

X = np.zeros((2, 3, 4, 5))
Y = np.zeros((2, 4, 5), dtype=np.int64)


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), DiceLoss()])
def test_class_target_errors(loss):
    name = type(loss).__name__
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 3, 4, 5\)"):
        loss(X, np.zeros((2, 4, 4), dtype=np.int64))
    with pytest.raises(ValueError, match=name):
        loss(X, np.zeros((2, 1, 4, 5), dtype=np.int64))
    with pytest.raises(TypeError, match="float"):
        loss(X, Y.astype(np.float32))
    with pytest.raises(TypeError, match="bool"):
        loss(X, Y.astype(bool))
    with pytest.raises(TypeError, match="list"):
        loss(X, Y.tolist())
    bad = Y.copy()
    bad[1, 2, 3] = 3
    with pytest.raises(ValueError, match=r"value 3 at position \(n, h, w\) = \(1, 2, 3\).*\[0, 3\)"):
        loss(X, bad)
    bad = Y.copy()
    bad[0, 3, 1] = -1
    bad[1, 0, 0] = 7
    with pytest.raises(ValueError, match=r"value -1 at position \(n, h, w\) = \(0, 3, 1\)"):
        loss(X, bad)


def test_ce_2d_bad_value_names_position():
    with pytest.raises(ValueError, match=r"value 5 at position \(n\) = \(2,\)"):
        CrossEntropyLoss()(np.zeros((4, 3)), np.array([0, 1, 5, 2]))


@pytest.mark.parametrize("loss,target", [(CrossEntropyLoss(), Y), (DiceLoss(), Y),
                                         (BCEWithLogitsLoss(), X), (DiceLoss(mode="sigmoid"), X)])
def test_logits_errors(loss, target):
    name = type(loss).__name__
    with pytest.raises(TypeError, match=f"{name}.*integer"):
        loss(X.astype(np.int64), target)
    with pytest.raises(TypeError, match=f"{name}.*list"):
        loss(X.tolist(), target)
    with pytest.raises(TypeError, match=f"{name}.*NoneType"):
        loss(None, target)


@pytest.mark.parametrize("loss", [CrossEntropyLoss(), DiceLoss()])
def test_logits_need_a_class_axis(loss):
    with pytest.raises(ValueError, match=r"1-D with shape \(4,\)"):
        loss(np.zeros(4), np.zeros(4, dtype=np.int64))


@pytest.mark.parametrize("loss", [BCEWithLogitsLoss(), DiceLoss(mode="sigmoid")])
def test_float_target_errors(loss):
    with pytest.raises(ValueError, match=r"\(2, 1, 4, 5\).*\(2, 3, 4, 5\)"):
        loss(X, np.zeros((2, 1, 4, 5)))
    with pytest.raises(TypeError, match="integer"):
        loss(X, X.astype(np.int64))
    with pytest.raises(TypeError, match="bool"):
        loss(X, X.astype(bool))


def test_ce_weight_and_pixel_weight_errors():
    with pytest.raises(ValueError, match=r"weight has 2 entries.*3 classes"):
        CrossEntropyLoss(weight=np.ones(2))(X, Y)
    with pytest.raises(ValueError, match="1-D"):
        CrossEntropyLoss(weight=np.ones((3, 1)))
    with pytest.raises(TypeError, match="real"):
        CrossEntropyLoss(weight=np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match="ignore_index"):
        CrossEntropyLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match=r"pixel_weight shape \(2, 4\).*\(2, 4, 5\)"):
        CrossEntropyLoss()(X, Y, pixel_weight=np.ones((2, 4)))
    with pytest.raises(TypeError, match="pixel_weight"):
        CrossEntropyLoss()(X, Y, pixel_weight=np.ones((2, 4, 5), dtype=np.complex128))
    with pytest.raises(TypeError, match="pixel_weight"):
        CrossEntropyLoss()(X, Y, pixel_weight=[[1.0]])


def test_bce_pos_weight_must_broadcast():
    with pytest.raises(ValueError, match=r"pos_weight of shape \(3,\).*\(2, 3, 4, 5\).*\(C, 1, 1\)"):
        BCEWithLogitsLoss(pos_weight=np.ones(3))(X, X)


def test_dice_settings_errors():
    with pytest.raises(ValueError, match="mode"):
        DiceLoss(mode="softplus")
    with pytest.raises(ValueError, match="smooth"):
        DiceLoss(smooth=-1.0)
    with pytest.raises(ValueError, match="eps"):
        DiceLoss(eps=float("nan"))
    with pytest.raises(TypeError, match="smooth"):
        DiceLoss(smooth="1")
    with pytest.raises(ValueError, match="both be 0"):
        DiceLoss(smooth=0, eps=0)
    with pytest.raises(ValueError, match="sigmoid"):
        DiceLoss(mode="sigmoid", include_background=False)
    with pytest.raises(ValueError, match="at least 2 classes"):
        DiceLoss(include_background=False)(np.zeros((1, 1, 2, 2)), np.zeros((1, 2, 2), dtype=np.int64))

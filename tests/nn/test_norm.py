import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from unet_np import gradcheck
from unet_np.nn import BatchNorm2d
from unet_np.nn.norm import batchnorm2d_backward, batchnorm2d_forward
from tests.helpers import TOL32, TOL64, n, rel_err, t

DTYPES = [(np.float64, TOL64), (np.float32, TOL32)]


def _pair(C, dtype, seed=0, **kw):
    """Our layer and torch's, with the same random affine parameters."""
    rng = np.random.default_rng(seed)
    ours = BatchNorm2d(C, dtype=dtype, **kw)
    theirs = torch.nn.BatchNorm2d(C, dtype=torch.float64 if dtype == np.float64 else torch.float32,
                                  **kw)
    if ours.affine:
        w = (rng.standard_normal(C) + 1).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        ours.weight.data[...] = w
        ours.bias.data[...] = b
        with torch.no_grad():
            theirs.weight.copy_(t(w))
            theirs.bias.copy_(t(b))
    return ours, theirs


def _compare(ours, theirs, x, dy, tol):
    y = ours(x)
    cache = ours._cache[0]              # the primitive's cache (the backward releases it)
    xt = t(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(t(dy))
    dx = ours.backward(dy)
    assert y.dtype == x.dtype and dx.dtype == x.dtype
    assert rel_err(y, n(yt)) < tol
    # dx = gamma/sigma * (dy - mean(dy) - xhat mean(dy xhat)) can be far smaller than its terms
    # (with 2 values per channel it nearly cancels to 0), and then any float32 result, PyTorch's
    # included, is off by ~1e-7 of the TERMS. So dx's error is measured against the larger of
    # max|dx| and the scale of those terms, max|gamma / sigma| * max|dy|.
    inv_std = cache[3]
    gamma = ours.weight.data if ours.affine else 1.0
    terms = float(np.max(np.abs(gamma * inv_std))) * float(np.max(np.abs(dy)))
    ref = n(xt.grad)
    assert np.max(np.abs(dx.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), terms) < tol
    if ours.affine:
        # dgamma = sum dy * xhat and dbeta = sum dy are sums of M terms that may cancel to far
        # below the terms; the rounding of ANY float computation of them (PyTorch's too) is then of
        # the order eps * ||terms||_2, so that norm (largest over channels) is the error's floor.
        xhat = cache[1] if cache[0] else (x - ours.running_mean.reshape(1, -1, 1, 1)) \
            * inv_std.reshape(1, -1, 1, 1)
        for ours_g, theirs_g, terms in ((ours.weight.grad, theirs.weight.grad, dy * xhat),
                                        (ours.bias.grad, theirs.bias.grad, dy)):
            floor = float(np.max(np.sqrt(np.sum(np.square(terms.astype(np.float64)), axis=(0, 2, 3)))))
            ref = n(theirs_g)
            assert np.max(np.abs(ours_g - ref)) / max(np.max(np.abs(ref)), floor) < tol
    if ours.track_running_stats:
        assert rel_err(ours.running_mean, n(theirs.running_mean)) < tol
        assert rel_err(ours.running_var, n(theirs.running_var)) < tol
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (1, 2, 3, 1), (3, 5, 1, 1), (2, 4, 16, 16)])
def test_train_matches_torch(shape, dtype, tol):
    rng = np.random.default_rng(1)
    x = (3 * rng.standard_normal(shape) + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ours, theirs = _pair(shape[1], dtype)
    _compare(ours, theirs, x, dy, tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_over_steps_then_eval(dtype, tol, momentum):
    """Several training steps (running statistics, num_batches_tracked), then evaluation."""
    rng = np.random.default_rng(2)
    C = 3
    ours, theirs = _pair(C, dtype, momentum=momentum)
    for step in range(4):
        x = (rng.standard_normal((3, C, 4, 5)) * (step + 1) + step).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        _compare(ours, theirs, x, dy, tol)
    ours.eval()
    theirs.eval()
    ours.zero_grad()
    theirs.zero_grad()
    x = (rng.standard_normal((2, C, 3, 3)) + 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _compare(ours, theirs, x, dy, tol)
    assert int(ours.num_batches_tracked) == 4


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kw", [dict(affine=False), dict(track_running_stats=False),
                                dict(affine=False, track_running_stats=False), dict(eps=1e-3)])
def test_options_match_torch(kw, dtype, tol):
    rng = np.random.default_rng(3)
    ours, theirs = _pair(2, dtype, **kw)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x = rng.standard_normal((2, 2, 3, 4)).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        if theirs.weight is not None:
            theirs.weight.grad = None
            theirs.bias.grad = None
        ours.zero_grad()
        _compare(ours, theirs, x, dy, tol)


@given(N=st.integers(1, 3), C=st.integers(1, 4), H=st.integers(1, 6), W=st.integers(1, 6),
       train=st.booleans(), seed=st.integers(0, 2**16), f32=st.booleans())
def test_hypothesis_matches_torch(N, C, H, W, train, seed, f32):
    if train and N * H * W < 2:
        return
    dtype, tol = DTYPES[1] if f32 else DTYPES[0]
    rng = np.random.default_rng(seed)
    ours, theirs = _pair(C, dtype, seed=seed)
    if not train:  # give the running statistics something to hold first
        x0 = rng.standard_normal((2, C, 2, 2)).astype(dtype)
        ours(x0)
        theirs(t(x0))
        ours.eval()
        theirs.eval()
    x = (rng.standard_normal((N, C, H, W)) * 2 - 1).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    _compare(ours, theirs, x, dy, tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_channel_gives_no_nan(dtype):
    x = np.ones((2, 2, 3, 3), dtype=dtype) * 7
    x[:, 1] = np.random.default_rng(0).standard_normal((2, 3, 3))
    bn = BatchNorm2d(2, dtype=dtype)
    y = bn(x)
    dx = bn.backward(np.ones_like(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
    assert np.all(np.isfinite(bn.running_var)) and np.all(np.isfinite(bn.weight.grad))
    np.testing.assert_allclose(y[:, 0], 0, atol=1e-3)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck(train, affine):
    rng = np.random.default_rng(4)
    bn = BatchNorm2d(2, dtype=np.float64, affine=affine)
    if affine:
        bn.weight.data[...] = rng.standard_normal(2) + 1
        bn.bias.data[...] = rng.standard_normal(2)
    bn(rng.standard_normal((2, 2, 3, 3)))
    if not train:
        bn.eval()
    # finite differences must not move the running statistics: compare in a copy of the state
    state = bn.state_dict()
    x = rng.standard_normal((2, 2, 2, 3))
    bn.momentum = 0.0
    err = gradcheck(bn, x)
    bn.load_state_dict(state)
    assert max(err.values()) < 1e-7, err


def test_primitive_contract():
    """The documented shapes and return values of the primitives."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 4))
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    y, cache, mu, var = batchnorm2d_forward(x, g, b, None, None, 1e-5, True)
    np.testing.assert_allclose(mu, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(axis=(0, 2, 3)), rtol=1e-12)
    dx, dg, db = batchnorm2d_backward(np.ones_like(y), cache)
    assert dx.shape == x.shape and dg.shape == (3,) and db.shape == (3,)
    np.testing.assert_allclose(dx, 0, atol=1e-12)  # a constant upstream gradient is normalised away
    y, cache, mu, var = batchnorm2d_forward(x, g, b, mu, var + 1, 1e-5, False)
    assert mu is None and var is None


def test_state_dict_matches_torch_names():
    bn = BatchNorm2d(3)
    sd = bn.state_dict()
    assert list(sd) == list(torch.nn.BatchNorm2d(3).state_dict())
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    assert [p.shape for p in bn.parameters()] == [(3,), (3,)]
    bn(np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32))
    bn2 = BatchNorm2d(3).load_state_dict(bn.state_dict())
    assert int(bn2.num_batches_tracked) == 1
    np.testing.assert_array_equal(bn2.running_mean, bn.running_mean)


def test_float32_input_is_cast_by_a_float64_layer():
    bn = BatchNorm2d(2, dtype=np.float64)
    assert bn(np.ones((2, 2, 2, 2), dtype=np.float32)).dtype == np.float64


@pytest.mark.parametrize("bad,exc,words", [
    ([[1.0]], TypeError, "list"),
    (np.ones((2, 3, 2, 2), dtype=np.int64), TypeError, "integer"),
    (np.ones((2, 3, 2)), ValueError, "4-D"),
    (np.ones((2, 4, 2, 2)), ValueError, "expected 3 input channels, got 4"),
    (np.ones((1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc, match=words):
        BatchNorm2d(3)(bad)
    with pytest.raises(exc, match="BatchNorm2d"):
        BatchNorm2d(3)(bad)


def test_single_value_per_channel_is_fine_in_eval():
    bn = BatchNorm2d(3).eval()
    assert bn(np.ones((1, 3, 1, 1), dtype=np.float32)).shape == (1, 3, 1, 1)


@pytest.mark.parametrize("kw,exc", [(dict(num_features=0), ValueError),
                                    (dict(num_features=2.5), TypeError),
                                    (dict(num_features=2, eps=0), ValueError),
                                    (dict(num_features=2, momentum=2), ValueError),
                                    (dict(num_features=2, dtype=np.int32), TypeError)])
def test_bad_construction(kw, exc):
    with pytest.raises(exc):
        BatchNorm2d(**kw)


def test_backward_errors():
    bn = BatchNorm2d(2)
    with pytest.raises(RuntimeError, match="without a forward"):
        bn.backward(np.ones((2, 2, 2, 2)))
    bn(np.ones((2, 2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="BatchNorm2d: backward expected dy of shape"):
        bn.backward(np.ones((2, 2, 3, 2), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------
# BatchNorm3d, InstanceNorm2d/3d, GroupNorm against PyTorch (forward, input and parameter gradients,
# running statistics), in train and eval mode, float64 and float32, on the numpy and numba backends
# ---------------------------------------------------------------------------------------------------
from unet_np import backends as _backends          # noqa: E402
from unet_np.nn import BatchNorm3d, GroupNorm, InstanceNorm2d, InstanceNorm3d  # noqa: E402

BACKENDS = [b for b in ("numpy", "numba") if b in _backends.available()]


def _compare_layers(ours, theirs, shape, dtype, tol, train=True, seed=0, steps=2):
    """Run ``steps`` forward/backward passes through both layers; every output, input gradient,
    parameter gradient and buffer must agree to ``tol`` (relative)."""
    rng = np.random.default_rng(seed)
    ours.train(train)
    theirs.train(train)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    theirs.to(tdt)
    for _ in range(steps):
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        y = ours.forward(x)
        tx = t(x, requires_grad=True)
        ty = theirs(tx)
        ty.backward(t(g))
        dx = ours.backward(g)
        assert y.dtype == dtype and dx.dtype == dtype
        assert rel_err(y, n(ty)) < tol
        assert rel_err(dx, n(tx.grad)) < tol
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(_backends.to_numpy(p.grad), n(theirs_params[name].grad)) < tol, name
    theirs_state = theirs.state_dict()
    ours_state = ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    for name, v in ours_state.items():
        assert v.shape == tuple(theirs_state[name].shape), name
        assert rel_err(v, n(theirs_state[name])) < tol, name


def _same_state(ours, theirs, seed=3):
    """Random affine parameters and perturbed running statistics, the same on both sides."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, v in ours.state_dict().items():
        if name == "num_batches_tracked":
            sd[name] = v
        elif name == "running_var":
            sd[name] = rng.uniform(0.5, 2.0, v.shape)
        else:
            sd[name] = rng.standard_normal(v.shape)
    ours.load_state_dict(sd)
    theirs.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()})


NORM_CASES = [
    ("BatchNorm3d", lambda dt, be: BatchNorm3d(3, dtype=dt, backend=be),
     lambda: torch.nn.BatchNorm3d(3), (2, 3, 3, 4, 5)),
    ("InstanceNorm2d affine", lambda dt, be: InstanceNorm2d(3, affine=True, dtype=dt, backend=be),
     lambda: torch.nn.InstanceNorm2d(3, affine=True), (2, 3, 5, 4)),
    ("InstanceNorm2d plain", lambda dt, be: InstanceNorm2d(3, dtype=dt, backend=be),
     lambda: torch.nn.InstanceNorm2d(3), (2, 3, 5, 4)),
    ("InstanceNorm2d running stats",
     lambda dt, be: InstanceNorm2d(3, affine=True, track_running_stats=True, momentum=0.3, dtype=dt,
                                   backend=be),
     lambda: torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True, momentum=0.3),
     (2, 3, 5, 4)),
    ("InstanceNorm3d running stats, no affine",
     lambda dt, be: InstanceNorm3d(2, track_running_stats=True, dtype=dt, backend=be),
     lambda: torch.nn.InstanceNorm3d(2, track_running_stats=True), (3, 2, 3, 4, 2)),
    ("InstanceNorm3d affine", lambda dt, be: InstanceNorm3d(2, affine=True, dtype=dt, backend=be),
     lambda: torch.nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 4, 2)),
    ("GroupNorm 2 of 4", lambda dt, be: GroupNorm(2, 4, dtype=dt, backend=be),
     lambda: torch.nn.GroupNorm(2, 4), (2, 4, 5, 3)),
    ("GroupNorm 3-D, 1 group, no affine", lambda dt, be: GroupNorm(1, 3, affine=False, dtype=dt, backend=be),
     lambda: torch.nn.GroupNorm(1, 3, affine=False), (2, 3, 2, 3, 4)),
    ("GroupNorm one group per channel", lambda dt, be: GroupNorm(4, 4, dtype=dt, backend=be),
     lambda: torch.nn.GroupNorm(4, 4), (1, 4, 3, 3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,tol", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("name,make,make_torch,shape", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_norm_layers_match_torch(name, make, make_torch, shape, dtype, tol, train, backend):
    ours, theirs = make(dtype, backend), make_torch().double()
    _same_state(ours, theirs)
    _compare_layers(ours, theirs, shape, dtype, tol, train=train)


def test_instance_norm_running_stats_update_and_eval_use_them():
    ours = InstanceNorm2d(2, track_running_stats=True, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 2, 4, 4)) * 3 + 1
    ours.forward(x)
    mu = x.mean(axis=(2, 3)).mean(axis=0)
    var = x.var(axis=(2, 3), ddof=1).mean(axis=0)
    np.testing.assert_allclose(ours.running_mean, 0.1 * mu, rtol=1e-12)
    np.testing.assert_allclose(ours.running_var, 0.9 + 0.1 * var, rtol=1e-12)
    assert int(ours.num_batches_tracked) == 0          # as PyTorch's InstanceNorm: never counted
    ours.eval()
    y = ours.forward(x)
    np.testing.assert_allclose(y, (x - ours.running_mean.reshape(1, 2, 1, 1))
                               / np.sqrt(ours.running_var.reshape(1, 2, 1, 1) + 1e-5), rtol=1e-12)


def test_norm_layer_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match="InstanceNorm2d: expected 3 input channels"):
        InstanceNorm2d(3)(np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="InstanceNorm3d: expected a 5-D array"):
        InstanceNorm3d(3)(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="BatchNorm3d: expected a 5-D array"):
        BatchNorm3d(3)(np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="more than 1 spatial value"):
        InstanceNorm2d(3)(np.zeros((2, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match="InstanceNorm2d: backward expected dy"):
        m = InstanceNorm2d(3)
        m(np.ones((1, 3, 2, 2)))
        m.backward(np.ones((1, 3, 2, 3)))

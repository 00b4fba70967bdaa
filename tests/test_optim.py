"""Optimizers, schedules and clipping against torch.optim step for step.

Trajectories: 20 steps in float64 on the same initial arrays and gradient sequence, every parameter
within 1e-12 relative (TOL_TRAJ: the update is the same arithmetic; only an FMA inside PyTorch's
kernels can change a last bit); float32 within TOL32. Learning-rate sequences within 1e-12.
"""
import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from unet_np import optim
from unet_np.nn import Parameter, ReLU
from tests.helpers import TOL32, rel_err

TOL_TRAJ = 1e-12
SHAPES = [(4, 3, 3, 3), (4,), (2, 5)]

OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.99, "weight_decay": 1e-3}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.05, "momentum": 0.7, "dampening": 0.25}),
    ("Adam", {}),
    ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05}),
    ("Adam", {"lr": 0.01, "amsgrad": True}),
    ("Adam", {"lr": 0.01, "betas": (0.3, 0.6)}),     # lerp weight >= 0.5: torch's other branch
    ("AdamW", {}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {"lr": 0.02, "betas": (0.4, 0.9), "weight_decay": 0.0}),
]


def _problem(dtype, seed=0, steps=20):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(dtype) for s in SHAPES]
             for _ in range(steps)]
    return init, grads


def _run_ours(name, kw, init, grads, opt=None, params=None):
    params = params or [Parameter(a.copy()) for a in init]
    opt = opt or getattr(optim, name)(params, **kw)
    traj = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad[...] = g
        opt.step()
        traj.append([p.data.copy() for p in params])
    return traj, opt, params


def _run_torch(name, kw, init, grads):
    params = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    opt = getattr(torch.optim, name)(params, **kw)
    traj = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        traj.append([p.detach().numpy().copy() for p in params])
    return traj


def _worst(a, b):
    return max(rel_err(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


@pytest.mark.parametrize("name,kw", OPTIMIZERS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL_TRAJ), (np.float32, TOL32)])
def test_trajectory_matches_torch(name, kw, dtype, tol):
    init, grads = _problem(dtype)
    ours, _, params = _run_ours(name, kw, init, grads)
    assert all(p.data.dtype == dtype for p in params)
    err = _worst(ours, _run_torch(name, kw, init, grads))
    assert err < tol, err


@given(name=st.sampled_from(["SGD", "Adam", "AdamW"]), lr=st.floats(1e-4, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]), nesterov=st.booleans(),
       dampening=st.sampled_from([0.0, 0.1]), wd=st.sampled_from([0.0, 1e-4, 0.1]),
       b1=st.floats(0.0, 0.99), b2=st.floats(0.0, 0.9999), amsgrad=st.booleans(),
       seed=st.integers(0, 2**31))
def test_trajectory_hypothesis(name, lr, momentum, nesterov, dampening, wd, b1, b2, amsgrad, seed):
    if name == "SGD":
        nesterov = nesterov and momentum > 0
        kw = {"lr": lr, "momentum": momentum, "weight_decay": wd, "nesterov": nesterov,
              "dampening": 0.0 if nesterov else dampening}
    else:
        kw = {"lr": lr, "betas": (b1, b2), "weight_decay": wd, "amsgrad": amsgrad}
    init, grads = _problem(np.float64, seed, steps=12)
    ours, _, _ = _run_ours(name, kw, init, grads)
    assert _worst(ours, _run_torch(name, kw, init, grads)) < TOL_TRAJ


def test_zero_grad_and_grads_untouched_by_step():
    p = Parameter(np.ones((2, 2)))
    p.grad[...] = 3.0
    opt = optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step()
    np.testing.assert_array_equal(p.grad, np.full((2, 2), 3.0))
    opt.zero_grad()
    np.testing.assert_array_equal(p.grad, np.zeros((2, 2)))


# -- state dict -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", OPTIMIZERS)
def test_state_dict_round_trip_through_npz_resumes_exactly(name, kw):
    init, grads = _problem(np.float64, seed=3)
    full, _, _ = _run_ours(name, kw, init, grads)
    _, opt, params = _run_ours(name, kw, init, grads[:10])
    sd = opt.state_dict()
    for k, v in sd.items():
        assert isinstance(v, np.ndarray), k
    assert sd["step"].shape == () and int(sd["step"]) == 10 and sd["lr"].shape == ()
    buf = io.BytesIO()
    np.savez(buf, **sd)
    buf.seek(0)
    loaded = dict(np.load(buf, allow_pickle=False))
    # a fresh optimizer on copies of the weights, resumed from the file
    params2 = [Parameter(p.data.copy()) for p in params]
    opt2 = getattr(optim, name)(params2, **{**kw, "lr": 0.123})  # lr comes back from the file
    opt2.load_state_dict(loaded)
    assert opt2.lr == opt.lr and opt2.step_count == 10
    rest, _, _ = _run_ours(name, kw, init, grads[10:], opt=opt2, params=params2)
    assert _worst(rest, full[10:]) == 0.0


def test_state_dict_names():
    ps = [Parameter(np.zeros(3)), Parameter(np.zeros((2, 2)))]
    sgd = optim.SGD(ps, lr=0.1, momentum=0.9)
    assert set(sgd.state_dict()) == {"step", "lr", "momentum", "dampening", "weight_decay", "nesterov"}
    sgd.step()
    sd = sgd.state_dict()
    assert "state.0.momentum_buffer" in sd and sd["state.1.momentum_buffer"].shape == (2, 2)
    adam = optim.Adam(ps, amsgrad=True)
    adam.step()
    assert {"state.1.exp_avg", "state.1.exp_avg_sq", "state.1.max_exp_avg_sq"} <= set(adam.state_dict())
    assert adam.state_dict()["betas"].shape == (2,)
    # plain SGD keeps no buffers
    plain = optim.SGD(ps, lr=0.1)
    plain.step()
    assert not [k for k in plain.state_dict() if k.startswith("state.")]


def test_load_state_dict_errors():
    ps = [Parameter(np.zeros(3)), Parameter(np.zeros((2, 2)))]
    adam = optim.Adam(ps)
    adam.step()
    sd = adam.state_dict()
    with pytest.raises(ValueError, match="missing 'momentum'"):
        optim.SGD(ps, lr=0.1).load_state_dict(sd)
    with pytest.raises(ValueError, match="missing 'state.1.exp_avg_sq'"):
        optim.Adam(ps).load_state_dict({k: v for k, v in sd.items() if k != "state.1.exp_avg_sq"})
    with pytest.raises(ValueError, match="unexpected entry 'extra'"):
        optim.Adam(ps).load_state_dict({**sd, "extra": np.zeros(1)})
    with pytest.raises(ValueError, match=r"state.1.exp_avg.*\(2, 3\).*parameter 1.*\(2, 2\)"):
        optim.Adam(ps).load_state_dict({**sd, "state.1.exp_avg": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="unexpected entry 'state.2.exp_avg'"):
        optim.Adam(ps[:2]).load_state_dict({**sd, "state.2.exp_avg": np.zeros(3)})
    with pytest.raises(ValueError, match="learning rate"):
        optim.Adam(ps).load_state_dict({**sd, "lr": np.array(-1.0)})
    with pytest.raises(ValueError, match="scalar"):
        optim.Adam(ps).load_state_dict({**sd, "lr": np.ones(2)})
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(ps).load_state_dict({**sd, "betas": np.array(0.9)})
    with pytest.raises(TypeError, match="mapping"):
        optim.Adam(ps).load_state_dict([1, 2])
    # nothing changed by a failed load
    fresh = optim.Adam(ps, lr=0.5)
    with pytest.raises(ValueError):
        fresh.load_state_dict({**sd, "state.1.exp_avg": np.zeros((2, 3))})
    assert fresh.lr == 0.5 and fresh.step_count == 0 and fresh.state == [{}, {}]


# -- bad construction -----------------------------------------------------------------------------------

def test_constructor_errors():
    p = [Parameter(np.zeros(2))]
    with pytest.raises(ValueError, match="^optimizer got an empty parameter list$"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="^optimizer got an empty parameter list$"):
        optim.Adam(iter([]))
    with pytest.raises(TypeError, match="model.parameters()"):
        optim.SGD(ReLU(), lr=0.1)
    with pytest.raises(TypeError, match="parameter 0 is a ndarray"):
        optim.SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="list"):
        optim.SGD(p[0], lr=0.1)
    with pytest.raises(TypeError, match="iterable"):
        optim.SGD(3, lr=0.1)
    for bad in [dict(lr=-0.1), dict(lr=0.1, momentum=-0.5), dict(lr=0.1, weight_decay=-1),
                dict(lr=0.1, nesterov=True), dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
                dict(lr=float("nan")), dict(lr=float("inf"))]:
        with pytest.raises(ValueError):
            optim.SGD(p, **bad)
    with pytest.raises(TypeError, match="real number"):
        optim.SGD(p, lr="0.1")
    for cls in (optim.Adam, optim.AdamW):
        for bad in [dict(lr=-1e-3), dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)), dict(eps=-1e-8),
                    dict(weight_decay=-0.1)]:
            with pytest.raises(ValueError):
                cls(p, **bad)
        with pytest.raises(TypeError, match="betas"):
            cls(p, betas=0.9)
    with pytest.raises(ValueError, match="learning rate lr -0.1"):
        optim.Adam(p, lr=-0.1)


# -- learning-rate schedules ---------------------------------------------------------------------------

SCHEDULES = [
    ("StepLR", {"step_size": 3}),
    ("StepLR", {"step_size": 7, "gamma": 0.5}),
    ("CosineAnnealingLR", {"T_max": 30}),
    ("CosineAnnealingLR", {"T_max": 8, "eta_min": 1e-3}),   # runs past T_max: periodic
    ("PolynomialLR", {"total_iters": 30}),
    ("PolynomialLR", {"total_iters": 12, "power": 2.0}),
    ("PolynomialLR", {"total_iters": 25, "power": 0.5}),
]


def _torch_lrs(name, kw, lr, steps):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = getattr(torch.optim.lr_scheduler, name)(opt, **kw)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == lrs[-1]
    return lrs


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_schedule_matches_torch(name, kw):
    opt = optim.SGD([Parameter(np.zeros(1))], lr=0.1, momentum=0.9)
    sched = getattr(optim, name)(opt, **kw)
    lrs = [sched.get_last_lr()[0]]
    for _ in range(30):
        opt.step()
        sched.step()
        assert opt.lr == sched.get_last_lr()[0]
        lrs.append(opt.lr)
    ref = _torch_lrs(name, kw, 0.1, 30)
    assert rel_err(lrs, ref) < 1e-12, (lrs, ref)


@pytest.mark.parametrize("name,kw", SCHEDULES)
def test_schedule_state_dict_round_trip(name, kw):
    opt = optim.Adam([Parameter(np.zeros(1))], lr=0.1)
    sched = getattr(optim, name)(opt, **kw)
    for _ in range(5):
        sched.step()
    sd = sched.state_dict()
    assert all(isinstance(v, np.ndarray) and v.shape == () for v in sd.values())
    assert int(sd["last_epoch"]) == 5
    # the trainer stores it in JSON metadata: plain numbers must load too
    as_json = json.loads(json.dumps({k: v.item() for k, v in sd.items()}))
    opt2 = optim.Adam([Parameter(np.zeros(1))], lr=0.1)
    other = getattr(optim, name)(opt2, **kw)
    other.load_state_dict(as_json)
    assert other.get_last_lr() == sched.get_last_lr()
    for _ in range(5):
        sched.step()
        other.step()
        assert other.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="missing 'last_epoch'"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "last_epoch"})
    with pytest.raises(ValueError, match="unexpected entry 'foo'"):
        other.load_state_dict({**sd, "foo": 1})


def test_schedule_errors():
    opt = optim.SGD([Parameter(np.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="step_size"):
        optim.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="T_max"):
        optim.CosineAnnealingLR(opt, T_max=-3)
    with pytest.raises(ValueError, match="total_iters"):
        optim.PolynomialLR(opt, total_iters=2.5)
    with pytest.raises(TypeError, match="optimizer"):
        optim.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), step_size=2)


# -- gradient clipping ---------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf"), 2])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, TOL32)])
def test_clip_grad_norm_matches_torch(norm_type, max_norm, dtype, tol):
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    ps = [Parameter(np.zeros(s, dtype=dtype)) for s in SHAPES]
    for p, g in zip(ps, grads):
        p.grad[...] = g
    ts = [torch.zeros(s, dtype=torch.float64 if dtype == np.float64 else torch.float32, requires_grad=True)
          for s in SHAPES]
    for tp, g in zip(ts, grads):
        tp.grad = torch.from_numpy(g.copy())
    total = optim.clip_grad_norm_(ps, max_norm, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(ts, max_norm, norm_type)
    assert isinstance(total, float)
    assert rel_err(total, float(ref)) < tol
    for p, tp in zip(ps, ts):
        assert p.grad.dtype == dtype
        assert rel_err(p.grad, tp.grad.numpy()) < tol


def test_clip_grad_norm_edge_cases():
    p = Parameter(np.zeros(3))
    p.grad[...] = [3.0, 4.0, 0.0]
    assert optim.clip_grad_norm_(p, 1.0) == 5.0               # a single Parameter
    np.testing.assert_allclose(np.linalg.norm(p.grad), 1.0, rtol=1e-6)
    assert optim.clip_grad_norm_([], 1.0) == 0.0
    p.grad[...] = [np.nan, 1.0, 0.0]
    with pytest.raises(RuntimeError, match="non"):
        optim.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="norm_type"):
        optim.clip_grad_norm_([p], 1.0, norm_type=0)
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm_([p], -1.0)
    with pytest.raises(TypeError, match="Parameter"):
        optim.clip_grad_norm_([np.zeros(2)], 1.0)

"""How unet_np.optim chooses between a backend's fused updates and its own array code.

The fused kernels themselves are checked against the array code in tests/backends (test_cupy.py: the
CUDA C of optim.cu, on a GPU and in the CPU emulation; numba_cuda_check.py: kernels/cuda_optim.py under
Numba's CUDA simulator). Here a stand-in backend records what the optimizers pass to its fused updates.
"""
import numpy as np
import pytest

from unet_np import backends, optim
from unet_np.backends import Backend
from unet_np.nn import Conv2d, Parameter


class Recording(Backend):
    """A NumPy backend whose fused updates record their arguments (and change nothing)."""

    def __init__(self):
        super().__init__("recording", np, {})
        self.calls = []

    def sgd_step(self, p, grad, buf, lr, **kw):
        self.calls.append(("sgd", p, grad, buf, lr, kw))

    def adam_step(self, p, grad, m, v, step, lr, **kw):
        self.calls.append(("adam", p, grad, m, v, step, lr, kw))


def _params(backend, shapes=((2, 3), (4,))):
    rng = np.random.default_rng(0)
    ps = [Parameter(rng.standard_normal(s)) for s in shapes]
    for p in ps:
        p.backend = backend
        p.grad[...] = rng.standard_normal(p.shape)
    return ps


def test_module_parameters_carry_their_backend():
    layer = Conv2d(2, 3, 3, dtype=np.float64)
    assert layer.weight.backend is backends.get("numpy") and layer.bias.backend is backends.get("numpy")
    assert Parameter(np.zeros(3)).backend is None
    rec = Recording()
    layer.to(rec)
    assert layer.weight.backend is rec and layer.bias.backend is rec


def test_numpy_parameters_take_the_array_code():
    """The numpy backend has no fused updates: a numpy module's step equals a bare Parameter's."""
    layer = Conv2d(2, 3, 3, dtype=np.float64)
    bare = [Parameter(p.data.copy()) for p in layer.parameters()]
    for a, b in zip(layer.parameters(), bare):
        a.grad[...] = b.grad[...] = np.random.default_rng(1).standard_normal(a.shape)
    for cls, hp in ((optim.SGD, dict(lr=0.1, momentum=0.9)), (optim.AdamW, dict(lr=0.01))):
        o1, o2 = cls(layer.parameters(), **hp), cls(bare, **hp)
        for _ in range(2):
            o1.step()
            o2.step()
        for a, b in zip(layer.parameters(), bare):
            np.testing.assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_passes_its_state_and_the_first_step(momentum):
    rec = Recording()
    ps = _params(rec)
    opt = optim.SGD(ps, lr=0.05, momentum=momentum, dampening=0.25 if momentum else 0.0,
                    weight_decay=0.01, nesterov=False)
    for step in range(1, 4):
        rec.calls.clear()
        opt.step()
        assert len(rec.calls) == len(ps)                   # one fused call per parameter
        for i, (kind, p, grad, buf, lr, kw) in enumerate(rec.calls):
            assert kind == "sgd" and p is ps[i].data and grad is ps[i].grad and lr == 0.05
            assert kw == dict(momentum=momentum, dampening=0.25 if momentum else 0.0, weight_decay=0.01,
                              nesterov=False, first=bool(momentum) and step == 1)
            if momentum:
                assert buf is opt.state[i]["momentum_buffer"]
                assert buf.shape == p.shape and buf.dtype == p.dtype and buf.flags.c_contiguous
            else:
                assert buf is None and opt.state[i] == {}
    buffers = {f"state.{i}.momentum_buffer" for i in range(len(ps))} if momentum else set()
    assert {k for k in opt.state_dict() if k.startswith("state.")} == buffers


@pytest.mark.parametrize("cls,amsgrad", [(optim.Adam, False), (optim.Adam, True), (optim.AdamW, True)])
def test_adam_passes_its_state_and_the_step_number(cls, amsgrad):
    rec = Recording()
    ps = _params(rec)
    opt = cls(ps, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad)
    for step in range(1, 4):
        rec.calls.clear()
        opt.step()
        assert len(rec.calls) == len(ps)
        for i, (kind, p, grad, m, v, t, lr, kw) in enumerate(rec.calls):
            state = opt.state[i]
            assert kind == "adam" and p is ps[i].data and grad is ps[i].grad and t == step and lr == 0.01
            assert m is state["exp_avg"] and v is state["exp_avg_sq"]
            assert kw["vmax"] is (state["max_exp_avg_sq"] if amsgrad else None)
            assert kw == dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, decoupled=cls is optim.AdamW,
                              vmax=kw["vmax"])


def test_non_contiguous_parameters_take_the_array_code():
    rec = Recording()
    p = Parameter(np.arange(12.0).reshape(3, 4).T)           # a transposed view: not C-contiguous
    p.backend = rec
    p.grad = np.ones((4, 3))
    before = p.data.copy()
    optim.SGD([p], lr=0.5).step()
    assert rec.calls == []
    np.testing.assert_array_equal(p.data, before - 0.5)

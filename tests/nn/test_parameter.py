"""Parameter's gradient bookkeeping: zero_grad is deferred (PyTorch's set_to_none), add_grad hands the
backward's array over after a zero_grad, and adds into .grad otherwise."""
import numpy as np

from unet_np.nn import Conv2d, Parameter
from unet_np.optim import SGD


def test_zero_grad_then_read_gives_zeros_in_the_same_array():
    p = Parameter(np.ones((2, 3)))
    p.grad += 5.0
    arr = p.grad
    p.zero_grad()
    assert p.grad is arr and not p.grad.any()


def test_add_grad_after_zero_grad_takes_the_array_over_then_accumulates():
    p = Parameter(np.ones((2, 3)))
    p.grad += 7.0                                   # stale values that must not leak through
    p.zero_grad()
    g1 = np.full((2, 3), 2.0)
    p.add_grad(g1)
    assert p.grad is g1                             # no fill, no copy
    p.add_grad(np.full((2, 3), 3.0))
    np.testing.assert_array_equal(p.grad, np.full((2, 3), 5.0))
    np.testing.assert_array_equal(g1, np.full((2, 3), 5.0))   # g1 was handed over: it IS .grad


def test_add_grad_copies_when_the_array_cannot_be_taken():
    p = Parameter(np.zeros((3, 2)))
    arr = p.grad
    p.zero_grad()
    g = np.arange(6.0).reshape(2, 3).T              # not C-contiguous
    p.add_grad(g)
    assert p.grad is arr
    np.testing.assert_array_equal(p.grad, g)
    p.zero_grad()
    p.add_grad(np.ones((3, 2), dtype=np.float32))   # another dtype: copied (and cast) into .grad
    assert p.grad is arr and p.grad.dtype == np.float64 and (p.grad == 1).all()


def test_keep_grad_array_always_writes_into_the_same_array():
    p = Parameter(np.zeros(4))
    p.keep_grad_array = True
    view = p.grad
    p.zero_grad()
    p.add_grad(np.full(4, 2.0))
    assert p.grad is view and (view == 2).all()


def test_training_steps_match_eager_zeroing():
    """Three SGD steps with the deferred zero_grad give exactly the weights of eager zeroing."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6))
    runs = []
    for eager in (False, True):
        layer = Conv2d(3, 4, 3, padding=1)
        layer.weight.data = np.linspace(-1, 1, layer.weight.data.size).reshape(layer.weight.data.shape)
        layer.bias.data = np.linspace(-0.5, 0.5, 4)
        opt = SGD(layer.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            opt.zero_grad()
            if eager:
                for p in layer.parameters():
                    p.grad[...] = 0.0
            y = layer.forward(x)
            layer.backward(np.cos(y + step))
            opt.step()
        runs.append([p.data.copy() for p in layer.parameters()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_two_backwards_without_zero_grad_accumulate():
    rng = np.random.default_rng(1)
    layer = Conv2d(2, 3, 3, padding=1)
    x = rng.standard_normal((1, 2, 5, 5))
    layer.zero_grad()
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    once = layer.weight.grad.copy()
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    np.testing.assert_allclose(layer.weight.grad, 2 * once, rtol=1e-12)

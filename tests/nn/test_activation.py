import numpy as np
import pytest
import torch

from unet_np import gradcheck
from unet_np.nn import ReLU, Sigmoid
from tests.helpers import TOL32, TOL64, n, rel_err, t


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL64), (np.float32, TOL32)])
@pytest.mark.parametrize("ours,theirs", [(ReLU, torch.relu), (Sigmoid, torch.sigmoid)])
def test_matches_torch(ours, theirs, dtype, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 4)).astype(dtype)
    x[0, 0, 0, :2] = 0.0  # ReLU's kink: both take the derivative at 0 as 0
    dy = rng.standard_normal(x.shape).astype(dtype)
    layer = ours(dtype=dtype)
    y = layer(x)
    xt = t(x, requires_grad=True)
    yt = theirs(xt)
    yt.backward(t(dy))
    assert y.dtype == dtype
    assert rel_err(y, n(yt)) < tol
    assert rel_err(layer.backward(dy), n(xt.grad)) < tol


def test_sigmoid_is_stable_for_huge_logits():
    y = Sigmoid(dtype=np.float64)(np.array([[[[-1e4, 1e4, 0.0]]]]))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y.ravel(), [0.0, 1.0, 0.5])


@pytest.mark.parametrize("layer", [ReLU, Sigmoid])
def test_gradcheck(layer):
    x = np.random.default_rng(1).standard_normal((1, 2, 3, 3)) + 0.05  # away from ReLU's kink
    err = gradcheck(layer(dtype=np.float64), x)
    assert err["input"] < 1e-7, err


@pytest.mark.parametrize("bad,exc,words", [
    ([[1.0]], TypeError, "list"), (None, TypeError, "NoneType"),
    (np.ones((1, 1, 2, 2), dtype=np.int64), TypeError, "integer"),
    (np.ones((1, 1, 2, 2), dtype=bool), TypeError, "bool"),
    (np.ones((1, 1, 2, 2), dtype=np.complex128), TypeError, "complex"),
])
def test_bad_input(bad, exc, words):
    with pytest.raises(exc, match=words):
        ReLU()(bad)
    with pytest.raises(exc, match="ReLU"):
        ReLU()(bad)


def test_backward_without_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="without a forward"):
        ReLU().backward(np.ones((1, 1, 1, 1)))


# LeakyReLU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in ("numpy", "numba") if b in __import__("unet_np").backends.available()])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("slope", [0.01, 0.1, 0.0, 1.5])
def test_leaky_relu_matches_torch(slope, dtype, tol, backend):
    from unet_np.nn import LeakyReLU
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    x[0, 0, 0, :2] = 0                                  # x = 0 takes the slope, as PyTorch
    g = rng.standard_normal(x.shape).astype(dtype)
    m = LeakyReLU(slope, backend=backend)
    y, dx = m.forward(x), None
    dx = m.backward(g)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.leaky_relu(tx, slope)
    ty.backward(torch.from_numpy(g))
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.max(np.abs(y - ty.detach().numpy())) <= tol * np.max(np.abs(ty.detach().numpy()))
    assert np.max(np.abs(dx - tx.grad.numpy())) <= tol * np.max(np.abs(tx.grad.numpy()))


def test_leaky_relu_rejects_a_non_number_slope():
    from unet_np.nn import LeakyReLU
    with pytest.raises(TypeError, match="negative_slope"):
        LeakyReLU("0.1")

"""Dropout, Dropout2d, Dropout3d: seeded masks, PyTorch's scaling, off in eval, exact backward."""
import numpy as np
import pytest

from unet_np import backends
from unet_np.nn import Dropout, Dropout2d, Dropout3d

BACKENDS = [b for b in ("numpy", "numba") if b in backends.available()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,shape,mask_shape", [(Dropout, (2, 3, 4, 5), (2, 3, 4, 5)),
                                                  (Dropout2d, (2, 3, 4, 5), (2, 3, 1, 1)),
                                                  (Dropout3d, (2, 3, 2, 4, 5), (2, 3, 1, 1, 1))])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)], ids=["float64", "float32"])
def test_dropout_matches_torch_with_the_same_mask(cls, shape, mask_shape, dtype, tol, backend):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    m = cls(0.4, seed=3, backend=backend)
    y = m.forward(x)
    dx = m.backward(g)
    mask = backends.to_numpy(m.last_mask)
    assert mask.shape == mask_shape
    keep = mask != 0
    assert np.allclose(mask[keep], 1 / 0.6) and keep.any() and not keep.all()
    # PyTorch's dropout is y = x * keep / (1 - p) with its own generator: give it ours
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = tx * torch.from_numpy(keep.astype(dtype)) / (1 - 0.4)
    ty.backward(torch.from_numpy(g))
    assert y.dtype == dtype and dx.dtype == dtype
    assert np.max(np.abs(backends.to_numpy(y) - ty.detach().numpy())) <= tol * np.abs(x).max() * 2
    assert np.max(np.abs(backends.to_numpy(dx) - tx.grad.numpy())) <= tol * np.abs(g).max() * 2


def test_same_seed_same_masks_and_a_generator_is_used_as_given():
    x = np.ones((2, 4, 6, 6))
    a, b = Dropout(0.5, seed=7), Dropout(0.5, seed=7)
    assert np.array_equal(a(x), b(x)) and np.array_equal(a(x), b(x))
    assert not np.array_equal(a(x), Dropout(0.5, seed=8)(x))
    gen = np.random.default_rng(1)
    c = Dropout2d(0.5, seed=gen)
    assert c.generator is gen
    y = c(x)
    per_map = y.reshape(8, -1)
    assert all(len(set(row)) == 1 for row in per_map)           # whole maps kept or dropped


def test_eval_mode_and_p0_are_the_identity():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    m = Dropout3d(0.9, seed=0).eval()
    x5 = x.reshape(2, 3, 1, 4, 4)
    assert np.array_equal(m(x5), x5) and np.array_equal(m.backward(x5), x5)
    m = Dropout(0.0, seed=0)
    assert np.array_equal(m(x), x) and np.array_equal(m.backward(2 * x), 2 * x)
    m = Dropout(1.0, seed=0)                                    # p = 1 drops everything (no NaN)
    assert np.array_equal(m(x), np.zeros_like(x))


def test_the_kept_fraction_is_one_minus_p():
    m = Dropout(0.3, seed=0)
    y = m(np.ones((1, 1, 300, 300)))
    assert abs((y != 0).mean() - 0.7) < 0.01
    assert abs(y.mean() - 1.0) < 0.02                          # the expectation is kept


def test_errors():
    with pytest.raises(ValueError, match="Dropout: p must be a probability"):
        Dropout(1.5)
    with pytest.raises(ValueError, match="Dropout2d: expected a 4-D array"):
        Dropout2d(0.5)(np.ones((1, 2, 3, 3, 3)))
    m = Dropout(0.5, seed=0)
    m(np.ones((1, 2, 3, 3)))
    with pytest.raises(ValueError, match="Dropout: backward expected dy of shape"):
        m.backward(np.ones((1, 2, 3, 4)))

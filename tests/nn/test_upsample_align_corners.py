"""Upsample(mode='bilinear', align_corners=True) (milesial's bilinear U-Net) against PyTorch."""
import numpy as np
import pytest

from unet_np import backends
from unet_np.gradcheck import gradcheck
from unet_np.nn import Upsample

torch = pytest.importorskip("torch")
BACKENDS = [b for b in ("numpy", "numba") if b in backends.available()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,scale", [((2, 3, 4, 5), 2), ((1, 2, 1, 3), 2), ((1, 1, 3, 2), (3, 2))])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-5)], ids=["float64", "float32"])
def test_align_corners_matches_torch(shape, scale, dtype, tol, backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)
    m = Upsample(scale, mode="bilinear", align_corners=True, backend=backend)
    y = m.forward(x)
    g = rng.standard_normal(y.shape).astype(dtype)
    dx = m.backward(g)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = torch.nn.functional.interpolate(tx, scale_factor=scale, mode="bilinear", align_corners=True)
    ty.backward(torch.from_numpy(g))
    assert y.dtype == dtype and dx.dtype == dtype
    ref_y, ref_dx = ty.detach().numpy(), tx.grad.numpy()
    assert np.max(np.abs(y - ref_y)) <= tol * np.max(np.abs(ref_y))
    assert np.max(np.abs(dx - ref_dx)) <= tol * np.max(np.abs(ref_dx))


def test_align_corners_finite_differences():
    m = Upsample(2, align_corners=True, dtype=np.float64)
    err = gradcheck(m, np.random.default_rng(1).standard_normal((1, 2, 3, 4)))
    assert err["input"] < 1e-7


def test_align_corners_keeps_the_corners_and_refuses_nearest():
    x = np.random.default_rng(2).standard_normal((1, 1, 3, 4))
    y = Upsample(2, align_corners=True)(x)
    assert np.allclose(y[..., [0, -1], :][..., [0, -1]], x[..., [0, -1], :][..., [0, -1]])
    assert "align_corners=True" in repr(Upsample(2, align_corners=True))
    with pytest.raises(ValueError, match="align_corners=True needs mode='bilinear'"):
        Upsample(2, mode="nearest", align_corners=True)

"""nnU-Net's sliding-window inference: the published constants (Gaussian, steps) on small cases, and
the whole loop against a PyTorch re-statement of nnU-Net v2's algorithm on an nnU-Net network (nnunetv2
itself is not installed: it is not cheap to)."""
import itertools

import numpy as np
import pytest

from unet_np import interop
from unet_np.sliding_window import gaussian_importance_map, predict_sliding_window, sliding_window_steps


def test_steps_are_nnunets():
    assert sliding_window_steps((10,), (4,)) == [[0, 2, 4, 6]]
    assert sliding_window_steps((9,), (4,)) == [[0, 2, 3, 5]]        # round(5/3 k)
    assert sliding_window_steps((4, 7), (4, 4)) == [[0], [0, 2, 3]]
    assert sliding_window_steps((20,), (8,), 1.0) == [[0, 6, 12]]
    with pytest.raises(ValueError, match="smaller than the patch"):
        sliding_window_steps((3,), (4,))


def test_gaussian_constants():
    g = gaussian_importance_map((16, 24))
    assert g.shape == (16, 24) and g.max() == pytest.approx(10.0, abs=1e-12)
    assert np.unravel_index(np.argmax(g), g.shape) == (8, 12)         # centre s // 2
    assert g.min() > 0
    # separable, sigma = s / 8: along an axis through the centre, exp(-x^2 / (2 sigma^2)) relative
    row = g[8] / g[8, 12]
    x = np.arange(24) - 12
    np.testing.assert_allclose(row, np.exp(-x ** 2 / (2 * 3.0 ** 2)), rtol=1e-12)


def test_gaussian_equals_scipys_blur_of_a_delta():
    ndimage = pytest.importorskip("scipy.ndimage")
    for size in [(16, 24), (40, 8), (8, 12, 10)]:
        delta = np.zeros(size)
        delta[tuple(s // 2 for s in size)] = 1
        ref = ndimage.gaussian_filter(delta, [s / 8 for s in size], 0, mode="constant", cval=0)
        ref = ref / (ref.max() / 10)
        ref[ref == 0] = ref[ref != 0].min()
        np.testing.assert_allclose(gaussian_importance_map(size), ref, rtol=1e-10)


def nnunet_reference(torch, net, image, patch, step, mirror_axes):
    """nnU-Net v2's predict_sliding_window_return_logits, restated in PyTorch (float64, no padding
    needed in these cases): Gaussian-weighted sum of (mirrored) tile logits over the summed weights."""
    g = torch.from_numpy(gaussian_importance_map(patch))
    data = torch.from_numpy(image)
    logits, counts = None, torch.zeros(data.shape[1:], dtype=torch.float64)
    for start in itertools.product(*sliding_window_steps(data.shape[1:], patch, step)):
        sl = tuple(slice(s, s + p) for s, p in zip(start, patch))
        x = data[(slice(None),) + sl][None]
        pred = net(x)
        if mirror_axes:
            axes = [m + 2 for m in mirror_axes]
            combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
            for c in combos:
                pred = pred + torch.flip(net(torch.flip(x, c)), c)
            pred = pred / (len(combos) + 1)
        pred = pred[0] * g
        if logits is None:
            logits = torch.zeros((pred.shape[0],) + tuple(data.shape[1:]), dtype=torch.float64)
        logits[(slice(None),) + sl] += pred
        counts[sl] += g
    return (logits / counts).numpy()


@pytest.mark.parametrize("dims,mirror", [(2, None), (2, (0, 1)), (3, (0, 2))])
def test_matches_nnunets_algorithm_on_an_nnunet_network(dims, mirror):
    torch = pytest.importorskip("torch")
    from tests.test_interop import _perturb, nnunet_architecture, nnunet_peer
    if dims == 3:
        from unet_np import nn
        if not hasattr(nn, "Conv3d"):
            pytest.skip("unet_np.nn has no Conv3d yet")
    arch = nnunet_architecture(dims)
    peer = _perturb(nnunet_peer(arch, 1, 2, False).double()).eval()
    patch = (8, 8) if dims == 2 else (4, 8, 8)
    image = np.random.default_rng(0).standard_normal((1,) + ((13, 19) if dims == 2 else (6, 11, 9)))
    with torch.no_grad():
        ref = nnunet_reference(torch, peer, image, patch, 0.5, mirror)
    for dtype, tol in ((np.float64, 1e-9), (np.float32, 1e-4)):
        ours = interop.from_nnunet(peer.state_dict(), arch, 1, 2, dtype=dtype).eval()
        got = predict_sliding_window(ours, image, patch, 0.5, mirror_axes=mirror)
        assert got.shape == ref.shape and got.dtype == dtype
        assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < tol


class Constant:
    """A stand-in model whose logits are 1 for class 0 and the input for class 1."""
    dtype = np.float64

    def predict(self, x):
        return np.concatenate([np.ones_like(x), x], axis=1)


def test_weights_normalise_and_small_images_are_padded():
    image = np.random.default_rng(1).standard_normal((1, 5, 13))
    out = predict_sliding_window(Constant(), image, (8, 8), mirror_axes=(0, 1))
    assert out.shape == (2, 5, 13)
    np.testing.assert_allclose(out[0], 1.0, rtol=1e-12)        # sum(w * 1) / sum(w)
    np.testing.assert_allclose(out[1], image[0], rtol=1e-12)   # flips undone, padding cropped off
    with pytest.raises(ValueError, match="image must be \\(C, \\*spatial\\)"):
        predict_sliding_window(Constant(), image[0], (8, 8))

"""Overlap-tile prediction (unet_np.infer): tiling must not change the answer.

With the default overlap (the receptive-field reach, receptive_margin) every kept pixel of a tile sees
exactly what it sees in one forward over the whole mirror-padded image, so tiled and whole-image
probabilities agree to float round-off (in practice bit for bit; the tolerance is 1e-12 in float64).
The whole-image reference is also computed by hand here: mirror-pad, one model.predict, crop.
"""
import numpy as np
import pytest

import unet_np
from unet_np import AttentionUNet, UNet, UNetPlusPlus
from unet_np.infer import predict_tiled, receptive_margin, softmax, tile_plan

TOL = 1e-12


def _model(cls=UNet, **kw):
    unet_np.seed(3)
    return cls(2, 3, base_channels=2, dtype=np.float64, **kw)


def _image(h=45, w=37, seed=0):
    return np.random.default_rng(seed).standard_normal((2, h, w))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_KWS = [dict(depth=1), dict(depth=2), dict(depth=2, upsample="bilinear"), dict(depth=2, batchnorm=True),
        dict(depth=3), dict(depth=2, padding="valid"), dict(depth=3, padding="valid")]
# every model with tiles of 12; the depth <= 2 ones also with tiles of 8 (a depth-3 window is
# large already, so one tile size is enough there)
_TILED = [(kw, tile) for kw in _KWS for tile in (8, 12) if not (kw["depth"] == 3 and tile == 8)]


@pytest.mark.parametrize("kw,tile", _TILED,
                         ids=["-".join(f"{k}={v}" for k, v in kw.items()) + f"-tile{tile}"
                              for kw, tile in _TILED])
def test_tiled_equals_whole_image_unet(kw, tile):
    model = _model(**kw)
    x = _image()
    whole = predict_tiled(model, x)               # one window over the whole image
    assert tile_plan(model, x.shape[1:])["tiles"] == (1, 1)
    plan = tile_plan(model, x.shape[1:], tile=tile)
    assert plan["tiles"][0] > 1 and plan["tiles"][1] > 1
    tiled = predict_tiled(model, x, tile=tile, batch_size=3)
    assert whole.shape == tiled.shape == (3, 45, 37)
    assert _rel(tiled, whole) < TOL
    np.testing.assert_allclose(whole.sum(axis=0), 1.0, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(UNetPlusPlus, dict(depth=2)), (AttentionUNet, dict(depth=2))],
                         ids=["unet++", "attention"])
def test_tiled_equals_whole_image_other_architectures(cls, kw):
    model = _model(cls, **kw)
    x = _image(30, 27, seed=1)
    assert _rel(predict_tiled(model, x, tile=12), predict_tiled(model, x)) < TOL


def test_whole_image_is_one_forward_on_the_mirror_padded_image():
    model = _model(depth=2)
    x = _image()
    plan = tile_plan(model, x.shape[1:])
    c = plan["margin"][0]
    assert c >= receptive_margin(model) and c % 2 == 0
    padded = np.pad(x, ((0, 0),) + plan["pad"], mode="reflect")
    model.eval()
    ref = softmax(model.predict(padded[None])[0][:, c:c + 45, c:c + 37], axis=0)
    assert _rel(predict_tiled(model, x), ref) < TOL


def test_valid_whole_image_is_one_forward_on_the_mirror_padded_image():
    model = _model(depth=2, padding="valid")
    x = _image(30, 30)
    plan = tile_plan(model, x.shape[1:])
    padded = np.pad(x, ((0, 0),) + plan["pad"], mode="reflect")
    ref = model.predict(padded[None])[0][:, :30, :30]
    assert _rel(predict_tiled(model, x, logits=True), ref) < TOL
    assert model.output_shape(padded.shape[1:])[0] >= 30


@pytest.mark.parametrize("depth", [3, 4])
def test_any_overlap_covering_the_reach_gives_the_same_result(depth):
    """The margin is rounded up to a multiple of 2**depth, so the image sits on the pooling grid of
    every window: overlaps reach .. reach + 2**depth all give the default's logits, tiled or not.
    (Rounded to 2**(depth-1), overlaps 52 and 56 of a depth-3 model differed by 7.3e-6.)"""
    model = _model(depth=depth)
    x = _image(45, 37)
    r = receptive_margin(model)
    ref = predict_tiled(model, x, logits=True)
    for ov in range(r, r + 2 ** depth + 1):
        assert tile_plan(model, x.shape[1:], overlap=ov)["margin"][0] % 2 ** depth == 0
        assert _rel(predict_tiled(model, x, overlap=ov, logits=True), ref) < TOL, ov
    assert _rel(predict_tiled(model, x, tile=16, overlap=r + 3, logits=True), ref) < TOL


def test_too_small_an_overlap_is_visible():
    # the check above is not vacuous: with little context the tile seams show
    unet_np.seed(3)
    model = UNet(2, 3, depth=2, base_channels=4, dtype=np.float64)
    x = _image(40, 40)
    whole = predict_tiled(model, x, overlap=4, logits=True)
    tiled = predict_tiled(model, x, tile=16, overlap=4, logits=True)
    assert _rel(tiled, whole) > 1e-9


def test_any_size_and_tiny_images():
    model = _model(depth=2)
    for h, w in ((1, 1), (5, 3), (17, 40), (9, 70)):
        p = predict_tiled(model, _image(h, w), tile=16)
        assert p.shape == (3, h, w) and np.all(np.isfinite(p))


def test_float32_model_and_mode_restored():
    unet_np.seed(0)
    model = UNet(1, 2, depth=2, base_channels=4)
    model.train()
    x = np.random.default_rng(0).random((1, 21, 30)).astype(np.float32)
    a = predict_tiled(model, x)
    b = predict_tiled(model, x, tile=8)
    assert a.dtype == np.float32 and np.max(np.abs(a - b)) < 1e-5
    assert model.training


def test_bad_input():
    model = _model(depth=1)
    with pytest.raises(ValueError, match="channels"):
        predict_tiled(model, np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        predict_tiled(model, np.zeros((1, 2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        predict_tiled(model, np.full((2, 8, 8), np.nan))

"""Overlap-tile prediction of volumes (unet_np.infer with a spatial_dims=3 model).

Everything in infer.py is done per axis, so a volume (C, D, H, W) is tiled in D, H and W as an image
is in H and W: the same promise holds. With an overlap of at least the receptive-field reach, and
the margin rounded up to a multiple of 2**depth, each kept voxel sees exactly what it sees in one
forward over the whole mirror-padded volume: tiled and whole agree to float64 round-off (measured:
bit for bit, or 1.5e-16 relative for 'valid' models). The models are tiny (base 2 channels) and the
volumes small and anisotropic (no two axes alike), so that a mix-up of axes would show.
"""
import numpy as np
import pytest

import unet_np
from unet_np import AttentionUNet, UNet, UNetPlusPlus
from unet_np.infer import predict_tiled, receptive_margin, softmax, tile_plan

TOL = 1e-12


def _model(cls=UNet, **kw):
    unet_np.seed(3)
    return cls(2, 3, base_channels=2, dtype=np.float64, spatial_dims=3, **kw)


def _volume(d=5, h=11, w=7, seed=0):
    return np.random.default_rng(seed).standard_normal((2, d, h, w))


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# (model, tile) pairs: one number for every axis, or one per axis; each cuts the volume into
# several tiles along at least two axes
_CASES = [
    (dict(depth=1), 4),
    (dict(depth=1), (2, 4, 6)),
    (dict(depth=1, padding="valid"), 4),
    (dict(depth=1, padding="valid"), (2, 6, 4)),
    (dict(depth=1, pad_input=True), (4, 4, 2)),
    (dict(depth=1, batchnorm=True, upsample="bilinear"), 4),
    (dict(depth=2), (4, 8, 8)),
    (dict(depth=2, padding="valid"), (4, 8, 4)),
]


@pytest.mark.parametrize("kw,tile", _CASES, ids=["-".join(f"{k}={v}" for k, v in kw.items())
                                                  + f"-tile{tile}" for kw, tile in _CASES])
def test_tiled_volume_equals_whole_volume(kw, tile):
    model = _model(**kw)
    x = _volume()
    whole = predict_tiled(model, x, logits=True)            # one window over the whole volume
    assert tile_plan(model, x.shape[1:])["tiles"] == (1, 1, 1)
    plan = tile_plan(model, x.shape[1:], tile=tile)
    assert sum(k > 1 for k in plan["tiles"]) >= 2, plan
    tiled = predict_tiled(model, x, tile=tile, batch_size=3, logits=True)
    assert whole.shape == tiled.shape == (3, 5, 11, 7)
    assert _rel(tiled, whole) < TOL


def test_whole_volume_is_one_forward_on_the_mirror_padded_volume():
    model = _model(depth=1)
    x = _volume()
    plan = tile_plan(model, x.shape[1:])
    c = plan["margin"]
    assert all(m >= receptive_margin(model) and m % 2 == 0 for m in c)
    padded = np.pad(x, ((0, 0),) + plan["pad"], mode="reflect")
    model.eval()
    ref = model.predict(padded[None])[0][:, c[0]:c[0] + 5, c[1]:c[1] + 11, c[2]:c[2] + 7]
    probs = predict_tiled(model, x)
    assert _rel(probs, softmax(ref, axis=0)) < TOL
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-12)


def test_any_overlap_covering_the_reach_gives_the_same_result():
    """Overlaps reach .. reach + 2**depth, one for every axis or different per axis, tiled or not:
    all give the default's logits (the margin is rounded up onto the pooling grid)."""
    model = _model(depth=2)
    x = _volume(4, 9, 6, seed=1)
    r = receptive_margin(model)
    ref = predict_tiled(model, x, logits=True)
    for ov in ((r + 1, r + 2, r + 4),):
        assert all(c % 4 == 0 for c in tile_plan(model, x.shape[1:], overlap=ov)["margin"])
        assert _rel(predict_tiled(model, x, overlap=ov, logits=True), ref) < TOL, ov
    assert _rel(predict_tiled(model, x, tile=(4, 8, 8), overlap=r + 3, logits=True), ref) < TOL


def test_too_small_an_overlap_is_visible():
    # the checks above are not vacuous: with too little context the tile seams show in 3-D too
    model = _model(depth=1)
    x = _volume()
    whole = predict_tiled(model, x, overlap=2, logits=True)
    tiled = predict_tiled(model, x, tile=2, overlap=2, logits=True)
    assert _rel(tiled, whole) > 1e-9


@pytest.mark.parametrize("cls", [UNetPlusPlus, AttentionUNet], ids=["unet++", "attention"])
def test_other_architectures_in_3d(cls):
    model = _model(cls, depth=1)
    x = _volume(4, 7, 5, seed=2)
    assert _rel(predict_tiled(model, x, tile=(2, 4, 2), logits=True),
                predict_tiled(model, x, logits=True)) < TOL


def test_thin_and_tiny_volumes():
    model = _model(depth=1)
    for d, h, w in ((1, 1, 1), (1, 6, 5), (3, 1, 4)):
        p = predict_tiled(model, _volume(d, h, w), tile=4)
        assert p.shape == (3, d, h, w) and np.all(np.isfinite(p))


def test_the_memory_estimate_counts_depth():
    """tile=None: the whole volume if its window fits max_bytes, else the largest tile whose window
    does; the estimate is the model's activation_bytes over the whole window, D included."""
    model = _model(depth=1)
    size = (24, 24, 24)
    one = tile_plan(model, size)
    assert one["tiles"] == (1, 1, 1)
    whole = model.activation_bytes((1, 2) + one["window"])
    plan = tile_plan(model, size, max_bytes=whole - 1)
    assert plan["tiles"] != (1, 1, 1)
    assert model.activation_bytes((1, 2) + plan["window"]) <= whole - 1
    # one step larger would not fit
    bigger = tile_plan(model, size, tile=plan["keep"][0] + 2)
    assert model.activation_bytes((1, 2) + bigger["window"]) > whole - 1
    # a thin volume of the same voxel count as a cube needs another window: D is counted
    flat = tile_plan(model, (2, 24, 24 * 12), max_bytes=whole - 1)
    assert model.activation_bytes((1, 2) + flat["window"]) <= whole - 1


def test_float32_model_and_mode_restored():
    unet_np.seed(0)
    model = UNet(1, 2, depth=1, base_channels=2, spatial_dims=3)
    model.train()
    x = np.random.default_rng(0).random((1, 5, 9, 6)).astype(np.float32)
    a = predict_tiled(model, x)
    b = predict_tiled(model, x, tile=4)
    assert a.dtype == np.float32 and np.max(np.abs(a - b)) < 1e-5
    assert model.training


def test_bad_input():
    model = _model(depth=1)
    with pytest.raises(ValueError, match=r"takes one volume \(C, D, H, W\).*volume\[None\]"):
        predict_tiled(model, np.zeros((5, 8, 8)))            # a 3-D array to a 3-D model
    with pytest.raises(ValueError, match=r"one volume at a time"):
        predict_tiled(model, np.zeros((1, 2, 4, 8, 8)))
    with pytest.raises(ValueError, match="channels"):
        predict_tiled(model, np.zeros((3, 4, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        predict_tiled(model, np.full((2, 4, 8, 8), np.nan))
    with pytest.raises(ValueError, match="one per spatial axis"):
        predict_tiled(model, np.zeros((2, 4, 8, 8)), tile=(4, 4))
    with pytest.raises(ValueError, match=r"3 axes"):
        tile_plan(model, (8, 8))
    unet_np.seed(0)
    flat = UNet(2, 3, depth=1, base_channels=2, dtype=np.float64)
    with pytest.raises(ValueError, match=r"takes one image \(C, H, W\).*spatial_dims=3"):
        predict_tiled(flat, np.zeros((2, 4, 8, 8)))          # a volume to a 2-D model

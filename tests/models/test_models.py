"""Model-level behaviour: sizes, bad input, inference mode, checkpoints, resume, learning."""
import os

import numpy as np
import pytest

import unet_np
from unet_np import AttentionUNet, UNet, UNetPlusPlus, gradcheck
from unet_np.data import touching_cells
from unet_np.metrics import evaluate
from unet_np.nn import CrossEntropyLoss
from unet_np.optim import SGD, Adam
from unet_np.train import Trainer, TrainingError, predict_labels


def tiny(**kw):
    kw = dict(dict(depth=2, base_channels=2, dtype=np.float64), **kw)
    return UNet(1, 2, **kw)


# -- sizes ------------------------------------------------------------------------------------------
def test_size_not_divisible_names_nearest_sizes_and_pad_input():
    with pytest.raises(ValueError, match=r"100.*96 or 104.*pad_input=True"):
        UNet(1, 2, depth=3, base_channels=2).forward(np.zeros((1, 1, 100, 96), np.float32))


# Finite differences through a whole ReLU/max-pool network are themselves inexact, two ways: round-off
# in the summed loss grows as eps shrinks (with eps=1e-6 errors of 5e-6 were seen), and a larger eps
# crosses ReLU kinks or switches max-pool winners (eps=1e-4 gave 0.1 on some seeds). The exact check
# of every model's gradients is against PyTorch (test_against_torch.py, 1e-8); here 1e-4 is the stated
# tolerance of the eps=1e-6 estimate (seen: up to 7e-5).
FD_TOL = 1e-4


def test_pad_input_output_size_and_exact_gradient():
    unet_np.seed(0)
    model = tiny(pad_input=True)
    x = np.random.default_rng(0).standard_normal((1, 1, 6, 7))
    assert model.forward(x).shape == (1, 2, 6, 7)
    err = gradcheck(model, x)
    assert max(err.values()) < FD_TOL, err


def test_valid_padding_sizes_match_the_paper():
    model = UNet(1, 2, depth=4, base_channels=2, padding="valid")
    assert model.output_shape((572, 572)) == (388, 388)
    assert model.valid_input_shape((570, 570)) == (572, 572)
    with pytest.raises(ValueError, match="571.*valid"):
        model.check_size((571, 572))


@pytest.mark.parametrize("make", [lambda: tiny(), lambda: UNetPlusPlus(1, 2, depth=2, base_channels=2,
                                                                       dtype=np.float64),
                                  lambda: AttentionUNet(1, 2, depth=2, base_channels=2, dtype=np.float64)])
def test_gradcheck_whole_models(make):
    unet_np.seed(0)
    model = make()
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8))
    err = gradcheck(model, x)
    assert max(err.values()) < FD_TOL, err


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,exc,words", [
    (np.zeros((1, 3, 16, 16), np.float32), ValueError, "expected 1 input channels, got 3"),
    (np.zeros((1, 16, 16), np.float32), ValueError, "4-D"),
    ([[0.0]], TypeError, "list"),
    ("image.png", TypeError, "str"),
    (np.zeros((1, 1, 16, 16), np.uint8), TypeError, "integer"),
    (np.zeros((0, 1, 16, 16), np.float32), ValueError, "empty"),
])
@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus, AttentionUNet])
def test_bad_model_input(cls, bad, exc, words):
    with pytest.raises(exc, match=words):
        cls(1, 2, depth=2, base_channels=2).forward(bad)


@pytest.mark.parametrize("kw,words", [
    (dict(depth=0), "depth"), (dict(depth=6), "depth"), (dict(padding="full"), "padding"),
    (dict(upsample="pixelshuffle"), "upsample"), (dict(base_channels=0), "base_channels"),
    (dict(padding="valid", pad_input=True), "pad_input"),
])
def test_bad_constructor_arguments(kw, words):
    with pytest.raises(ValueError, match=words):
        UNet(1, 2, **kw)


@pytest.mark.parametrize("args,kw,words", [
    ((0, 2), {}, "in_channels must be an integer >= 1, got 0"),
    ((1, 2.0), {}, "num_classes must be an integer >= 1, got 2.0"),
    ((1, 2), dict(depth=True), "depth must be an integer 1..5, got True"),
    ((1, 2), dict(base_channels=-4), "base_channels"),
    ((1, 2), dict(upsample="nearest"), "upsample must be one of 'transpose', 'bilinear', got 'nearest'"),
    ((1, 2), dict(init="xavier"), "init must be one of 'torch', 'he'"),
])
@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus, AttentionUNet])
def test_shared_constructor_checks(cls, args, kw, words):
    with pytest.raises(ValueError, match=words):
        cls(*args, **kw)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        UNet(1, 2, depth=1, base_channels=2, backend="tpu")


def test_memory_estimate_refuses_an_impossible_forward():
    with pytest.raises(MemoryError, match="GiB"):
        UNet(1, 2, depth=1, base_channels=64).forward(np.lib.stride_tricks.as_strided(
            np.zeros(1, np.float32), shape=(64, 1, 16384, 16384), strides=(0, 0, 0, 0)))


# -- inference mode -----------------------------------------------------------------------------------
def test_predict_keeps_no_activations_and_matches_forward():
    model = tiny()
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8))
    y = model.forward(x)
    kept = [m for _, m in model.named_modules() if m.__dict__.get("_cache") is not None]
    assert kept
    model2 = tiny()
    model2.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(model2.predict(x), y)
    assert all(m.__dict__.get("_cache") is None for _, m in model2.named_modules())
    with pytest.raises(RuntimeError, match="without a forward"):
        model2.backward(np.ones_like(y))


# -- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: UNet(1, 3, depth=2, base_channels=2, batchnorm=True, upsample="bilinear"),
    lambda: UNetPlusPlus(1, 2, depth=2, base_channels=2, deep_supervision=True),
    lambda: AttentionUNet(2, 2, depth=2, base_channels=2, dtype=np.float64),
])
def test_save_load_round_trip(tmp_path, make):
    model = make()
    x = np.random.default_rng(3).standard_normal((1, model.in_channels, 8, 8)).astype(model.dtype)
    model.train().forward(x)  # moves batch-norm running statistics away from their start
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = unet_np.load_model(path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    model.eval(); loaded.eval()
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    with pytest.raises(ValueError, match="not a unet_np checkpoint"):
        UNetPlusPlus.load(path) if not isinstance(model, UNetPlusPlus) else UNet.load(path)


def test_load_state_dict_mismatch_is_named_and_changes_nothing():
    model = tiny()
    before = model.state_dict()
    sd = dict(before)
    sd["final.weight"] = np.zeros((3, 2, 1, 1))
    with pytest.raises(ValueError, match=r"final\.weight.*\(3, 2, 1, 1\)"):
        model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def _data(n=8, size=32, seed=0):
    images, masks, _ = touching_cells(n, size=size, seed=seed)
    return images, masks


def test_resume_continues_bit_for_bit(tmp_path):
    images, masks = _data(6, 16)

    def trainer():
        unet_np.seed(0)
        model = UNet(1, 2, depth=2, base_channels=4)
        return Trainer(model, Adam(model.parameters(), lr=1e-3))

    a = trainer()
    a.fit(images, masks, epochs=4, batch_size=2, seed=5)

    b = trainer()
    b.fit(images, masks, epochs=2, batch_size=2, seed=5)
    b.save(tmp_path / "half.npz")
    c = trainer()
    c.resume(tmp_path / "half.npz")
    c.fit(images, masks, epochs=4, batch_size=2, seed=5)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        np.testing.assert_array_equal(v, w, err_msg=k)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in c.history]


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    images, masks = _data(4, 16)
    unet_np.seed(0)
    model = UNet(1, 2, depth=1, base_channels=4)
    trainer = Trainer(model, SGD(model.parameters(), lr=0.01))
    trainer.fit(images, masks, epochs=1, batch_size=2, out_dir=tmp_path)
    good = (tmp_path / "last.npz").read_bytes()
    bad = images.copy()
    bad[1, 0, 3, 3] = np.nan
    with pytest.raises(TrainingError, match=r"step 3 .*learning rate"):
        trainer.fit(bad, masks, epochs=2, batch_size=4, out_dir=tmp_path)
    assert (tmp_path / "last.npz").read_bytes() == good


def test_a_small_unet_learns_touching_cells():
    """Learning for real: a small U-Net, a few seconds of Adam on synthetic cells, fixed seed.
    The foreground Dice it must reach on held-out images is stated here: 0.80."""
    images, masks = _data(24, 32, seed=1)
    unet_np.seed(0)
    model = UNet(1, 2, depth=2, base_channels=8)
    trainer = Trainer(model, Adam(model.parameters(), lr=1e-2))
    trainer.fit(images[:20], masks[:20], epochs=12, batch_size=4, seed=0)
    pred = predict_labels(model, images[20:])
    assert evaluate(pred, masks[20:], 2)["dice_foreground"] > 0.80


@pytest.mark.parametrize("arch", ["unet", "unet++", "attention"])
def test_backward_releases_activations(arch):
    """After a model's backward no layer holds activations (a step's memory falls through the
    backward, and nothing is kept between steps); a second backward then asks for a forward."""
    from unet_np.nn.loss import CrossEntropyLoss
    rng = np.random.default_rng(0)
    make = {"unet": lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, batchnorm=True),
            "unet++": lambda: unet_np.UNetPlusPlus(1, 2, depth=2, base_channels=4),
            "attention": lambda: unet_np.AttentionUNet(1, 2, depth=2, base_channels=4)}[arch]
    model = make()
    x = rng.standard_normal((2, 1, 16, 16))
    loss = CrossEntropyLoss()
    loss.forward(model.forward(x), rng.integers(0, 2, (2, 16, 16)))
    d = loss.backward()
    held = [n for n, m in model.named_modules() if m.__dict__.get("_cache") is not None]
    assert len(held) > 5
    model.backward(d)
    assert [n for n, m in model.named_modules() if m.__dict__.get("_cache") is not None] == []
    with pytest.raises(RuntimeError, match="backward uses them up: run forward again"):
        model.backward(d)


def test_failed_backward_keeps_activations():
    """A backward refused for a gradient of the wrong shape keeps the cache: the right one then works."""
    from unet_np.nn import Conv2d
    conv = Conv2d(2, 3, 3, padding=1)
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    y = conv(x)
    with pytest.raises(ValueError, match="expected a gradient of shape"):
        conv.backward(np.ones((1, 3, 4, 4), dtype=np.float32))
    assert conv.backward(np.ones_like(y)).shape == x.shape

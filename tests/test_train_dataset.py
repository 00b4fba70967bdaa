"""Trainer.fit(dataset, ...): images of mixed sizes, crops, validation, augmentation, weight maps,
run metadata in checkpoints, and bit-exact resume -- the training pipeline the command uses, through
the library's public API."""
import numpy as np
import pytest

import unet_np
from unet_np import optim
from unet_np.data import SegmentationDataset, load_folder, pipeline, touching_cells, write_folder
from unet_np.train import Trainer


def mixed_dataset(seed=0):
    """Five images of three sizes (C=1), binary masks."""
    xs, ys = [], []
    for i, size in enumerate([(40, 48), (64, 64), (50, 70), (64, 64), (44, 52)]):
        x, y, _ = touching_cells(1, size, seed=seed + i)
        xs.append(x[0])
        ys.append(y[0])
    return SegmentationDataset.from_arrays(xs, ys)


def make(seed=0, **kw):
    unet_np.seed(seed)
    model = unet_np.UNet(1, 2, depth=2, base_channels=4, **kw)
    return model, Trainer(model, optim.Adam(model.parameters(), lr=3e-3))


def test_readme_example_trains_from_a_folder(tmp_path, monkeypatch):
    """The README's three lines, on a folder written by the library (fewer epochs)."""
    monkeypatch.chdir(tmp_path)
    images, masks, _ = touching_cells(12, 32, seed=1)
    write_folder("train", images, masks)
    ds = unet_np.data.load_folder("train/images", "train/masks")
    model = unet_np.UNet(ds.in_channels, ds.num_classes, depth=2, base_channels=8)
    hist = Trainer(model, optim.Adam(model.parameters(), lr=3e-3)).fit(ds, epochs=3, batch_size=8,
                                                                        seed=0)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_mixed_sizes_are_cropped_to_the_largest_common_valid_size():
    ds = mixed_dataset()
    model, trainer = make()
    seen = []
    trainer.train_step = lambda x, y, w=None: seen.append((x.shape, y.shape, w)) or 0.5
    trainer.fit(ds, 2, batch_size=2, seed=0)                  # epochs given by position
    assert pipeline.crop_size(model, [m.shape for m in ds.masks]) == (40, 48)
    assert {s[0][2:] for s in seen} == {(40, 48)} and {s[1][1:] for s in seen} == {(40, 48)}
    assert [s[0][0] for s in seen] == [2, 2, 1] * 2          # 5 samples, batch 2, two epochs
    assert all(s[2] is None for s in seen)
    assert trainer.run_meta["train_size"] == [40, 48]
    assert trainer.run_meta["normalize"] == "image"


def test_explicit_crop_validation_fraction_and_weight_map():
    ds = mixed_dataset()
    model, trainer = make()
    hist = trainer.fit(ds, epochs=2, batch_size=2, crop=32, val=0.4, weight_map=True, seed=3,
                       augment="elastic")
    assert ds.weights is not None and len(ds.weights) == len(ds)
    assert all(0 <= h["val_dice"] <= 1 for h in hist)
    assert trainer.run_meta["train_size"] == [32, 32] and trainer.run_meta["weight_map"] is True


def test_validation_dataset_and_callable_augmentation():
    ds, val = mixed_dataset(0), mixed_dataset(10)
    calls = []

    def aug(x, y, w, rng):
        calls.append(x.shape)
        return x[:, ::-1].copy(), y[::-1].copy(), w

    _, trainer = make()
    hist = trainer.fit(ds, epochs=1, batch_size=5, val=val, augment=aug, seed=0)
    assert calls == [(1, 40, 48)] * 5                          # per sample, after the crop
    assert "val_dice" in hist[0]


def test_resume_is_bit_exact_in_the_dataset_form(tmp_path):
    """Two epochs, a checkpoint, two more from it == four epochs in one go (random crops and
    augmentation included)."""
    ds = mixed_dataset()
    kw = dict(batch_size=2, val=0.2, augment="basic", weight_map=True, seed=7)
    full, t_full = make(1)
    t_full.fit(ds, 4, out_dir=str(tmp_path / "full"), **kw)
    half, t_half = make(1)
    t_half.fit(ds, 2, out_dir=str(tmp_path / "half"), **kw)
    resumed, t_res = make(99)                                   # other initial weights: all replaced
    t_res.resume(str(tmp_path / "half" / "last.npz"))
    assert t_res.run_meta["train_size"] == [40, 48]            # run metadata came back
    t_res.fit(ds, 4, **kw)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert np.array_equal(a, b), name
    assert [h["loss"] for h in t_full.history] == [h["loss"] for h in t_res.history]


def test_run_meta_reaches_the_checkpoint(tmp_path):
    ds = mixed_dataset()
    model, trainer = make()
    trainer.run_meta = {"experiment": "a", "normalize": "image"}
    trainer.fit(ds, 1, batch_size=5, out_dir=str(tmp_path))
    ck = unet_np.checkpoint.load_checkpoint(tmp_path / "last.npz")
    assert ck.meta["data"]["experiment"] == "a" and ck.meta["data"]["train_size"] == [40, 48]
    assert unet_np.load_model(tmp_path / "model.npz").config() == model.config()


def test_array_form_still_works_and_takes_an_augmentation_name():
    x = np.random.default_rng(0).random((4, 1, 16, 16)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    _, trainer = make()
    hist = trainer.fit(x, y, epochs=2, batch_size=2, augment="basic", seed=0)
    assert len(hist) == 2


@pytest.mark.parametrize("call,exc,words", [
    (lambda t, ds: t.fit(ds), TypeError, "needs epochs"),
    (lambda t, ds: t.fit(ds, np.zeros((5, 8, 8))), TypeError, "holds the masks"),
    (lambda t, ds: t.fit(ds, 1, pixel_weights=[1]), TypeError, "weight_map=True"),
    (lambda t, ds: t.fit(ds, 1, crop=(48, 48)), ValueError, "smaller than the crop"),
    (lambda t, ds: t.fit(ds, 1, crop=30), ValueError, "divisible"),
    (lambda t, ds: t.fit(ds, 1, augment="rotate"), ValueError, "basic, elastic"),
    (lambda t, ds: t.fit(ds, 1, val=1.5), ValueError, "validation fraction"),
    (lambda t, ds: t.fit(np.zeros((2, 1, 8, 8)), epochs=1), TypeError, "needs images, masks"),
    (lambda t, ds: t.fit(np.zeros((2, 1, 8, 8)), np.zeros((2, 8, 8)), 1, crop=4), TypeError,
     "dataset form"),
])
def test_bad_calls_say_what_is_wrong(call, exc, words):
    _, trainer = make()
    with pytest.raises(exc, match=words):
        call(trainer, mixed_dataset())


def test_images_too_small_for_the_model():
    images, masks, _ = touching_cells(2, 24, seed=0)
    ds = SegmentationDataset.from_arrays(images, masks)      # 24 px < 2**5
    unet_np.seed(0)
    model = unet_np.UNet(1, 2, depth=5, base_channels=2)
    with pytest.raises(ValueError, match="too small for a depth-5"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.1)).fit(ds, 1)


def test_valid_padding_model_cuts_targets_to_its_output(tmp_path):
    images, masks, _ = touching_cells(3, 60, seed=2)
    ds = SegmentationDataset.from_arrays(images, masks)
    model, trainer = make(padding="valid")
    seen = []
    original = trainer.train_step
    trainer.train_step = lambda x, y, w=None: seen.append((x.shape, y.shape)) or original(x, y, w)
    trainer.fit(ds, 1, batch_size=3)
    (xs, ys), = seen
    assert model.output_shape(xs[2:]) == ys[1:]


def test_load_folder_dataset_round_trip(tmp_path):
    images, masks, _ = touching_cells(4, 32, seed=5)
    write_folder(tmp_path, images, masks)
    ds = load_folder(tmp_path / "images", tmp_path / "masks")
    assert len(ds) == 4 and ds.num_classes == 2

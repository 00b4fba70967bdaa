"""GeneralUNet (unet_np.models.builder): the existing UNet as a special case, finite differences
through every option, deep supervision, save/load, errors, 3-D when the 3-D layers exist."""
import numpy as np
import pytest

from unet_np import nn
from unet_np.gradcheck import gradcheck
from unet_np.models import GeneralUNet, UNet, load_model


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    sd = {k: (v if k.endswith("num_batches_tracked") else
              rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var") else
              0.3 * rng.standard_normal(v.shape)) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    return model


@pytest.mark.parametrize("upsample,batchnorm", [("transpose", True), ("bilinear", False)])
def test_the_unet_is_a_general_unet(upsample, batchnorm):
    """UNet(depth=2) == GeneralUNet with the same choices: same parameter order, same outputs."""
    old = _randomize(UNet(1, 3, depth=2, base_channels=4, batchnorm=batchnorm, upsample=upsample,
                          dtype=np.float64))
    new = GeneralUNet(1, 3, channels=(4, 8, 16), norm="batch" if batchnorm else None,
                      upsample="transpose" if upsample == "transpose" else "bilinear_conv",
                      concat="up_skip", dtype=np.float64)
    assert [p.shape for p in old.parameters()] == [p.shape for p in new.parameters()]
    new.load_torch_state_dict(old.state_dict())               # by order, shapes checked
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8))
    for train in (True, False):
        old.train(train)
        new.train(train)
        y_old, y_new = old.forward(x), new.forward(x)
        assert np.max(np.abs(y_old - y_new)) < 1e-12
        g = np.random.default_rng(2).standard_normal(y_old.shape)
        old.zero_grad()
        new.zero_grad()
        assert np.max(np.abs(old.backward(g) - new.backward(g))) < 1e-12
        for p, q in zip(old.parameters(), new.parameters()):
            assert np.max(np.abs(p.grad - q.grad)) < 1e-12


CONFIGS = {
    "instance, leaky, strided conv, skip_up, deep supervision": dict(
        channels=(2, 3, 4), norm="instance", norm_kwargs=dict(affine=True), act="leaky_relu",
        negative_slope=0.1, downsample="conv", concat="skip_up", heads="all", deep_supervision=True,
        module_order="by_kind", order="CDNA", kernel_sizes=[(1, 3), 3, 3], strides=[1, (1, 2), 2]),
    "group norm, bilinear align_corners, 1 conv per level, no bias": dict(
        channels=(4, 4, 4), norm="group", norm_kwargs=dict(num_groups=2), upsample="bilinear",
        align_corners=True, convs_per_level=1, conv_bias=False),
    "batch norm eval-ready, transpose, decoder with its own widths": dict(
        channels=(2, 4), norm="batch", encoder_convs=[[3, 2], [4, 4]], decoder_convs=[[5, 2]]),
}


def _assert_fd(model, fd, name):
    """Every finite-difference error below 1e-6. A convolution's bias right before a norm has a true
    gradient of 0 (the norm removes any constant): there the relative measure divides rounding by
    1e-8, so it is checked to be ~0 instead."""
    params = dict(model.named_parameters())
    before_norm = {k for k in fd if model.config()["norm"] and k.endswith(".0.bias")
                   and not k.startswith(("head", "up"))}
    for k in before_norm:
        assert np.max(np.abs(params[k].grad)) < 1e-10, k
    worst = {k: v for k, v in fd.items() if k not in before_norm and v > 1e-6}
    assert not worst, (name, worst)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_finite_differences(name):
    model = _randomize(GeneralUNet(1, 2, dtype=np.float64, **CONFIGS[name]), seed=3)
    shape = (1, 1, 4, 8) if "strided" in name else (2 if "batch" in name else 1, 1, 4, 4)
    x = np.random.default_rng(4).standard_normal(shape)
    if model.deep_supervision:
        model.deep_supervision = False                     # gradcheck takes one output
        fd = gradcheck(model, x)
        model.deep_supervision = True
    else:
        fd = gradcheck(model, x)
    _assert_fd(model, fd, name)


def test_deep_supervision_returns_every_head_and_takes_their_gradients():
    model = _randomize(GeneralUNet(1, 2, dtype=np.float64, **CONFIGS[
        "instance, leaky, strided conv, skip_up, deep supervision"]))
    x = np.random.default_rng(5).standard_normal((1, 1, 4, 8))
    outs = model.forward(x)
    assert [o.shape for o in outs] == [(1, 2, 4, 8), (1, 2, 4, 4)]
    gs = [np.random.default_rng(6).standard_normal(o.shape) for o in outs]
    model.zero_grad()
    dx = model.backward(gs)
    # the same gradient as the sum of the two losses taken one at a time (linearity)
    parts = []
    for k in range(2):
        model.zero_grad()
        model.forward(x)
        parts.append(model.backward([g if i == k else np.zeros_like(g) for i, g in enumerate(gs)]))
    assert np.max(np.abs(dx - parts[0] - parts[1])) < 1e-12
    with pytest.raises(ValueError, match="list of 2 gradients"):
        model.forward(x)
        model.backward(gs[0])


def test_save_and_load_keep_config_torch_names_and_weights(tmp_path):
    model = _randomize(GeneralUNet(1, 2, channels=(2, 4), norm="instance",
                                   norm_kwargs=dict(affine=True, track_running_stats=True),
                                   torch_names=None, dtype=np.float64))
    names = [[f"theirs.{k}", k] for k in model.state_dict()] + [["alias.head", "head0.weight"]]
    model.set_torch_names(names)
    model.save(tmp_path / "m.npz")
    back = load_model(tmp_path / "m.npz")
    assert type(back) is GeneralUNet and back.torch_names == names
    x = np.random.default_rng(7).standard_normal((1, 1, 4, 4))
    model.eval()
    back.eval()
    assert np.array_equal(model.forward(x), back.forward(x))
    tsd = back.torch_state_dict()
    assert list(tsd) == [t for t, _ in names]
    assert np.array_equal(tsd["alias.head"], tsd["theirs.head0.weight"])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="norm must be one of"):
        GeneralUNet(1, 2, norm="layer")
    with pytest.raises(ValueError, match="strides must be"):
        GeneralUNet(1, 2, channels=(2, 4, 8), strides=[1, 2, 2, 2])
    with pytest.raises(ValueError, match="multiple of the product of the strides"):
        GeneralUNet(1, 2, channels=(2, 4, 8)).forward(np.zeros((1, 1, 6, 8), np.float32))
    model = GeneralUNet(1, 2, channels=(2, 4), torch_names=[["a.w", "enc0.0.0.weight"]])
    with pytest.raises(ValueError, match="missing theirs 'a.w' \\(ours 'enc0.0.0.weight'"):
        model.load_torch_state_dict({})
    with pytest.raises(ValueError, match="theirs 'a.w' has shape \\(1,\\), but ours 'enc0.0.0.weight'"):
        model.load_torch_state_dict({"a.w": np.zeros(1)})
    with pytest.raises(ValueError, match="does not have: theirs 'b'"):
        model.load_torch_state_dict({"a.w": np.zeros((2, 1, 3, 3)), "b": np.zeros(1)})


def test_three_d():
    if not all(hasattr(nn, n) for n in ("Conv3d", "ConvTranspose3d", "MaxPool3d")):
        pytest.skip("unet_np.nn has no Conv3d / ConvTranspose3d / MaxPool3d yet (the volumes work)")
    model = _randomize(GeneralUNet(1, 2, channels=(2, 3), spatial_dims=3, norm="instance",
                                   norm_kwargs=dict(affine=True), act="leaky_relu", dtype=np.float64))
    fd = gradcheck(model, np.random.default_rng(8).standard_normal((1, 1, 2, 4, 4)))
    _assert_fd(model, fd, "3-D")

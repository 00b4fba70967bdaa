"""Whole models against PyTorch references in float64: logits, loss, every gradient, SGD trajectories.

Tolerance: relative error (tests.helpers.rel_err) below TOL = 1e-12 for logits, loss, gradients and
trajectories of whole networks. Measured: the worst error over this file is 5.4e-15 (the depth-3
U-Net with batch-norm, training mode; the article network with its 10 SGD steps 3.0e-15), so 1e-12
leaves a margin of about 190x for another BLAS's summation order while still failing on any
mistake in the maths, which shows at 1e-6 or above."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unet_np
from unet_np import AttentionUNet, UNet, UNetPlusPlus
from unet_np.nn import CrossEntropyLoss
from unet_np.optim import SGD
from tests.helpers import n, rel_err, t
from tests.models.torch_reference import (ArticleUNet, TorchAttentionUNet, TorchUNet,
                                          TorchUNetPlusPlus)

TOL = 1e-12   # measured worst 5.4e-15 (see the docstring): margin about 190x


def _pair(ours, theirs):
    """Copy the torch model's weights into ours by order; both in float64."""
    theirs.double()
    ours.load_torch_state_dict(theirs.state_dict())
    return ours, theirs


def _compare(ours, theirs, x, target, train=True):
    ours.train(train)
    theirs.train(train)
    logits = ours.forward(x)
    loss_fn = CrossEntropyLoss()
    outs = logits if isinstance(logits, list) else [logits]
    loss = sum(loss_fn.forward(o, target) for o in outs) / len(outs)
    grads = []
    for o in outs:
        loss_fn.forward(o, target)
        grads.append(loss_fn.backward() / len(outs))
    ours.zero_grad()
    dx = ours.backward(grads if isinstance(logits, list) else grads[0])

    xt = t(x, requires_grad=True)
    out_t = theirs(xt)
    outs_t = out_t if isinstance(out_t, list) else [out_t]
    loss_t = sum(F.cross_entropy(o, t(target)) for o in outs_t) / len(outs_t)
    theirs.zero_grad()
    loss_t.backward()

    for o, ot in zip(outs, outs_t):
        assert rel_err(o, n(ot)) < TOL
    assert abs(loss - loss_t.item()) / abs(loss_t.item()) < TOL
    assert rel_err(dx, n(xt.grad)) < TOL
    ours_p = list(ours.named_parameters())
    theirs_p = list(theirs.named_parameters())
    assert len(ours_p) == len(theirs_p)
    worst = 0.0
    # A conv bias followed by batch-norm in training has an exactly-zero gradient (BN subtracts the
    # mean); both sides then hold round-off only, so those entries are measured against the largest
    # gradient of the whole model instead of their own (tiny) size.
    floor = max(float(np.abs(n(tp.grad)).max()) for _, tp in theirs_p)
    for (name, p), (tname, tp) in zip(ours_p, theirs_p):
        assert name == tname
        ref = n(tp.grad)
        if np.abs(ref).max() < 1e-9 * floor:
            err = float(np.abs(p.grad - ref).max()) / floor
        else:
            err = rel_err(p.grad, ref)
        worst = max(worst, err)
        assert err < TOL, (name, err)
    return worst


def test_article_network_parameters_match_reference_order_and_shapes():
    ours = UNet(1, 2, depth=2, base_channels=64)
    theirs = ArticleUNet()
    ts = [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    us = [(k, tuple(v.shape)) for k, v in ours.state_dict().items()]
    assert us == ts
    assert sum(p.data.size for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_article_network_float64_and_sgd_trajectory():
    torch.manual_seed(0)
    ours, theirs = _pair(UNet(1, 2, depth=2, base_channels=64, dtype=np.float64), ArticleUNet())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1, 16, 16))
    target = rng.integers(0, 2, (2, 16, 16))
    _compare(ours, theirs, x, target)

    _sgd_trajectory(ours, theirs, x, target)


def _sgd_trajectory(ours, theirs, x, target, steps=10):
    """10 steps of SGD with momentum and weight decay on both sides; every parameter (and running
    statistic) must stay within TOL of PyTorch's."""
    ours.train()
    theirs.train()
    opt = SGD(ours.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = CrossEntropyLoss()
    for step in range(steps):
        opt.zero_grad()
        outs = ours.forward(x)
        outs = outs if isinstance(outs, list) else [outs]
        grads = []
        for o in outs:
            loss_fn.forward(o, target)
            grads.append(loss_fn.backward() / len(outs))
        ours.backward(grads if len(grads) > 1 else grads[0])
        opt.step()
        opt_t.zero_grad()
        outs_t = theirs(t(x))
        outs_t = outs_t if isinstance(outs_t, list) else [outs_t]
        (sum(F.cross_entropy(o, t(target)) for o in outs_t) / len(outs_t)).backward()
        opt_t.step()
    for (name, v), (_, tv) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert rel_err(v, n(tv)) < TOL, name


@pytest.mark.parametrize("kw", [
    dict(depth=3, base_channels=4, batchnorm=True),
    dict(depth=1, base_channels=4, skip=False),
    dict(depth=2, base_channels=4, upsample="bilinear"),
    dict(depth=2, base_channels=4, padding="valid"),
])
@pytest.mark.parametrize("train", [True, False])
def test_unet_variants_against_torch(kw, train):
    torch.manual_seed(1)
    ours = UNet(2, 3, dtype=np.float64, **kw)
    theirs = TorchUNet(2, 3, depth=kw["depth"], base=kw["base_channels"], skip=kw.get("skip", True),
                       padding=kw.get("padding", "same"), batchnorm=kw.get("batchnorm", False),
                       upsample=kw.get("upsample", "transpose"))
    ours, theirs = _pair(ours, theirs)
    rng = np.random.default_rng(2)
    hw = ours.valid_input_shape((16, 16)) if kw.get("padding") == "valid" else (16, 16)
    x = rng.standard_normal((2, 2) + hw)
    out_hw = ours.output_shape(hw)
    target = rng.integers(0, 3, (2,) + out_hw)
    if kw.get("batchnorm") and not train:
        # give the running statistics something other than their initial values, on both sides
        ours.train(); theirs.train()
        ours.forward(x); theirs(t(x))
    _compare(ours, theirs, x, target, train=train)
    if kw.get("batchnorm"):
        for (k, v), (tk, tv) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert rel_err(v, n(tv)) < TOL, k
    if train:
        _sgd_trajectory(ours, theirs, x, target)


@pytest.mark.parametrize("ds", [False, True])
def test_unet_plus_plus_against_torch(ds):
    torch.manual_seed(3)
    ours, theirs = _pair(UNetPlusPlus(1, 2, depth=3, base_channels=4, deep_supervision=ds,
                                      dtype=np.float64),
                         TorchUNetPlusPlus(1, 2, depth=3, base=4, deep_supervision=ds))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 1, 16, 16))
    target = rng.integers(0, 2, (2, 16, 16))
    _compare(ours, theirs, x, target)
    _sgd_trajectory(ours, theirs, x, target)


def test_unet_plus_plus_pruned_inference_matches_torch_subnetwork():
    torch.manual_seed(5)
    ours, theirs = _pair(UNetPlusPlus(1, 2, depth=3, base_channels=4, deep_supervision=True,
                                      dtype=np.float64),
                         TorchUNetPlusPlus(1, 2, depth=3, base=4, deep_supervision=True))
    x = np.random.default_rng(6).standard_normal((1, 1, 16, 16))
    ours.eval().prune(2)
    theirs.eval()
    assert rel_err(ours.predict(x), n(theirs(t(x), level=2))) < TOL
    with pytest.raises(ValueError, match="deep_supervision"):
        UNetPlusPlus(1, 2, depth=3, base_channels=4).prune(2)


def test_attention_unet_against_torch():
    torch.manual_seed(7)
    ours, theirs = _pair(AttentionUNet(1, 2, depth=3, base_channels=4, dtype=np.float64),
                         TorchAttentionUNet(1, 2, depth=3, base=4))
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 1, 16, 16))
    target = rng.integers(0, 2, (2, 16, 16))
    _compare(ours, theirs, x, target)
    _sgd_trajectory(ours, theirs, x, target)


def test_export_loads_into_torch():
    ours = UNet(1, 2, depth=2, base_channels=8, batchnorm=True)
    theirs = TorchUNet(1, 2, depth=2, base=8, batchnorm=True).float()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.torch_state_dict().items()})
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16)).astype(np.float32)
    ours.eval(); theirs.eval()
    with torch.no_grad():
        assert rel_err(ours.predict(x), theirs(torch.from_numpy(x)).numpy()) < 1e-5


def test_load_torch_state_dict_mismatch_names_both_sides():
    ours = UNet(1, 2, depth=2, base_channels=8)
    theirs = TorchUNet(1, 2, depth=2, base=4)
    with pytest.raises(ValueError, match=r"enc1\.conv\.0\.weight.*enc1\.conv\.0\.weight"):
        ours.load_torch_state_dict(theirs.state_dict())
    sd = TorchUNet(1, 2, depth=2, base=8).state_dict()
    sd.pop("final.bias")
    with pytest.raises(ValueError, match="final.bias"):
        ours.load_torch_state_dict(sd)


# -- volumes: the 3D U-Net (spatial_dims=3) against TorchUNet(dims=3) -------------------------------
@pytest.mark.parametrize("kw,size", [
    (dict(depth=2, base_channels=2), (8, 12, 8)),
    (dict(depth=2, base_channels=2, batchnorm=True), (8, 8, 12)),
    (dict(depth=1, base_channels=2, upsample="bilinear"), (6, 4, 8)),     # trilinear in 3-D
    (dict(depth=1, base_channels=2, padding="valid"), None),
    (dict(depth=1, base_channels=2, skip=False), (4, 6, 4)),
])
@pytest.mark.parametrize("train", [True, False])
def test_unet3d_against_torch(kw, size, train):
    """Logits, loss, every gradient (and in training an SGD trajectory) of the 3-D U-Net, with the
    2-D network's parameter names and order, against a PyTorch 3-D twin in float64."""
    torch.manual_seed(11)
    ours = UNet(1, 3, dtype=np.float64, spatial_dims=3, **kw)
    theirs = TorchUNet(1, 3, depth=kw["depth"], base=kw["base_channels"], skip=kw.get("skip", True),
                       padding=kw.get("padding", "same"), batchnorm=kw.get("batchnorm", False),
                       upsample=kw.get("upsample", "transpose"), dims=3)
    ours, theirs = _pair(ours, theirs)
    size = size or ours.valid_input_shape((12, 12, 12))
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 1) + size)
    target = rng.integers(0, 3, (2,) + ours.output_shape(size))
    if kw.get("batchnorm") and not train:
        ours.train(); theirs.train()
        ours.forward(x); theirs(t(x))
    _compare(ours, theirs, x, target, train=train)
    if train:
        _sgd_trajectory(ours, theirs, x, target, steps=3)


def test_unet3d_bad_input_names_the_problem():
    vol = UNet(1, 2, depth=2, base_channels=2, spatial_dims=3)
    img = UNet(1, 2, depth=2, base_channels=2)
    with pytest.raises(ValueError, match=r"5-D array \(N, C, D, H, W\), got 4-D"):
        vol.forward(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"4-D array \(N, C, H, W\), got 5-D"):
        img.forward(np.zeros((1, 1, 8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="nearest valid sizes for 10 are 8 or 12"):
        vol.forward(np.zeros((1, 1, 8, 10, 8), np.float32))
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        UNet(1, 2, spatial_dims=4)


def test_unet3d_checkpoint_round_trip_and_pad_input(tmp_path):
    model = UNet(1, 2, depth=2, base_channels=2, spatial_dims=3, batchnorm=True, pad_input=True)
    x = np.random.default_rng(3).standard_normal((1, 1, 7, 9, 6)).astype(np.float32)
    y = model.predict(x)
    assert y.shape == (1, 2, 7, 9, 6)
    unet_np.save(model, tmp_path / "vol.npz")
    loaded = unet_np.load_model(tmp_path / "vol.npz")
    assert loaded.spatial_dims == 3 and loaded.config() == model.config()
    assert np.array_equal(loaded.predict(x), y)
    assert "spatial_dims" not in UNet(1, 2, depth=1).config()   # 2-D configs are as they were


@pytest.mark.parametrize("make", [
    lambda: (UNetPlusPlus(1, 2, depth=2, base_channels=2, deep_supervision=True, dtype=np.float64,
                          spatial_dims=3),
             TorchUNetPlusPlus(1, 2, depth=2, base=2, deep_supervision=True, dims=3)),
    lambda: (AttentionUNet(1, 2, depth=2, base_channels=2, upsample="bilinear", dtype=np.float64,
                           spatial_dims=3),
             TorchAttentionUNet(1, 2, depth=2, base=2, upsample="bilinear", dims=3)),
], ids=["unet++", "attention"])
def test_unet_plus_plus_and_attention_3d_against_torch(make):
    torch.manual_seed(13)
    ours, theirs = _pair(*make())
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 1, 4, 8, 8))
    target = rng.integers(0, 2, (2, 4, 8, 8))
    _compare(ours, theirs, x, target)
    _sgd_trajectory(ours, theirs, x, target, steps=3)

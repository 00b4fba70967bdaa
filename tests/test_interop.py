"""unet_np.interop against the peers themselves: milesial's UNet (a PyTorch twin written here from
its published description: the repository is GPL-3.0 and not a package), MONAI's BasicUNet and
nnU-Net's PlainConvUNet. Random weights, perturbed norm statistics, eval and training mode:
logits < 1e-9, loss and every gradient < 1e-8 (float64); float32 logits < 1e-4 (relative errors)."""
import numpy as np
import pytest

from unet_np import interop
from unet_np.nn import CrossEntropyLoss

torch = pytest.importorskip("torch")
tnn = torch.nn


# -- milesial's architecture, written from its description ------------------------------------------
class DoubleConv(tnn.Module):
    def __init__(self, cin, cout, mid=None):
        super().__init__()
        mid = mid or cout
        self.double_conv = tnn.Sequential(
            tnn.Conv2d(cin, mid, 3, padding=1, bias=False), tnn.BatchNorm2d(mid), tnn.ReLU(inplace=True),
            tnn.Conv2d(mid, cout, 3, padding=1, bias=False), tnn.BatchNorm2d(cout), tnn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class Down(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.maxpool_conv = tnn.Sequential(tnn.MaxPool2d(2), DoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(tnn.Module):
    def __init__(self, cin, cout, bilinear):
        super().__init__()
        if bilinear:
            self.up = tnn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(cin, cout, cin // 2)
        else:
            self.up = tnn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            self.conv = DoubleConv(cin, cout)

    def forward(self, below, skip):
        up = self.up(below)
        dy, dx = skip.shape[2] - up.shape[2], skip.shape[3] - up.shape[3]
        up = tnn.functional.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([skip, up], dim=1))


class OutConv(tnn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


class MilesialUNet(tnn.Module):
    def __init__(self, n_channels, n_classes, bilinear=False, b=64):
        super().__init__()
        f = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, b)
        self.down1, self.down2, self.down3 = Down(b, 2 * b), Down(2 * b, 4 * b), Down(4 * b, 8 * b)
        self.down4 = Down(8 * b, 16 * b // f)
        self.up1 = Up(16 * b, 8 * b // f, bilinear)
        self.up2 = Up(8 * b, 4 * b // f, bilinear)
        self.up3 = Up(4 * b, 2 * b // f, bilinear)
        self.up4 = Up(2 * b, b, bilinear)
        self.outc = OutConv(b, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


# -- the comparison ---------------------------------------------------------------------------------
def _perturb(peer, seed=0):
    """Random weights and perturbed running statistics, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in peer.state_dict().items():
            if name.endswith("num_batches_tracked"):
                v.fill_(3)
            elif name.endswith("running_var"):
                v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
            elif v.is_floating_point():
                v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3)
    return peer


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare(peer, ours, shape, train, num_classes, outputs=None, seed=1):
    """Forward, cross-entropy loss and backward on both; returns the worst relative errors
    {'logits', 'loss', 'grads'} and checks the peer loads our torch_state_dict strictly."""
    peer.train(train)
    ours.train(train)
    peer.zero_grad(set_to_none=True)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    target = rng.integers(0, num_classes, (shape[0],) + shape[2:])
    tx = torch.tensor(x, requires_grad=True)
    ty = peer(tx)
    outs = ours.forward(x)
    multi = isinstance(ty, (list, tuple))        # deep supervision: the loss on the full resolution
    if multi:
        assert len(outs) == len(ty) == outputs
        ty, y = ty[0], outs[0]
    else:
        y = outs
    loss_t = tnn.functional.cross_entropy(ty, torch.as_tensor(target))
    loss_t.backward()
    ce = CrossEntropyLoss(dtype=ours.dtype)
    loss = ce.forward(y, target)
    dlogits = ce.backward()
    ours.zero_grad()
    dx = ours.backward([dlogits] + [np.zeros_like(o) for o in outs[1:]] if multi else dlogits)
    errs = {"logits": _rel(y, ty.detach().numpy()), "loss": abs(float(loss) - loss_t.item()) / abs(loss_t.item())}
    theirs = [p for p in peer.parameters()]
    mine = ours.parameters()
    assert [tuple(p.shape) for p in theirs] == [tuple(p.data.shape) for p in mine]
    g = [_rel(dx, tx.grad.numpy())]
    refs = [np.zeros(tuple(q.shape)) if q.grad is None else q.grad.numpy() for q in theirs]
    biggest = max(float(np.max(np.abs(r))) for r in refs)
    for p, ref in zip(mine, refs):
        scale = float(np.max(np.abs(ref)))
        if scale < 1e-12 * biggest:
            # zero in exact arithmetic (a convolution's bias right before a norm, an unused head):
            # both sides hold rounding noise; ours must be as small, measured on the largest gradient
            g.append(float(np.max(np.abs(p.grad))) / biggest * 1e3)
        else:
            g.append(float(np.max(np.abs(p.grad - ref))) / scale)
    errs["grads"] = max(g)
    # running statistics after a training forward, and the strict load of our names into the peer
    state = ours.torch_state_dict()
    for k, v in peer.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            errs["buffers"] = max(errs.get("buffers", 0.0), _rel(state[k], v.numpy()))
    peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return errs


def assert_close(errs):
    assert errs["logits"] < 1e-9, errs
    assert errs["loss"] < 1e-8 and errs["grads"] < 1e-8, errs
    assert errs.get("buffers", 0.0) < 1e-9, errs


def float32_logits(peer, make, shape):
    peer.float().eval()
    ours = make(peer.state_dict(), np.float32).eval()
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    y = ours.forward(x)
    ty = peer(torch.from_numpy(x))
    y, ty = (y[0], ty[0]) if isinstance(ty, (list, tuple)) else (y, ty)
    assert y.dtype == np.float32
    return _rel(y, ty.detach().numpy())


# -- milesial ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("bilinear", [False, True], ids=["transpose", "bilinear"])
def test_milesial(bilinear, train):
    peer = _perturb(MilesialUNet(2, 3, bilinear, b=4).double())
    ours = interop.from_milesial(peer.state_dict(), 2, 3, bilinear=bilinear, base_channels=4)
    assert ours.dtype == np.float64
    assert_close(compare(peer, ours, (2, 2, 16, 16), train, 3))
    err32 = float32_logits(peer, lambda sd, dt: interop.from_milesial(sd, 2, 3, bilinear, dtype=dt,
                                                                       base_channels=4), (2, 2, 16, 16))
    assert err32 < 1e-4


def test_milesial_full_width_loads_and_names_errors_on_both_sides():
    peer = MilesialUNet(3, 2, bilinear=True)
    sd = peer.state_dict()
    ours = interop.from_milesial(sd, 3, 2, bilinear=True)
    assert len(ours.parameters()) == len(list(peer.parameters()))
    assert sum(p.data.size for p in ours.parameters()) == sum(p.numel() for p in peer.parameters())
    missing = dict(sd)
    del missing["up2.conv.double_conv.4.running_var"]
    with pytest.raises(ValueError, match="missing theirs 'up2.conv.double_conv.4.running_var' "
                                         "\\(ours 'dec2.1.1.running_var'"):
        interop.from_milesial(missing, 3, 2, bilinear=True)
    with pytest.raises(ValueError, match="theirs 'inc.double_conv.0.weight' has shape \\(64, 3, 3, 3\\), "
                                         "but ours 'enc0.0.0.weight' needs \\(64, 1, 3, 3\\)"):
        interop.from_milesial(sd, 1, 2, bilinear=True)
    with pytest.raises(ValueError, match="does not have: theirs 'up1.up.weight'"):
        interop.from_milesial(MilesialUNet(3, 2, bilinear=False, b=4).state_dict(), 3, 2, bilinear=True,
                              base_channels=4)


# -- MONAI ------------------------------------------------------------------------------------------
MONAI_CASES = {
    "2-D defaults (instance affine, LeakyReLU 0.1)": dict(spatial_dims=2),
    "2-D batch norm, ReLU, no bias": dict(spatial_dims=2, norm="batch", act="relu", bias=False),
    "3-D defaults": dict(spatial_dims=3),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(MONAI_CASES))
def test_monai_basicunet(case, train):
    monai_nets = pytest.importorskip("monai.networks.nets", reason="MONAI is not installed")
    kw = dict(MONAI_CASES[case], in_channels=2, out_channels=3, features=(3, 4, 4, 5, 6, 3))
    if kw["spatial_dims"] == 3:
        from unet_np import nn
        if not hasattr(nn, "Conv3d"):
            pytest.skip("unet_np.nn has no Conv3d yet")
    peer = _perturb(monai_nets.BasicUNet(**kw).double())
    ours = interop.from_monai_basicunet(peer.state_dict(), **kw)
    shape = (2, 2) + ((16, 32) if kw["spatial_dims"] == 2 else (16, 16, 32))   # bottom: 2 values
    assert_close(compare(peer, ours, shape, train, 3))
    assert float32_logits(peer, lambda sd, dt: interop.from_monai_basicunet(sd, dtype=dt, **kw), shape) < 1e-4


def test_monai_refuses_what_it_does_not_build():
    with pytest.raises(ValueError, match="upsample='pixelshuffle' is not supported"):
        interop.from_monai_basicunet({}, upsample="pixelshuffle")
    with pytest.raises(ValueError, match="features needs 6 numbers"):
        interop.from_monai_basicunet({}, features=(1, 2))


# -- nnU-Net -----------------------------------------------------------------------------------------
def nnunet_architecture(dims, deep=False, nonlin_first=False, dropout=False):
    """configurations[name]['architecture'] as an nnU-Net v2 plans file holds it (small)."""
    k = [[1, 3], [3, 3], [3, 3]] if dims == 2 else [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    s = [[1, 1], [1, 2], [2, 2]] if dims == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3, "features_per_stage": [3, 4, 5],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": k, "strides": s,
            "n_conv_per_stage": [2, 1, 2], "n_conv_per_stage_decoder": [1, 2], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": "torch.nn.modules.dropout.Dropout" if dropout else None,
            "dropout_op_kwargs": {"p": 0.0} if dropout else None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            **({"nonlin_first": True} if nonlin_first else {}),
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def nnunet_peer(arch, input_channels, num_classes, deep):
    pytest.importorskip("dynamic_network_architectures", reason="dynamic-network-architectures is not installed")
    import pydoc
    kw = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kw.get(key) is not None:
            kw[key] = pydoc.locate(kw[key])
    cls = pydoc.locate(arch["network_class_name"])
    return cls(input_channels, num_classes=num_classes, deep_supervision=deep, **kw)


NNUNET_CASES = {
    "2-D": dict(dims=2), "2-D deep supervision": dict(dims=2, deep=True),
    "2-D nonlin first, dropout op": dict(dims=2, nonlin_first=True, dropout=True), "3-D": dict(dims=3),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", list(NNUNET_CASES))
def test_nnunet_plain_conv_unet(case, train):
    c = NNUNET_CASES[case]
    if c["dims"] == 3:
        from unet_np import nn
        if not hasattr(nn, "Conv3d"):
            pytest.skip("unet_np.nn has no Conv3d yet")
    arch = nnunet_architecture(c["dims"], nonlin_first=c.get("nonlin_first", False),
                               dropout=c.get("dropout", False))
    deep = c.get("deep", False)
    peer = _perturb(nnunet_peer(arch, 2, 3, deep).double())
    ours = interop.from_nnunet(peer.state_dict(), arch, 2, 3, deep_supervision=deep)
    shape = (2, 2) + ((8, 16) if c["dims"] == 2 else (4, 8, 8))
    assert_close(compare(peer, ours, shape, train, 3, outputs=2 if deep else None))
    make = lambda sd, dt: interop.from_nnunet(sd, arch, 2, 3, deep_supervision=deep, dtype=dt)  # noqa: E731
    assert float32_logits(peer, make, shape) < 1e-4


def test_nnunet_errors_name_the_entry():
    arch = nnunet_architecture(2)
    peer = nnunet_peer(arch, 1, 2, False)
    bad = dict(arch, network_class_name="dynamic_network_architectures.architectures.unet.ResidualEncoderUNet")
    with pytest.raises(ValueError, match="ResidualEncoderUNet' is not supported"):
        interop.from_nnunet(peer.state_dict(), bad, 1, 2)
    sd = dict(peer.state_dict())
    del sd["decoder.encoder.stages.1.0.convs.0.all_modules.1.bias"]
    with pytest.raises(ValueError, match="missing theirs 'decoder.encoder.stages.1.0.convs.0.all_modules.1.bias' "
                                         "\\(ours 'enc1.0.1.bias'"):
        interop.from_nnunet(sd, arch, 1, 2)

"""The field's U-Nets in unet_np: milesial's Pytorch-UNet, MONAI's BasicUNet, nnU-Net's PlainConvUNet.

Each converter builds a GeneralUNet (unet_np.models.builder) with the peer's architecture, the peer's
parameters() order and a ``torch_names`` table of the peer's state_dict names (aliases included), and
loads the given state_dict by name. A state_dict is any mapping of names to tensors or arrays: a
tensor is converted with ``np.asarray(t.detach().cpu())``; torch is never imported here. The model
trains, saves, predicts and exports like any other; ``model.torch_state_dict()`` gives the peer's
names back, which the peer's own ``load_state_dict(strict=True)`` accepts.

A missing key, an unexpected key or a shape that does not fit raises ValueError naming the entry on
both sides ("theirs 'inc.double_conv.0.weight' ... ours 'enc0.0.0.weight'"). Inputs: every spatial
size must be a multiple of the product of the strides (milesial's and MONAI's padding of a
mismatched upsampled map is not reproduced). How to bring a model: docs/interop.md.
"""
import numpy as np

from .models.builder import GeneralUNet, as_numpy

__all__ = ["from_milesial", "from_monai_basicunet", "from_nnunet"]


def _dtype_of(state_dict, dtype):
    """dtype=None: float64 when the state_dict's weights are float64, float32 otherwise."""
    if dtype is not None:
        return dtype
    for v in state_dict.values():
        kind = str(getattr(v, "dtype", ""))
        if "float64" in kind:
            return np.float64
        if "float" in kind:
            return np.float32
    return np.float32


def _names(module, ours, theirs):
    """[[theirs + key, ours + key], ...] for every state entry of one leaf module (weight, bias,
    running statistics: the same keys in PyTorch and here)."""
    return [[f"{theirs}.{k}", f"{ours}.{k}"] for k in module.state_dict()]


def _unit_names(model, ours, theirs_conv, theirs_norm):
    """A conv unit's entries: its convolution, then its norm (if any), as the peer lists them."""
    unit = getattr(model, ours.split(".")[0])[int(ours.split(".")[1])]
    out = []
    for i, layer in enumerate(unit):
        kind = type(layer).__name__
        if kind.startswith("Conv"):
            out += _names(layer, f"{ours}.{i}", theirs_conv)
        elif "Norm" in kind and theirs_norm is not None:
            out += _names(layer, f"{ours}.{i}", theirs_norm)
    return out


def _finish(model, names, state_dict):
    return model.set_torch_names(names).load_torch_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------
# milesial/Pytorch-UNet
# ---------------------------------------------------------------------------------------------------
def from_milesial(state_dict, n_channels, n_classes, bilinear=False, dtype=None, backend="numpy",
                  base_channels=64):
    """milesial's UNet(n_channels, n_classes, bilinear): DoubleConv = (conv3x3 without bias, BN,
    ReLU) x2; Down = maxpool 2 + DoubleConv; Up = ConvTranspose2d(c, c/2, 2, 2) or bilinear x2 with
    align_corners=True (then the DoubleConv's middle width is halved), concatenated as [skip, up];
    OutConv = 1x1. Widths 64, 128, 256, 512, 1024 / factor (factor 2 when bilinear);
    base_channels scales them for a twin of another width (64 in milesial's code)."""
    b, f = int(base_channels), 2 if bilinear else 1
    ch = [b, 2 * b, 4 * b, 8 * b, 16 * b // f]
    if bilinear:
        dec = [[b, b], [2 * b, b], [4 * b, 2 * b], [8 * b, 4 * b]]       # DoubleConv(in, out, in // 2)
    else:
        dec = [[c, c] for c in ch[:4]]
    model = GeneralUNet(n_channels, n_classes, channels=ch, decoder_convs=dec, downsample="maxpool",
                        upsample="bilinear" if bilinear else "transpose", align_corners=True,
                        concat="skip_up", norm="batch", act="relu", order="CNA", conv_bias=False,
                        module_order="per_level", dtype=_dtype_of(state_dict, dtype), backend=backend)
    names = []
    for l in range(5):
        theirs = "inc.double_conv" if l == 0 else f"down{l}.maxpool_conv.1.double_conv"
        for u in range(2):
            names += _unit_names(model, f"enc{l}.{u}", f"{theirs}.{3 * u}", f"{theirs}.{3 * u + 1}")
    for l in range(3, -1, -1):
        k = 4 - l
        if not bilinear:
            names += _names(getattr(model, f"up{l}"), f"up{l}", f"up{k}.up")
        for u in range(2):
            names += _unit_names(model, f"dec{l}.{u}", f"up{k}.conv.double_conv.{3 * u}",
                                 f"up{k}.conv.double_conv.{3 * u + 1}")
    names += _names(model.head0, "head0", "outc.conv")
    return _finish(model, names, state_dict)


# ---------------------------------------------------------------------------------------------------
# MONAI BasicUNet
# ---------------------------------------------------------------------------------------------------
def _monai_layer(spec, what):
    """MONAI's ('name', {kwargs}) or 'name' -> (lower-case name, kwargs)."""
    if isinstance(spec, str):
        return spec.lower(), {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        return spec[0].lower(), dict(spec[1])
    raise ValueError(f"from_monai_basicunet: {what} must be 'name' or ('name', {{kwargs}}), got {spec!r}")


def from_monai_basicunet(state_dict, spatial_dims=3, in_channels=1, out_channels=2,
                         features=(32, 32, 64, 128, 256, 32),
                         act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                         norm=("instance", {"affine": True}), bias=True, dropout=0.0, upsample="deconv",
                         dtype=None, backend="numpy"):
    """MONAI's monai.networks.nets.BasicUNet with its own argument names and defaults: five levels
    (features[0..4]) of TwoConv (conv3x3 -> norm -> dropout -> act, twice), max-pool 2 down, UpCat
    (ConvTranspose 2x2 stride 2 halving the channels, except at the top; [skip, up]; TwoConv) and a
    1x1 final_conv from features[5]. upsample='deconv' only."""
    if upsample != "deconv":
        raise ValueError(f"from_monai_basicunet: upsample={upsample!r} is not supported (only 'deconv')")
    fea = list(features)
    if len(fea) != 6:
        raise ValueError(f"from_monai_basicunet: features needs 6 numbers (MONAI's BasicUNet), got {fea}")
    act_name, act_kw = _monai_layer(act, "act")
    if act_name not in ("leakyrelu", "relu"):
        raise ValueError(f"from_monai_basicunet: act {act_name!r} is not supported (LeakyReLU, ReLU)")
    norm_name, norm_kw = _monai_layer(norm, "norm")
    norm_map = {"instance": "instance", "batch": "batch", "group": "group"}
    if norm_name not in norm_map:
        raise ValueError(f"from_monai_basicunet: norm {norm_name!r} is not supported (instance, batch, group)")
    norm_kw.pop("spatial_dims", None)
    if norm_name == "instance":
        norm_kw = {k: v for k, v in norm_kw.items() if k in ("eps", "momentum", "affine", "track_running_stats")}
    drop = float(dropout[1].get("p", 0.0)) if isinstance(dropout, (tuple, list)) else float(dropout or 0.0)
    model = GeneralUNet(in_channels, out_channels, channels=fea[:5],
                        decoder_convs=[[fea[5]] * 2, [fea[1]] * 2, [fea[2]] * 2, [fea[3]] * 2],
                        up_channels=[fea[1], fea[2] // 2, fea[3] // 2, fea[4] // 2], spatial_dims=spatial_dims,
                        downsample="maxpool", upsample="transpose", concat="skip_up", norm=norm_map[norm_name],
                        norm_kwargs=norm_kw, act="leaky_relu" if act_name == "leakyrelu" else "relu",
                        negative_slope=act_kw.get("negative_slope", 0.01), order="CNDA", conv_bias=bool(bias),
                        dropout=drop, module_order="per_level", dtype=_dtype_of(state_dict, dtype),
                        backend=backend)
    names = []
    for l in range(5):
        theirs = "conv_0" if l == 0 else f"down_{l}.convs"
        for u in range(2):
            names += _unit_names(model, f"enc{l}.{u}", f"{theirs}.conv_{u}.conv", f"{theirs}.conv_{u}.adn.N")
    for l in range(3, -1, -1):
        names += _names(getattr(model, f"up{l}"), f"up{l}", f"upcat_{l + 1}.upsample.deconv")
        for u in range(2):
            names += _unit_names(model, f"dec{l}.{u}", f"upcat_{l + 1}.convs.conv_{u}.conv",
                                 f"upcat_{l + 1}.convs.conv_{u}.adn.N")
    names += _names(model.head0, "head0", "final_conv")
    return _finish(model, names, state_dict)


# ---------------------------------------------------------------------------------------------------
# nnU-Net v2 (dynamic_network_architectures) PlainConvUNet
# ---------------------------------------------------------------------------------------------------
def _class_name(value):
    """'torch.nn.modules.conv.Conv2d' (or a class) -> 'Conv2d'; None stays None."""
    if value is None:
        return None
    return (value if isinstance(value, str) else getattr(value, "__name__", str(value))).rsplit(".", 1)[-1]


def from_nnunet(state_dict, architecture, input_channels, num_classes, deep_supervision=False, dtype=None,
                backend="numpy"):
    """nnU-Net v2's network from a plans file's configurations[name]["architecture"] dict
    (network_class_name, arch_kwargs with class names as strings, _kw_requires_import).
    PlainConvUNet only (2-D and 3-D): strided-conv stages (conv -> [dropout] -> norm -> nonlin,
    or nonlin first), transposed-conv decoder concatenating [up, skip], one 1x1 segmentation head per
    decoder stage (deep_supervision=True returns them all, highest resolution first)."""
    if not hasattr(architecture, "get") or "network_class_name" not in architecture:
        raise ValueError("from_nnunet: architecture must be the dict of a plans file's "
                         "configurations[name]['architecture'] (with network_class_name and arch_kwargs)")
    cls = _class_name(architecture["network_class_name"])
    if cls != "PlainConvUNet":
        raise ValueError(f"from_nnunet: architecture {architecture['network_class_name']!r} is not supported "
                         f"(PlainConvUNet is; ResidualEncoderUNet is not yet)")
    kw = dict(architecture.get("arch_kwargs", {}))
    conv = _class_name(kw.get("conv_op"))
    dims = {"Conv2d": 2, "Conv3d": 3}.get(conv)
    if dims is None:
        raise ValueError(f"from_nnunet: conv_op {kw.get('conv_op')!r} is not supported (Conv2d, Conv3d)")
    L = int(kw["n_stages"])
    feats = kw["features_per_stage"]
    feats = [int(feats)] * L if isinstance(feats, (int, np.integer)) else [int(c) for c in feats]
    n_conv = kw["n_conv_per_stage"]
    n_conv = [int(n_conv)] * L if isinstance(n_conv, (int, np.integer)) else [int(c) for c in n_conv]
    n_dec = kw["n_conv_per_stage_decoder"]
    n_dec = [int(n_dec)] * (L - 1) if isinstance(n_dec, (int, np.integer)) else [int(c) for c in n_dec]
    norm_cls = _class_name(kw.get("norm_op"))
    norm = None if norm_cls is None else ("instance" if norm_cls.startswith("InstanceNorm") else
                                          "batch" if norm_cls.startswith("BatchNorm") else
                                          "group" if norm_cls == "GroupNorm" else norm_cls)
    if norm not in (None, "instance", "batch", "group"):
        raise ValueError(f"from_nnunet: norm_op {kw.get('norm_op')!r} is not supported")
    norm_kw = dict(kw.get("norm_op_kwargs") or {})
    if norm == "group" and "num_groups" not in norm_kw:
        raise ValueError("from_nnunet: a GroupNorm norm_op needs num_groups in norm_op_kwargs")
    nonlin = _class_name(kw.get("nonlin"))
    if nonlin not in ("LeakyReLU", "ReLU"):
        raise ValueError(f"from_nnunet: nonlin {kw.get('nonlin')!r} is not supported (LeakyReLU, ReLU)")
    nonlin_kw = dict(kw.get("nonlin_kwargs") or {})
    drop_cls = _class_name(kw.get("dropout_op"))
    drop_p = float((kw.get("dropout_op_kwargs") or {}).get("p", 0.5)) if drop_cls else 0.0
    first = bool(kw.get("nonlin_first", False))
    order = ("CD" if drop_cls else "C") + ("AN" if first else "NA")
    model = GeneralUNet(input_channels, num_classes, channels=feats,
                        encoder_convs=[[c] * k for c, k in zip(feats, n_conv)],
                        decoder_convs=[[feats[l]] * n_dec[L - 2 - l] for l in range(L - 1)],
                        spatial_dims=dims, kernel_sizes=kw["kernel_sizes"], strides=kw["strides"],
                        downsample="conv", upsample="transpose", concat="up_skip", norm=norm,
                        norm_kwargs=norm_kw, act="leaky_relu" if nonlin == "LeakyReLU" else "relu",
                        negative_slope=nonlin_kw.get("negative_slope", 0.01), order=order,
                        conv_bias=bool(kw.get("conv_bias", False)), up_bias=bool(kw.get("conv_bias", False)),
                        dropout=drop_p, dropout_kind="element" if drop_cls == "Dropout" else "channel",
                        heads="all", deep_supervision=deep_supervision, module_order="by_kind",
                        dtype=_dtype_of(state_dict, dtype), backend=backend)
    # all_modules (a Sequential holding the same layers) lists conv, [dropout], norm, nonlin (or
    # nonlin before norm): the norm's index there
    norm_at = 1 + bool(drop_cls) + first

    def unit(ours, theirs):
        own = _unit_names(model, ours, f"{theirs}.conv", f"{theirs}.norm")
        alias = _unit_names(model, ours, f"{theirs}.all_modules.0", f"{theirs}.all_modules.{norm_at}")
        return own + alias

    encoder = []
    for l in range(L):
        for u in range(n_conv[l]):
            encoder += unit(f"enc{l}.{u}", f"encoder.stages.{l}.0.convs.{u}")
    names = encoder + [["decoder." + t, o] for t, o in encoder]     # decoder.encoder is the encoder
    for s in range(L - 1):
        for u in range(n_dec[s]):
            names += unit(f"dec{L - 2 - s}.{u}", f"decoder.stages.{s}.convs.{u}")
    for s in range(L - 1):
        names += _names(getattr(model, f"up{L - 2 - s}"), f"up{L - 2 - s}", f"decoder.transpconvs.{s}")
    for s in range(L - 1):
        names += _names(getattr(model, f"head{L - 2 - s}"), f"head{L - 2 - s}", f"decoder.seg_layers.{s}")
    return _finish(model, names, state_dict)


def state_dict_to_numpy(state_dict):
    """name -> NumPy array for any mapping of tensors or arrays (torch is not imported)."""
    return {k: as_numpy(v) for k, v in state_dict.items()}

"""A general U-Net builder: the encoder-decoder every U-Net variant is an instance of.

    level 0:   enc0 ------------------------------------------------> cat -> dec0 -> head0
    level 1:     down1 -> enc1 -------------------------> cat -> dec1 -> up0 ^    (-> head1)
    ...                                                       ^
    level L-1:          down(L-1) -> enc(L-1) (the bottleneck) -> up(L-2)

Each enc/dec is a stack of *units*, a unit being a convolution followed by optional normalisation,
dropout and an activation in a chosen order ("CNDA": conv, norm, dropout, act, as MONAI; "CDNA" as
nnU-Net). Every choice the field's U-Nets differ in is an argument:

    channels, convs per level    encoder_convs / decoder_convs: per level, the output channels of
                                 each convolution (or channels + convs_per_level for the usual form)
    downsampling                 'maxpool' (a pool of size strides[l] before level l) or 'conv'
                                 (level l's first convolution has stride strides[l])
    upsampling                   'transpose' (kernel = stride = strides[l+1], to up_channels[l]),
                                 'bilinear' / 'trilinear' (no parameters, channels kept; align_corners
                                 either way), 'bilinear_conv' (then a 1x1 convolution)
    concatenation order          'up_skip' or 'skip_up'
    norm                         None, 'batch', 'instance', 'group' (norm_kwargs: eps, momentum,
                                 affine, track_running_stats, num_groups)
    activation                   'relu' or 'leaky_relu' (negative_slope)
    heads                        'last' (one 1x1 head on level 0) or 'all' (one per decoder level;
                                 deep_supervision=True returns them all, highest resolution first)
    module_order                 the order modules (and so parameters()) are registered: 'per_level'
                                 (encoder, then per level bottom up: up, dec; heads last) or 'by_kind'
                                 (encoder, all dec, all up, all heads: nnU-Net's order)
    torch_names                  [[their_name, our_name], ...]: the names of a PyTorch twin's
                                 state_dict (used by torch_state_dict / load_torch_state_dict;
                                 several of theirs may alias one of ours). unet_np.interop fills it.

spatial_dims=3 picks Conv3d, ConvTranspose3d, MaxPool3d, BatchNorm3d, InstanceNorm3d from unet_np.nn
when that version has them. Sizes: every spatial size must be divisible by the product of the strides
along its axis (no padding between up and skip maps).
"""
from collections import OrderedDict

import numpy as np

from .. import backends, nn
from ..nn.module import check_input
from .base import SegmentationModel, register

DOWNSAMPLE = ("maxpool", "conv")
UPSAMPLE = ("transpose", "bilinear", "trilinear", "bilinear_conv")
NORMS = (None, "batch", "instance", "group")
ACTS = ("relu", "leaky_relu")
CONCAT = ("up_skip", "skip_up")


def as_numpy(value):
    """A PyTorch tensor (duck-typed: .detach().cpu()), a backend array or anything array-like -> a
    NumPy array. torch is never imported."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.numpy() if hasattr(value, "numpy") else value
    return np.asarray(backends.to_numpy(value))


def _layer(name, spatial_dims):
    """nn.<name>2d / nn.<name>3d, or a clear error when this version has no such layer."""
    full = f"{name}{spatial_dims}d"
    cls = getattr(nn, full, None)
    if cls is None:
        raise ValueError(f"spatial_dims={spatial_dims} needs unet_np.nn.{full}, which this version "
                         f"of unet_np does not have")
    return cls


def _per_level(name, value, levels, dims):
    """An int / tuple for every level, or a list with one per level -> a list of `dims`-tuples."""
    if isinstance(value, (int, np.integer)):
        return [(int(value),) * dims for _ in range(levels)]
    value = list(value)
    if len(value) == dims and all(isinstance(v, (int, np.integer)) for v in value) and levels != dims:
        return [tuple(int(v) for v in value)] * levels
    if len(value) != levels:
        raise ValueError(f"{name} must be an int, a {dims}-tuple or a list with one per level "
                         f"({levels}), got {value!r}")
    return [(int(v),) * dims if isinstance(v, (int, np.integer)) else tuple(int(a) for a in v)
            for v in value]


@register("unet_builder")
class GeneralUNet(SegmentationModel):
    """A U-Net assembled from the choices listed in the module docstring (unet_np.models.builder).

    in_channels, num_classes; channels: per level (top down) the output channels; convs_per_level:
    an int or one per level (decoder_convs_per_level likewise, default the same); encoder_convs /
    decoder_convs (lists of lists, top down; the decoder has one level fewer) override both.
    kernel_sizes, strides: an int, a tuple per axis, or one per level (strides[0] is level 0's first
    stride, normally 1; an int s means [1, s, s, ...]).
    """

    def __init__(self, in_channels, num_classes, channels=(64, 128, 256, 512, 1024), convs_per_level=2,
                 decoder_convs_per_level=None, encoder_convs=None, decoder_convs=None, up_channels=None,
                 spatial_dims=2, kernel_sizes=3, strides=2, downsample="maxpool", upsample="transpose",
                 align_corners=False, concat="up_skip", norm=None, norm_kwargs=None, act="relu",
                 negative_slope=0.01, order="CNDA", conv_bias=True, up_bias=True, dropout=0.0,
                 dropout_kind="element", dropout_seed=None, heads="last", deep_supervision=False,
                 module_order="per_level", torch_names=None, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        for name, value, choices in (("downsample", downsample, DOWNSAMPLE), ("upsample", upsample, UPSAMPLE),
                                     ("norm", norm, NORMS), ("act", act, ACTS), ("concat", concat, CONCAT),
                                     ("heads", heads, ("last", "all")), ("spatial_dims", spatial_dims, (2, 3)),
                                     ("module_order", module_order, ("per_level", "by_kind")),
                                     ("dropout_kind", dropout_kind, ("element", "channel"))):
            if value not in choices:
                raise ValueError(f"GeneralUNet: {name} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {value!r}")
        if sorted(order) != sorted(set(order)) or not set(order) <= set("CNDA") or not order.startswith("C"):
            raise ValueError(f"GeneralUNet: order must start with 'C' and use each of C, N, D, A at most "
                             f"once, got {order!r}")
        channels = [int(c) for c in channels]
        L = len(channels)
        if L < 2:
            raise ValueError(f"GeneralUNet: channels needs at least 2 levels, got {channels!r}")
        dims = spatial_dims
        cpl = [convs_per_level] * L if isinstance(convs_per_level, (int, np.integer)) else list(convs_per_level)
        dcpl = cpl if decoder_convs_per_level is None else (
            [decoder_convs_per_level] * L if isinstance(decoder_convs_per_level, (int, np.integer))
            else list(decoder_convs_per_level))
        if encoder_convs is None:
            encoder_convs = [[c] * int(k) for c, k in zip(channels, cpl)]
        if decoder_convs is None:
            decoder_convs = [[channels[l]] * int(dcpl[l]) for l in range(L - 1)]
        encoder_convs = [[int(c) for c in lev] for lev in encoder_convs]
        decoder_convs = [[int(c) for c in lev] for lev in decoder_convs]
        if len(encoder_convs) != L or len(decoder_convs) != L - 1 or not all(encoder_convs) or \
                not all(decoder_convs):
            raise ValueError(f"GeneralUNet: encoder_convs needs {L} non-empty levels and decoder_convs "
                             f"{L - 1}, got {encoder_convs!r} and {decoder_convs!r}")
        if isinstance(strides, (int, np.integer)):
            strides = [1] + [int(strides)] * (L - 1)
        strides = _per_level("strides", strides, L, dims)
        kernel_sizes = _per_level("kernel_sizes", kernel_sizes, L, dims)
        out_ch = [lev[-1] for lev in encoder_convs]
        # the map upsampled into level l comes from the bottleneck (l = L-2) or from dec{l+1}
        below = [out_ch[L - 1] if l == L - 2 else decoder_convs[l + 1][-1] for l in range(L - 1)]
        keeps = upsample in ("bilinear", "trilinear")
        if up_channels is None:
            up_channels = [below[l] if keeps else out_ch[l] for l in range(L - 1)]
        up_channels = [int(c) for c in up_channels]
        if keeps and up_channels != below:
            raise ValueError(f"GeneralUNet: upsample={upsample!r} keeps the channels, so up_channels must "
                             f"be {below}, got {up_channels}")
        self._config = dict(in_channels=in_channels, num_classes=num_classes, channels=channels,
                            encoder_convs=encoder_convs, decoder_convs=decoder_convs,
                            up_channels=up_channels, spatial_dims=dims,
                            kernel_sizes=[list(k) for k in kernel_sizes], strides=[list(s) for s in strides],
                            downsample=downsample, upsample=upsample, align_corners=bool(align_corners),
                            concat=concat, norm=norm, norm_kwargs=dict(norm_kwargs or {}), act=act,
                            negative_slope=float(negative_slope), order=order, conv_bias=bool(conv_bias),
                            up_bias=bool(up_bias), dropout=float(dropout), dropout_kind=dropout_kind,
                            dropout_seed=dropout_seed, heads=heads, deep_supervision=bool(deep_supervision),
                            module_order=module_order, init=init,
                            torch_names=None if torch_names is None else [list(p) for p in torch_names])
        self.in_channels, self.num_classes, self.levels, self.spatial_dims = in_channels, num_classes, L, dims
        self.depth = L - 1
        self.pad_input, self._padding = False, None        # SegmentationModel's reflect-padding: off
        self.kernel_sizes, self.strides = kernel_sizes, strides
        self.concat, self.deep_supervision = concat, bool(deep_supervision)
        self.upsample_mode = upsample
        self.torch_names = self._config["torch_names"]
        self.dropout_generator = np.random.default_rng(dropout_seed)
        kw = dict(dtype=dtype, backend=backend)
        Conv = _layer("Conv", dims)

        # -- build every part, then register them in the chosen order -----------------------------
        parts = OrderedDict()
        cin = in_channels
        for l in range(L):
            if l > 0 and downsample == "maxpool":
                parts[f"down{l}"] = _layer("MaxPool", dims)(strides[l], stride=strides[l], backend=backend)
            first_stride = strides[l] if downsample == "conv" else (1,) * dims
            parts[f"enc{l}"] = self._stack(cin, encoder_convs[l], kernel_sizes[l], first_stride)
            cin = out_ch[l]
        ups, decs = OrderedDict(), OrderedDict()
        for l in range(L - 2, -1, -1):
            ups[f"up{l}"] = self._up(below[l], up_channels[l], strides[l + 1], upsample, align_corners, up_bias, init)
            decs[f"dec{l}"] = self._stack(up_channels[l] + out_ch[l], decoder_convs[l], kernel_sizes[l], (1,) * dims)
        heads_ = OrderedDict()
        for l in (range(L - 2, -1, -1) if heads == "all" else [0]):
            heads_[f"head{l}"] = Conv(decoder_convs[l][-1], num_classes, 1, init=init, **kw)
        if module_order == "per_level":
            for l in range(L - 2, -1, -1):
                parts[f"up{l}"], parts[f"dec{l}"] = ups[f"up{l}"], decs[f"dec{l}"]
        else:
            parts.update(decs)
            parts.update(ups)
        parts.update(heads_)
        for name, module in parts.items():
            setattr(self, name, module)
        self.cats = [nn.Concat(axis=1, backend=backend) for _ in range(L - 1)]   # no parameters

    # -- construction helpers --------------------------------------------------------------------
    def _unit(self, cin, cout, kernel, stride):
        """One convolution and its norm / dropout / activation, in ``order`` (a Sequential)."""
        c, dims, kw = self._config, self.spatial_dims, dict(dtype=self.dtype, backend=self.backend.name)
        padding = tuple((k - 1) // 2 for k in kernel)
        layers = {"C": _layer("Conv", dims)(cin, cout, kernel, stride=stride, padding=padding,
                                            bias=c["conv_bias"], init=c["init"], **kw)}
        nk = dict(c["norm_kwargs"])
        if c["norm"] == "batch":
            layers["N"] = _layer("BatchNorm", dims)(cout, **nk, **kw)
        elif c["norm"] == "instance":
            layers["N"] = _layer("InstanceNorm", dims)(cout, **nk, **kw)
        elif c["norm"] == "group":
            layers["N"] = nn.GroupNorm(nk.pop("num_groups", 8), cout, **nk, **kw)
        if c["dropout"] > 0:
            Drop = nn.Dropout if c["dropout_kind"] == "element" else getattr(nn, f"Dropout{dims}d")
            layers["D"] = Drop(c["dropout"], seed=self.dropout_generator, **kw)
        layers["A"] = nn.ReLU(**kw) if c["act"] == "relu" else nn.LeakyReLU(c["negative_slope"], **kw)
        return nn.Sequential(*[layers[k] for k in c["order"] if k in layers])

    def _stack(self, cin, couts, kernel, first_stride):
        units = []
        for i, cout in enumerate(couts):
            units.append(self._unit(cin, cout, kernel, first_stride if i == 0 else (1,) * self.spatial_dims))
            cin = cout
        return nn.Sequential(*units)

    def _up(self, cin, cout, stride, mode, align_corners, bias, init):
        kw = dict(dtype=self.dtype, backend=self.backend.name)
        if mode == "transpose":
            return _layer("ConvTranspose", self.spatial_dims)(cin, cout, stride, stride=stride, bias=bias,
                                                              init=init, **kw)
        interp = "trilinear" if self.spatial_dims == 3 else "bilinear"
        up = nn.Upsample(scale_factor=stride if self.spatial_dims == 2 else tuple(stride), mode=interp,
                         align_corners=align_corners, backend=self.backend.name)
        if mode == "bilinear_conv":
            return nn.Sequential(up, _layer("Conv", self.spatial_dims)(cin, cout, 1, bias=bias, init=init, **kw))
        return up

    # -- sizes and input --------------------------------------------------------------------------
    def total_strides(self):
        """Per axis, the product of the strides: every input size must be a multiple of it."""
        return tuple(int(np.prod([s[a] for s in self.strides])) for a in range(self.spatial_dims))

    def _check_input(self, x):
        x = check_input(type(self).__name__, x, ndim=2 + self.spatial_dims, channels=self.in_channels,
                        xp=self.xp, dtype=self.dtype)
        self.check_size(x.shape[2:])
        return x

    def check_size(self, spatial):
        total = self.total_strides()
        bad = [(s, m) for s, m in zip(spatial, total) if s % m]
        if bad:
            s, m = bad[0]
            raise ValueError(f"GeneralUNet: input size {tuple(spatial)} does not fit: each axis must be "
                             f"a multiple of the product of the strides {total}; {s} is not a multiple "
                             f"of {m} (nearest: {max(m, s // m * m)} or {(s // m + 1) * m})")

    def output_shape(self, spatial):
        self.check_size(spatial)
        return tuple(int(s) for s in spatial)

    def first_conv(self):
        return self.enc0[0][0]

    # -- forward / backward ------------------------------------------------------------------
    def _cat(self, l, up, skip):
        return self.cats[l].forward(up, skip) if self.concat == "up_skip" else self.cats[l].forward(skip, up)

    def _forward(self, x):
        # x: (N, C_in, *S) -> logits (N, num_classes, *S), or a list of them (deep supervision)
        L, skips, h = self.levels, [], x
        for l in range(L):
            if hasattr(self, f"down{l}"):
                h = getattr(self, f"down{l}").forward(h)
            h = getattr(self, f"enc{l}").forward(h)
            skips.append(h)
        outs = {}
        for l in range(L - 2, -1, -1):
            h = getattr(self, f"up{l}").forward(h)                 # (N, up_channels[l], *S_l)
            h = getattr(self, f"dec{l}").forward(self._cat(l, h, skips[l]))
            if self.deep_supervision and hasattr(self, f"head{l}") or l == 0:
                outs[l] = getattr(self, f"head{l}").forward(h)
        if self.deep_supervision and hasattr(self, "head1"):
            return [outs[l] for l in sorted(outs)]
        return outs[0]

    def _backward(self, dlogits):
        """dlogits: one array, or with deep supervision a list (highest resolution first)."""
        L = self.levels
        multi = self.deep_supervision and hasattr(self, "head1")
        if multi:
            if not isinstance(dlogits, (list, tuple)) or len(dlogits) != L - 1:
                raise ValueError(f"GeneralUNet: with deep supervision backward takes a list of {L - 1} "
                                 f"gradients (highest resolution first)")
            grads = dict(enumerate(dlogits))
        else:
            grads = {0: dlogits}
        dskips = [None] * L
        d = None
        for l in range(L - 1):
            dh = getattr(self, f"head{l}").backward(grads[l]) if l in grads else None
            d = dh if d is None else (d if dh is None else d + dh)
            d = getattr(self, f"dec{l}").backward(d)
            a, b = self.cats[l].backward(d)
            d, dskips[l] = (a, b) if self.concat == "up_skip" else (b, a)
            d = getattr(self, f"up{l}").backward(d)
        for l in range(L - 1, -1, -1):
            if dskips[l] is not None:
                d = d + dskips[l]
            d = getattr(self, f"enc{l}").backward(d)
            if hasattr(self, f"down{l}"):
                d = getattr(self, f"down{l}").backward(d)
        return d

    # -- PyTorch names ---------------------------------------------------------------------------
    def set_torch_names(self, names):
        """Name this model's state entries as a PyTorch twin does: names is [[theirs, ours], ...] in
        the twin's state_dict order (several of theirs may name one of ours); kept in the config, so
        a saved model keeps it. Every ``ours`` must be an entry of state_dict()."""
        ours = self.state_dict()
        names = [[str(t), str(o)] for t, o in names]
        unknown = [o for _, o in names if o not in ours]
        if unknown:
            raise ValueError(f"set_torch_names: ours {unknown[0]!r} is not an entry of this model")
        self.torch_names = self._config["torch_names"] = names
        return self

    def torch_state_dict(self):
        """name -> NumPy array under the PyTorch twin's names (torch_names), every alias included, so
        the twin's load_state_dict(strict=True) takes it; our own names when torch_names is None."""
        ours = self.state_dict()
        if self.torch_names is None:
            return ours
        return OrderedDict((theirs, ours[mine]) for theirs, mine in self.torch_names)

    def load_torch_state_dict(self, state_dict):
        """Take the twin's state_dict by NAME (torch_names); a missing or unexpected entry, or a shape
        that does not fit, raises ValueError naming the entry on both sides. Nothing changes unless
        every entry fits. Without torch_names: entry by entry in order, as the other models."""
        if self.torch_names is None:
            return super().load_torch_state_dict(state_dict)
        if not hasattr(state_dict, "items"):
            raise TypeError(f"load_torch_state_dict expects a mapping, got {type(state_dict).__name__}")
        ours = self.state_dict()
        known = {theirs for theirs, _ in self.torch_names}
        extra = [k for k in state_dict.keys() if k not in known]
        if extra:
            raise ValueError(f"state_dict has an entry this architecture does not have: theirs {extra[0]!r} "
                             f"(and {len(extra) - 1} more)" if len(extra) > 1 else
                             f"state_dict has an entry this architecture does not have: theirs {extra[0]!r}")
        staged = {}
        for theirs, mine in self.torch_names:
            if theirs not in state_dict:
                raise ValueError(f"state_dict is missing theirs {theirs!r} (ours {mine!r}, shape "
                                 f"{tuple(ours[mine].shape)})")
            value = as_numpy(state_dict[theirs])
            if tuple(value.shape) != tuple(ours[mine].shape):
                raise ValueError(f"state_dict entry theirs {theirs!r} has shape {tuple(value.shape)}, but "
                                 f"ours {mine!r} needs {tuple(ours[mine].shape)}")
            staged.setdefault(mine, value)
        self.load_state_dict(staged)
        return self

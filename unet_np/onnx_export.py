"""ONNX export of the segmentation models: ``export_onnx(model, path, opset=17)``.

The graph is built with the ``onnx`` package's helper API, walking the model's own modules in the
order its ``_forward`` visits them (nothing is traced, nothing is run):

    Conv2d / 3d      -> Conv (pads from the layer, so 'same' with an odd total and 'valid' both fit)
    ConvTranspose2d / 3d -> ConvTranspose (PyTorch's weight layout is ONNX's: (C_in, C_out, kh, kw))
    MaxPool2d / 3d   -> MaxPool (floor mode; padding counts as -inf in both)
    ReLU / Sigmoid   -> Relu / Sigmoid;  LeakyReLU -> LeakyRelu (PRelu in float64);  Dropout -> nothing
    BatchNorm2d / 3d -> BatchNormalization with the running statistics (inference)
    InstanceNorm2d / 3d -> InstanceNormalization (with track_running_stats: BatchNormalization with
                        the running statistics, as the layer does in evaluation; in a float64 graph
                        ReduceMean arithmetic, since an epsilon attribute is a float32)
    GroupNorm        -> Reshape (N, G, -1), InstanceNormalization, Reshape back, Mul, Add (runs at
                        every opset; ONNX's GroupNormalization needs 18 and changed meaning at 21)
    Upsample         -> Resize (bilinear / trilinear: linear, half_pixel for align_corners=False,
                        align_corners for True; nearest: asymmetric, floor)
    Concat           -> Concat
    CenterCrop       -> Shape / Sub / Div / Add / Slice: the crop offsets follow the tensor sizes
    AttentionGate    -> its convolutions, Resize, Add, Relu, Sigmoid, Mul
    pad_input        -> Shape / Mod arithmetic, Pad(mode=reflect), and a Slice of the logits

GeneralUNet (unet_np.models.builder, the models unet_np.interop brings from milesial, MONAI and
nnU-Net) exports as its forward runs: max-pool or strided-conv downsampling, transposed-conv or
Resize upsampling, Concat in the model's order ([up, skip] or [skip, up]), and the level-0 head
only (with deep supervision, the other heads are training outputs: inference uses the first).

The batch and spatial dimensions are symbolic ('N', 'H', 'W'; 'N', 'D', 'H', 'W' for a model built
with spatial_dims=3, whose graph is the same with every 2-D operator in its 3-D form: ONNX's Conv,
MaxPool, Resize and friends take any number of spatial axes), so one file takes any batch size and
any input size the model itself accepts. The tensors are float32 by default, whatever the model's
dtype (ONNX Runtime's CPU kernels for Conv, ConvTranspose and Resize exist for float32 only);
``dtype='float64'`` keeps a float64 model's precision for a reference evaluator (onnx.reference). UNet++ exports its inference output, X[0][L] with L the pruned
level (``model.prune(L)``); the graph is always the evaluation-mode network.

``onnx`` is needed only here: ``pip install onnx`` (the ``[onnx]`` extra; in a checkout
``pip install '.[onnx]'``).
"""
import os
import tempfile

import numpy as np

from . import backends

__all__ = ["export_onnx", "build_onnx"]

DEFAULT_OPSET = 17
MIN_OPSET = 13


def _require_onnx():
    try:
        import onnx
        import onnx.checker  # noqa: F401 -- the submodules used below
        import onnx.helper  # noqa: F401
        import onnx.numpy_helper  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the 'onnx' package: pip install onnx (the "
                          "unet-np[onnx] extra; in a checkout: pip install '.[onnx]')") from None
    return onnx


class _Graph:
    """Collects nodes and initializers; hands out unique tensor names."""

    def __init__(self, onnx, dtype, opset, dims=2):
        self.onnx = onnx
        self.dims = dims                 # spatial axes: 2 (N, C, H, W) or 3 (N, C, D, H, W)
        self.helper = onnx.helper
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes, self.inits = [], []
        self._names = set()
        self._consts = {}

    def name(self, base):
        base = base.replace("/", ".")
        n, k = base, 1
        while n in self._names:
            k += 1
            n = f"{base}_{k}"
        self._names.add(n)
        return n

    def node(self, op, inputs, base, **attrs):
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def init(self, array, base, dtype=None):
        array = np.asarray(backends.to_numpy(array))
        array = array.astype(dtype if dtype is not None else self.dtype)
        n = self.name(base)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), n))
        return n

    def const_i64(self, values):
        """An int64 1-D constant (shared between the nodes that use the same values)."""
        key = tuple(int(v) for v in values)
        if key not in self._consts:
            self._consts[key] = self.init(np.array(key, dtype=np.int64),
                                          "const_" + "_".join(str(v).replace("-", "m") for v in key),
                                          dtype=np.int64)
        return self._consts[key]

    def spatial_shape(self, x, base):
        """int64 (2,) or (3,): the (H, W) or (D, H, W) of tensor x, computed in the graph."""
        end = 2 + self.dims
        if self.opset >= 15:
            return self.node("Shape", [x], base + ".hw", start=2, end=end)
        shape = self.node("Shape", [x], base + ".shape")
        return self.node("Slice", [shape, self.const_i64([2]), self.const_i64([end]),
                                   self.const_i64([0])], base + ".hw")

    def per_axis(self, value):
        """An int64 constant holding value once per spatial axis."""
        return self.const_i64([value] * self.dims)

    def spatial_axes(self):
        """An int64 constant listing the spatial axes: [2, 3] or [2, 3, 4]."""
        return self.const_i64(range(2, 2 + self.dims))


# -- leaf modules ---------------------------------------------------------------------------------
def _emit(g, m, x, name):
    """Emit the nodes of module m (named ``name`` in the model) applied to tensor x; returns the
    output tensor's name."""
    from .nn import (BatchNorm2d, Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d, Dropout,
                     GroupNorm, InstanceNorm2d, LeakyReLU, MaxPool2d, MaxPool3d, ReLU, Sequential,
                     Sigmoid, Upsample)
    from .models.base import Block
    if isinstance(m, (Sequential,)):
        for child_name, child in m._modules.items():
            x = _emit(g, child, x, f"{name}.{child_name}")
        return x
    if isinstance(m, Block):
        return _emit(g, m.conv, x, f"{name}.conv")
    # ONNX pads list every axis's start, then every axis's end: [top, left, bottom, right] in 2-D,
    # [front, top, left, back, bottom, right] in 3-D
    if isinstance(m, (Conv2d, Conv3d)):
        pads = [b for b, _ in m._pads] + [a for _, a in m._pads]
        ins = [x, g.init(m.weight.data, f"{name}.weight")]
        if m.bias is not None:
            ins.append(g.init(m.bias.data, f"{name}.bias"))
        return g.node("Conv", ins, name, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                      dilations=list(m.dilation), pads=pads, group=1)
    if isinstance(m, (ConvTranspose2d, ConvTranspose3d)):
        ins = [x, g.init(m.weight.data, f"{name}.weight")]
        if m.bias is not None:
            ins.append(g.init(m.bias.data, f"{name}.bias"))
        return g.node("ConvTranspose", ins, name, kernel_shape=list(m.kernel_size),
                      strides=list(m.stride), dilations=list(m.dilation),
                      pads=list(m.padding) * 2, output_padding=list(m.output_padding), group=1)
    if isinstance(m, (MaxPool2d, MaxPool3d)):
        return g.node("MaxPool", [x], name, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                      pads=list(m.padding) * 2, ceil_mode=0)
    if isinstance(m, ReLU):
        return g.node("Relu", [x], name)
    if isinstance(m, Sigmoid):
        return g.node("Sigmoid", [x], name)
    if isinstance(m, LeakyReLU):
        if g.dtype == np.float64:          # the alpha attribute is a float32: a slope tensor keeps it
            return g.node("PRelu", [x, g.init(np.array([m.negative_slope]), f"{name}.slope")], name)
        return g.node("LeakyRelu", [x], name, alpha=float(m.negative_slope))
    if isinstance(m, Dropout):                   # Dropout2d / 3d too: the identity at inference
        return x
    if isinstance(m, BatchNorm2d):
        return _emit_batchnorm(g, m, x, name)
    if isinstance(m, InstanceNorm2d):
        return _emit_instancenorm(g, m, x, name)
    if isinstance(m, GroupNorm):
        return _emit_groupnorm(g, m, x, name)
    if isinstance(m, Upsample):
        return _resize(g, x, m.scale_factor, m.mode, name, getattr(m, "align_corners", False))
    raise NotImplementedError(f"ONNX export: no rule for module {type(m).__name__} ({name!r})")


def _resize(g, x, scale, mode, name, align_corners=False):
    scales = g.init(np.array([1.0, 1.0, *scale], dtype=np.float32), f"{name}.scales",
                    dtype=np.float32)                 # one factor per axis, N and C kept
    if mode in ("bilinear", "trilinear"):
        # align_corners=False is ONNX's half_pixel (pytorch_half_pixel differs only for an output
        # of size 1, which an integer factor >= 1 on a non-empty input never makes unless s = 1).
        # ONNX's "linear" interpolates along every resized axis: bilinear in 2-D, trilinear in 3-D.
        return g.node("Resize", [x, "", scales], name, mode="linear",
                      coordinate_transformation_mode="align_corners" if align_corners
                      else "half_pixel")
    return g.node("Resize", [x, "", scales], name, mode="nearest",
                  coordinate_transformation_mode="asymmetric", nearest_mode="floor")


def _standardise(g, x, axes, eps, name):
    """(x - mean) / sqrt(var + eps) over ``axes`` (biased variance) from ReduceMean, Sub, Mul, Sqrt,
    Div: eps is a tensor of the graph's dtype (an operator's epsilon attribute is a float32, which
    moves a float64 result by about 1e-13 / var)."""
    def reduce_mean(t, base):
        if g.opset >= 18:
            return g.node("ReduceMean", [t, g.const_i64(axes)], base, keepdims=1)
        return g.node("ReduceMean", [t], base, axes=list(axes), keepdims=1)
    mu = reduce_mean(x, f"{name}.mean")
    xc = g.node("Sub", [x, mu], f"{name}.centred")
    var = reduce_mean(g.node("Mul", [xc, xc], f"{name}.sq"), f"{name}.var")
    eps = g.init(np.array(eps), f"{name}.eps")
    std = g.node("Sqrt", [g.node("Add", [var, eps], f"{name}.var_eps")], f"{name}.std")
    return g.node("Div", [xc, std], f"{name}.xhat")


def _scale_shift(g, y, gamma, beta, name):
    """y * gamma[c] + beta[c], broadcast over N and the spatial axes."""
    shape = (1, len(gamma)) + (1,) * g.dims
    y = g.node("Mul", [y, g.init(np.asarray(gamma).reshape(shape), f"{name}.weight")], f"{name}.scaled")
    return g.node("Add", [y, g.init(np.asarray(beta).reshape(shape), f"{name}.bias")], name)


def _affine(m, C):
    """(gamma, beta) as NumPy arrays of length C: the layer's, or ones and zeros without affine."""
    if m.affine:
        return (np.asarray(backends.to_numpy(m.weight.data)), np.asarray(backends.to_numpy(m.bias.data)))
    return np.ones(C), np.zeros(C)


def _running_norm(g, m, x, name):
    """A norm layer in evaluation with running statistics: BatchNormalization."""
    gamma, beta = _affine(m, m.num_features)
    ins = [x, g.init(gamma, f"{name}.weight"), g.init(beta, f"{name}.bias"),
           g.init(m.running_mean, f"{name}.running_mean"), g.init(m.running_var, f"{name}.running_var")]
    return g.node("BatchNormalization", ins, name, epsilon=float(m.eps))


def _emit_batchnorm(g, m, x, name):
    if m.track_running_stats:
        return _running_norm(g, m, x, name)
    # No running statistics: even at inference the layer normalises with the batch's own
    # (biased) statistics over (N, H, W) (or (N, D, H, W)).
    xhat = _standardise(g, x, [0] + list(range(2, 2 + g.dims)), m.eps, name)
    return _scale_shift(g, xhat, *_affine(m, m.num_features), name)


def _emit_instancenorm(g, m, x, name):
    """InstanceNorm2d / 3d. Its own statistics per (sample, channel): ONNX InstanceNormalization
    (scale and B are ones / zeros without affine); a float64 graph standardises with ReduceMean
    instead, eps then being a float64 tensor. With track_running_stats, evaluation normalises with
    the running statistics, a per-channel affine map: BatchNormalization, as BatchNorm2d."""
    if m.track_running_stats:
        return _running_norm(g, m, x, name)
    gamma, beta = _affine(m, m.num_features)
    if g.dtype == np.float64:
        return _scale_shift(g, _standardise(g, x, list(range(2, 2 + g.dims)), m.eps, name), gamma, beta,
                            name)
    return g.node("InstanceNormalization", [x, g.init(gamma, f"{name}.weight"),
                                            g.init(beta, f"{name}.bias")], name, epsilon=float(m.eps))


def _emit_groupnorm(g, m, x, name):
    """GroupNorm, decomposed so that it runs at every opset from 13 (ONNX's own GroupNormalization
    needs opset 18, and its scale and bias were per group until opset 21 made them per channel):
    x (N, C, *S) -> Reshape (N, G, C/G * L) -> InstanceNormalization (scale 1, bias 0: each (n, g)
    by its own mean and biased variance, as GroupNorm; in a float64 graph ReduceMean arithmetic) ->
    Reshape back to x's shape -> * weight[c] + bias[c]."""
    G = m.num_groups
    grouped = g.node("Reshape", [x, g.const_i64([0, G, -1])], f"{name}.grouped")
    if g.dtype == np.float64:
        xhat = _standardise(g, grouped, [2], m.eps, f"{name}.norm")
    else:
        xhat = g.node("InstanceNormalization", [grouped, g.init(np.ones(G), f"{name}.ones"),
                                                g.init(np.zeros(G), f"{name}.zeros")],
                      f"{name}.norm", epsilon=float(m.eps))
    y = g.node("Reshape", [xhat, g.node("Shape", [x], f"{name}.shape")], f"{name}.ungrouped")
    if not m.affine:
        return y
    return _scale_shift(g, y, *_affine(m, m.num_channels), name)


def _center_crop(g, x, like, name):
    """Crop x (N, C, H, W) to the spatial size of tensor ``like``, offsets ((H - h)//2, (W - w)//2)
    (and (D - d)//2 for a volume)."""
    big = g.spatial_shape(x, f"{name}.in")
    small = g.spatial_shape(like, f"{name}.to")
    diff = g.node("Sub", [big, small], f"{name}.diff")
    start = g.node("Div", [diff, g.per_axis(2)], f"{name}.start")  # non-negative: floor
    end = g.node("Add", [start, small], f"{name}.end")
    return g.node("Slice", [x, start, end, g.spatial_axes()], name)


def _gate(g, gate, x, gsig, name):
    """AttentionGate: alpha = sigmoid(psi(relu(theta(x) + up(phi(g))))), out = alpha * x."""
    t = _emit(g, gate.theta, x, f"{name}.theta")
    p = _emit(g, gate.up, _emit(g, gate.phi, gsig, f"{name}.phi"), f"{name}.up")
    q = g.node("Relu", [g.node("Add", [t, p], f"{name}.sum")], f"{name}.relu")
    alpha = g.node("Sigmoid", [_emit(g, gate.psi, q, f"{name}.psi")], f"{name}.alpha")
    return g.node("Mul", [alpha, x], name)


# -- pad_input -------------------------------------------------------------------------------------
def _pad_input(g, model, x):
    """Reflect-pad H and W (and D) up to a multiple of 2**depth (top/left get the smaller half),
    computed from the input's shape in the graph. Returns (padded tensor, (top-left offsets,
    (H, W)))."""
    m = 2 ** model.depth
    hw = g.spatial_shape(x, "pad_input")
    rem = g.node("Mod", [hw, g.per_axis(m)], "pad_input.rem")
    total = g.node("Mod", [g.node("Sub", [g.per_axis(m), rem], "pad_input.short"),
                           g.per_axis(m)], "pad_input.total")
    first = g.node("Div", [total, g.per_axis(2)], "pad_input.first")
    second = g.node("Sub", [total, first], "pad_input.second")
    zeros = g.const_i64([0, 0])                        # N and C are not padded
    pads = g.node("Concat", [zeros, first, zeros, second], "pad_input.pads", axis=0)
    y = g.node("Pad", [x, pads], "pad_input", mode="reflect")
    return y, (first, hw)


def _unpad_output(g, logits, crop):
    first, hw = crop
    end = g.node("Add", [first, hw], "crop_output.end")
    return g.node("Slice", [logits, first, end, g.spatial_axes()], "crop_output")


# -- the models ------------------------------------------------------------------------------------
def _unet(g, model, h):
    skips = []
    for i in range(1, model.depth + 1):
        h = _emit(g, getattr(model, f"enc{i}"), h, f"enc{i}")
        skips.append(h)
        h = _emit(g, getattr(model, f"pool{i}"), h, f"pool{i}")
    h = _emit(g, model.bottleneck, h, "bottleneck")
    for i in range(model.depth, 0, -1):
        h = _emit(g, getattr(model, f"up{i}"), h, f"up{i}")
        if model.skip:
            s = skips[i - 1]
            if model.padding == "valid":
                s = _center_crop(g, s, h, f"crop{i}")
            h = g.node("Concat", [h, s], f"cat{i}", axis=1)
        h = _emit(g, getattr(model, f"dec{i}"), h, f"dec{i}")
    return _emit(g, model.final, h, "final")


def _unet_plus_plus(g, model, h):
    X = {}
    L = model.level
    for j in range(L + 1):
        for i in range(L + 1 - j):
            if j == 0:
                src = h if i == 0 else _emit(g, getattr(model, f"pool{i - 1}"), X[i - 1, 0], f"pool{i - 1}")
                X[i, 0] = _emit(g, getattr(model, f"x{i}_0"), src, f"x{i}_0")
            else:
                up = _emit(g, getattr(model, f"up{i}_{j}"), X[i + 1, j - 1], f"up{i}_{j}")
                cat = g.node("Concat", [up] + [X[i, k] for k in range(j)], f"cat{i}_{j}", axis=1)
                X[i, j] = _emit(g, getattr(model, f"x{i}_{j}"), cat, f"x{i}_{j}")
    return _emit(g, getattr(model, f"final{L}"), X[0, L], f"final{L}")


def _attention_unet(g, model, h):
    skips = []
    for i in range(1, model.depth + 1):
        h = _emit(g, getattr(model, f"enc{i}"), h, f"enc{i}")
        skips.append(h)
        h = _emit(g, getattr(model, f"pool{i}"), h, f"pool{i}")
    h = _emit(g, model.bottleneck, h, "bottleneck")
    for i in range(model.depth, 0, -1):
        gated = _gate(g, getattr(model, f"gate{i}"), skips[i - 1], h, f"gate{i}")
        u = _emit(g, getattr(model, f"up{i}"), h, f"up{i}")
        h = g.node("Concat", [u, gated], f"cat{i}", axis=1)
        h = _emit(g, getattr(model, f"dec{i}"), h, f"dec{i}")
    return _emit(g, model.final, h, "final")


def _general_unet(g, model, h):
    """GeneralUNet (unet_np.models.builder; what unet_np.interop builds): per level an optional
    max-pool, the encoder stack (its first convolution strided when downsample='conv'); per decoder
    level from the bottom up the up-sampling (transposed convolution, Resize, or Resize then a 1x1
    convolution), the concatenation in the model's order and the decoder stack; the head of level 0
    (the highest-resolution output, what inference uses: deep-supervision heads are left out)."""
    skips = []
    for l in range(model.levels):
        if hasattr(model, f"down{l}"):
            h = _emit(g, getattr(model, f"down{l}"), h, f"down{l}")
        h = _emit(g, getattr(model, f"enc{l}"), h, f"enc{l}")
        skips.append(h)
    for l in range(model.levels - 2, -1, -1):
        h = _emit(g, getattr(model, f"up{l}"), h, f"up{l}")
        pair = [h, skips[l]] if model.concat == "up_skip" else [skips[l], h]
        h = g.node("Concat", pair, f"cat{l}", axis=1)
        h = _emit(g, getattr(model, f"dec{l}"), h, f"dec{l}")
    return _emit(g, model.head0, h, "head0")


def _body(model):
    from .models import AttentionUNet, UNet, UNetPlusPlus
    from .models.builder import GeneralUNet
    if isinstance(model, GeneralUNet):
        return _general_unet
    if isinstance(model, UNetPlusPlus):
        return _unet_plus_plus
    if isinstance(model, AttentionUNet):
        return _attention_unet
    if isinstance(model, UNet):
        return _unet
    raise TypeError(f"export_onnx: expected a UNet, UNetPlusPlus, AttentionUNet or GeneralUNet, "
                    f"got {type(model).__name__}")


def build_onnx(model, opset=DEFAULT_OPSET, dtype="float32", input_name="input", output_name="logits"):
    """The ONNX ModelProto of ``model`` in evaluation mode (checked with onnx.checker)."""
    onnx = _require_onnx()
    body = _body(model)
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    opset = int(opset)
    dt = np.dtype(model.dtype if dtype is None else dtype)           # None: the model's own
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"export_onnx: dtype must be float32 or float64, got {dt}")
    dims = int(getattr(model, "spatial_dims", 2))
    g = _Graph(onnx, dt, opset, dims)
    g._names.update({input_name, output_name})
    h = input_name
    crop = None
    if getattr(model, "pad_input", False):
        h, crop = _pad_input(g, model, h)
    logits = body(g, model, h)
    if crop is not None:
        logits = _unpad_output(g, logits, crop)
    g.nodes.append(g.helper.make_node("Identity", [logits], [output_name], name=output_name))
    elem = onnx.helper.np_dtype_to_tensor_dtype(dt)
    in_hw = ("H", "W") if dims == 2 else ("D", "H", "W")
    out_hw = in_hw if getattr(model, "padding", "same") == "same" else tuple(f"{a}_out" for a in in_hw)
    inp = onnx.helper.make_tensor_value_info(input_name, elem, ["N", model.in_channels, *in_hw])
    out = onnx.helper.make_tensor_value_info(output_name, elem, ["N", model.num_classes, *out_hw])
    graph = onnx.helper.make_graph(g.nodes, f"unet_np.{type(model).__name__}", [inp], [out],
                                   initializer=g.inits)
    opsets = [onnx.helper.make_opsetid("", opset)]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, producer_name="unet_np",
                                   doc_string=f"unet_np {type(model).__name__} config: "
                                              f"{model.config() if hasattr(model, 'config') else {}}")
    proto.ir_version = onnx.helper.find_min_ir_version_for(opsets)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, opset=DEFAULT_OPSET, dtype="float32"):
    """Write ``model`` (UNet, UNetPlusPlus, AttentionUNet or GeneralUNet) as an ONNX file at
    ``path``, atomically (a temporary file in the same folder, then os.replace). Batch and spatial
    dims are dynamic. dtype: the graph's float type, float32 by default whatever the model's (ONNX
    Runtime's CPU Conv, ConvTranspose and Resize exist for float32 only); 'float64' (or None: the
    model's dtype) writes a graph that only a reference evaluator such as onnx.reference runs.
    Returns the path. See the module docstring for the operator mapping."""
    proto = build_onnx(model, opset=opset, dtype=dtype)
    data = proto.SerializeToString()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path

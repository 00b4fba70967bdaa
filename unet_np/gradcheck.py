"""Central finite differences against a module's hand-written backward: the learner's check.

For a module f and a fixed random upstream gradient g, the scalar L = sum(f(x) * g) has
dL/dx = backward(g). Each entry of x (and of every parameter) is nudged by +-eps and
(L(x + eps) - L(x - eps)) / (2 eps) is compared with the analytic value. The error reported for an
array is max|analytic - numeric| / max(max|numeric|, 1e-8): a relative error over the whole array,
so one entry near zero does not blow it up. In float64 with eps=1e-6 it is typically below 1e-7.

float64 only. A float32 module is refused with a ValueError rather than upcast: float32 keeps about
7 significant digits, so a difference quotient with eps = 1e-6 carries a rounding error of order
1e-7 / 1e-6 = 0.1 of the value it estimates (a float32 Conv2d(2, 3, 3, padding=1) on 2x2x5x5 inputs
measured 7e-2 to 1.7e-1 on its input and 1e-3 to 2e-2 on its parameters, over three seeds), which
says nothing about the backward. Upcasting the module for the user would mean checking a copy with other
parameter arrays, not the module given, so the caller converts it (``dtype=np.float64`` at
construction). Input arrays are different: they are data, converted to float64 exactly (every
float32 value is a float64 value), so float32 inputs are accepted and upcast.

``layer_cases()`` lists one or more small named cases for every layer and loss in ``unet_np.nn``
and for the attention gate (the ``unet-np gradcheck`` command's list); ``check_case`` runs one
against finite differences and, given the ``torch`` module, against PyTorch. This module never
imports torch itself.
"""
from collections import OrderedDict

import numpy as np

from .backends import to_numpy

__all__ = ["gradcheck", "relative_error", "Case", "layer_cases", "check_case"]


def _numeric(f, arr, eps):
    """d f() / d arr by central differences, arr modified in place and restored."""
    grad = np.zeros(arr.shape, dtype=np.float64)
    flat = arr.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f()
        flat[i] = old - eps
        minus = f()
        flat[i] = old
        grad.reshape(-1)[i] = (plus - minus) / (2 * eps)
    return grad


def relative_error(analytic, numeric):
    """max|analytic - numeric| / max(max|numeric|, 1e-8), in float64."""
    analytic = to_numpy(analytic).astype(np.float64)
    numeric = to_numpy(numeric).astype(np.float64)
    scale = max(float(np.max(np.abs(numeric))), 1e-8)
    return float(np.max(np.abs(analytic - numeric)) / scale)


_rel = relative_error          # the older private name, still imported by the command


def _refuse_float32(module, arrays, what):
    """ValueError when the module holds or computes anything below float64 (see the module
    docstring). what: 'holds its parameters', 'computed its output', ..."""
    for a in arrays:
        dt = np.dtype(getattr(a, "dtype", np.float64))
        if dt != np.float64:
            raise ValueError(
                f"gradcheck needs a float64 module: {type(module).__name__} {what} in {dt}, and a "
                f"finite-difference check in {dt} measures rounding, not the backward (a float32 "
                f"Conv2d measured errors up to 1.7e-1). Build the module with dtype=np.float64.")


def gradcheck(module, x, target=None, eps=1e-6, seed=0, **loss_kwargs):
    """Worst relative error of ``module``'s backward against finite differences.

    module: a layer (``forward(x)`` or ``forward(*xs)``), or a loss (``forward(logits, target)``,
    pass ``target=``). x: an array, or a tuple of arrays for multi-input layers. The module must
    compute in float64 (ValueError otherwise, see the module docstring); x is converted to float64.
    Use tiny shapes: every entry costs two forwards.
    Returns {'input' (or 'input0', 'input1', ...): err, '<parameter name>': err, ...}.
    """
    xs = [np.array(to_numpy(a), dtype=np.float64) for a in (x if isinstance(x, tuple) else (x,))]
    is_loss = target is not None
    rng = np.random.default_rng(seed)
    params = list(module.named_parameters())
    for name, p in params:
        if not isinstance(p.data, np.ndarray):
            raise TypeError("gradcheck runs on the numpy backend; move the module with .to('numpy')")
    _refuse_float32(module, [p.data for _, p in params], "holds its parameters")

    if is_loss:
        def run():
            return float(to_numpy(module.forward(xs[0], target, **loss_kwargs)))
        run()
        grads_in = [module.backward()]
        _refuse_float32(module, grads_in, "computed its gradient")
    else:
        y = module.forward(*xs)
        outs = y if isinstance(y, tuple) else (y,)
        _refuse_float32(module, outs, "computed its output")
        gs = [rng.standard_normal(to_numpy(o).shape) for o in outs]

        def run():
            out = module.forward(*xs)
            out = out if isinstance(out, tuple) else (out,)
            return float(sum(np.sum(to_numpy(o).astype(np.float64) * g) for o, g in zip(out, gs)))
        module.zero_grad()
        module.forward(*xs)
        back = module.backward(gs[0] if len(gs) == 1 else tuple(gs))
        grads_in = list(back) if isinstance(back, tuple) else [back]

    report = {}
    for i, (a, g) in enumerate(zip(xs, grads_in)):
        report["input" if len(xs) == 1 else f"input{i}"] = relative_error(g, _numeric(run, a, eps))
    for name, p in params:
        analytic = np.array(to_numpy(p.grad), dtype=np.float64)
        report[name] = relative_error(analytic, _numeric(run, p.data, eps))
    return report


# ---------------------------------------------------------------------------------------------------
# The list of cases: every layer and loss, tiny shapes, float64
# ---------------------------------------------------------------------------------------------------
class Case:
    """One gradient check: ``make()`` builds a fresh float64 module with fixed parameters, ``inputs``
    is a tuple of float64 arrays, ``target`` and ``loss_kwargs`` are given for a loss.
    ``torch_fn(torch, xs, params)`` computes the same output with PyTorch (xs: tensors, params:
    name -> tensor, as ``named_parameters``), or is None where there is no PyTorch counterpart."""

    def __init__(self, name, make, inputs, torch_fn=None, target=None, loss_kwargs=None):
        self.name, self.make, self.inputs, self.torch_fn = name, make, tuple(inputs), torch_fn
        self.target, self.loss_kwargs = target, dict(loss_kwargs or {})

    @property
    def is_loss(self):
        return self.target is not None

    def __repr__(self):
        return f"Case({self.name!r})"


def _fixed(module, seed):
    """The module with every parameter redrawn from its own generator (U(-b, b), b = 1/sqrt(fan-in)),
    so a case is reproducible without touching unet_np.seed's global generator."""
    rng = np.random.default_rng(seed)
    for _, p in module.named_parameters():
        fan_in = max(1, p.data.size // p.data.shape[0]) if p.data.ndim > 1 else 1
        bound = 1.0 / np.sqrt(fan_in)
        p.data[...] = rng.uniform(-bound, bound, p.data.shape)
    return module


def _conv(t, xs, p, prefix="", **kw):
    return t.nn.functional.conv2d(xs, p[prefix + "weight"], p.get(prefix + "bias"), **kw)


def _torch_dice_softmax(t, logits, target, smooth, eps):
    p = t.softmax(logits, 1)
    y = t.nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    inter, psum, tsum = (p * y).sum((0, 2, 3)), p.sum((0, 2, 3)), y.sum((0, 2, 3))
    return 1 - ((2 * inter + smooth) / t.clamp_min(psum + tsum + smooth, eps)).mean()


def _torch_dice_sigmoid(t, logits, target, smooth, eps):
    p = t.sigmoid(logits)
    inter, psum, tsum = (p * target).sum((0, 2, 3)), p.sum((0, 2, 3)), target.sum((0, 2, 3))
    return 1 - ((2 * inter + smooth) / t.clamp_min(psum + tsum + smooth, eps)).mean()


def _torch_attention_gate(t, xs, p):
    F = t.nn.functional
    x, g = xs
    q = F.relu(F.conv2d(x, p["theta.weight"])
               + F.interpolate(F.conv2d(g, p["phi.weight"], p["phi.bias"]), scale_factor=2,
                               mode="bilinear", align_corners=False))
    return t.sigmoid(F.conv2d(q, p["psi.weight"], p["psi.bias"])) * x


class _SameDraws:
    """Stands in for a dropout layer's Generator: every call draws the same numbers, so the mask
    stays fixed across the many forwards of a finite-difference check."""

    def __init__(self, seed):
        self.seed = seed

    def random(self, shape):
        return np.random.default_rng(self.seed).random(shape)


def _same_mask(layer, seed):
    layer.generator = _SameDraws(seed)
    return layer


def _mask_of(seed, shape, p):
    """The scaled mask a layer with _same_mask(layer, seed) applies: keep / (1 - p)."""
    return (np.random.default_rng(seed).random(shape) >= p) / (1.0 - p)


def layer_cases():
    """name -> Case: at least one case for every Module subclass ``unet_np.nn`` exports (layers,
    losses, Sequential) and for the attention gate, plus a whole depth-1 U-Net. Shapes are tiny (the
    whole list checks in seconds); inputs, targets and parameters are fixed."""
    from . import nn
    from .models import UNet
    from .models.attention_unet import AttentionGate
    f64 = np.float64
    r = np.random.default_rng(0)

    def x(*s):
        return r.standard_normal(s)

    def fixed(make, seed=1):
        return lambda: _fixed(make(), seed)

    ce_target = np.random.default_rng(2).integers(0, 3, (2, 4, 4))
    ce_target_ignored = ce_target.copy()
    ce_target_ignored[0, 0, :2] = -1
    pixel_weight = np.random.default_rng(3).uniform(0.5, 3.0, (2, 4, 4))
    float_target = np.random.default_rng(4).uniform(0, 1, (2, 3, 4, 4))
    pos_weight = np.array([2.0, 0.5, 3.0]).reshape(3, 1, 1)

    cases = [
        Case("Conv2d 3x3 pad 1", fixed(lambda: nn.Conv2d(2, 3, 3, padding=1, dtype=f64)),
             (x(2, 2, 5, 5),), lambda t, xs, p: _conv(t, xs[0], p, padding=1)),
        Case("Conv2d 3x3 stride 2 dilation 2",
             fixed(lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2, dtype=f64)),
             (x(1, 2, 7, 6),), lambda t, xs, p: _conv(t, xs[0], p, stride=2, padding=2, dilation=2)),
        Case("ConvTranspose2d 2x2 stride 2", fixed(lambda: nn.ConvTranspose2d(3, 2, 2, stride=2, dtype=f64)),
             (x(2, 3, 3, 4),),
             lambda t, xs, p: t.nn.functional.conv_transpose2d(xs[0], p["weight"], p["bias"], stride=2)),
        Case("ConvTranspose2d 3x3 stride 2 pad 1 output_padding 1",
             fixed(lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, dtype=f64)),
             (x(1, 2, 3, 3),),
             lambda t, xs, p: t.nn.functional.conv_transpose2d(xs[0], p["weight"], p["bias"], stride=2,
                                                               padding=1, output_padding=1)),
        Case("MaxPool2d 2", lambda: nn.MaxPool2d(2, dtype=f64), (x(2, 2, 6, 6),),
             lambda t, xs, p: t.nn.functional.max_pool2d(xs[0], 2)),
        Case("MaxPool2d 3 stride 2 pad 1", lambda: nn.MaxPool2d(3, 2, 1, dtype=f64), (x(1, 2, 5, 6),),
             lambda t, xs, p: t.nn.functional.max_pool2d(xs[0], 3, 2, 1)),
        Case("ReLU", lambda: nn.ReLU(dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: t.nn.functional.relu(xs[0])),
        Case("Sigmoid", lambda: nn.Sigmoid(dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: t.sigmoid(xs[0])),
        Case("BatchNorm2d (train)", fixed(lambda: nn.BatchNorm2d(3, dtype=f64)), (x(2, 3, 4, 4),),
             lambda t, xs, p: t.nn.functional.batch_norm(xs[0], None, None, p["weight"], p["bias"],
                                                         training=True)),
        Case("Upsample bilinear x2", lambda: nn.Upsample(scale_factor=2, mode="bilinear", dtype=f64),
             (x(1, 2, 3, 4),),
             lambda t, xs, p: t.nn.functional.interpolate(xs[0], scale_factor=2, mode="bilinear",
                                                          align_corners=False)),
        Case("Upsample nearest x2", lambda: nn.Upsample(scale_factor=2, mode="nearest", dtype=f64),
             (x(1, 2, 3, 4),),
             lambda t, xs, p: t.nn.functional.interpolate(xs[0], scale_factor=2, mode="nearest")),
        Case("Concat", lambda: nn.Concat(axis=1, dtype=f64), (x(1, 2, 3, 3), x(1, 3, 3, 3)),
             lambda t, xs, p: t.cat(xs, 1)),
        Case("CenterCrop", lambda: nn.CenterCrop((3, 2), dtype=f64), (x(1, 2, 6, 5),),
             lambda t, xs, p: xs[0][:, :, 1:4, 1:3]),
        Case("Pad2d reflect", lambda: nn.Pad2d((2, 1, 1, 2), mode="reflect", dtype=f64), (x(1, 2, 4, 5),),
             lambda t, xs, p: t.nn.functional.pad(xs[0], (2, 1, 1, 2), mode="reflect")),
        Case("Pad2d constant", lambda: nn.Pad2d((1, 0, 2, 1), mode="constant", value=0.5, dtype=f64),
             (x(1, 2, 3, 3),),
             lambda t, xs, p: t.nn.functional.pad(xs[0], (1, 0, 2, 1), mode="constant", value=0.5)),
        Case("Sequential (Conv2d, ReLU)",
             fixed(lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=f64), nn.ReLU(dtype=f64))),
             (x(1, 2, 4, 4),),
             lambda t, xs, p: t.nn.functional.relu(_conv(t, xs[0], p, prefix="0.", padding=1))),
        Case("CrossEntropyLoss + weight map", lambda: nn.CrossEntropyLoss(dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: (t.nn.functional.cross_entropy(xs[0], t.as_tensor(ce_target), reduction="none")
                               * t.as_tensor(pixel_weight)).mean(),
             target=ce_target, loss_kwargs={"pixel_weight": pixel_weight}),
        Case("CrossEntropyLoss class weights, ignore_index",
             lambda: nn.CrossEntropyLoss(weight=[0.5, 2.0, 1.0], ignore_index=-1, dtype=f64),
             (x(2, 3, 4, 4),),
             lambda t, xs, p: t.nn.functional.cross_entropy(
                 xs[0], t.as_tensor(ce_target_ignored), weight=t.tensor([0.5, 2.0, 1.0], dtype=t.float64),
                 ignore_index=-1),
             target=ce_target_ignored),
        Case("BCEWithLogitsLoss pos_weight", lambda: nn.BCEWithLogitsLoss(pos_weight=pos_weight, dtype=f64),
             (x(2, 3, 4, 4),),
             lambda t, xs, p: t.nn.functional.binary_cross_entropy_with_logits(
                 xs[0], t.as_tensor(float_target), pos_weight=t.as_tensor(pos_weight)),
             target=float_target),
        Case("DiceLoss softmax", lambda: nn.DiceLoss(dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: _torch_dice_softmax(t, xs[0], t.as_tensor(ce_target), 1.0, 1e-7),
             target=ce_target),
        Case("DiceLoss sigmoid", lambda: nn.DiceLoss(mode="sigmoid", dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: _torch_dice_sigmoid(t, xs[0], t.as_tensor(float_target), 1.0, 1e-7),
             target=float_target),
        Case("AttentionGate", fixed(lambda: AttentionGate(3, 4, 2, dtype=f64)),
             (x(1, 3, 4, 6), x(1, 4, 2, 3)), _torch_attention_gate),
        Case("BatchNorm3d (train)", fixed(lambda: nn.BatchNorm3d(2, dtype=f64)), (x(2, 2, 3, 2, 3),),
             lambda t, xs, p: t.nn.functional.batch_norm(xs[0], None, None, p["weight"], p["bias"],
                                                         training=True)),
        Case("InstanceNorm2d affine", fixed(lambda: nn.InstanceNorm2d(3, affine=True, dtype=f64)),
             (x(2, 3, 3, 4),),
             lambda t, xs, p: t.nn.functional.instance_norm(xs[0], weight=p["weight"], bias=p["bias"])),
        Case("InstanceNorm3d affine, running stats",
             fixed(lambda: nn.InstanceNorm3d(2, affine=True, track_running_stats=True, dtype=f64)),
             (x(2, 2, 2, 3, 3),),
             lambda t, xs, p: t.nn.functional.instance_norm(xs[0], weight=p["weight"], bias=p["bias"])),
        Case("GroupNorm 2 groups", fixed(lambda: nn.GroupNorm(2, 4, dtype=f64)), (x(2, 4, 3, 3),),
             lambda t, xs, p: t.nn.functional.group_norm(xs[0], 2, p["weight"], p["bias"])),
        Case("LeakyReLU 0.1", lambda: nn.LeakyReLU(0.1, dtype=f64), (x(2, 3, 4, 4),),
             lambda t, xs, p: t.nn.functional.leaky_relu(xs[0], 0.1)),
        Case("Dropout p=0.3 (one fixed mask)", lambda: _same_mask(nn.Dropout(0.3, dtype=f64), 5),
             (x(2, 3, 4, 4),), lambda t, xs, p: xs[0] * t.as_tensor(_mask_of(5, (2, 3, 4, 4), 0.3))),
        Case("Dropout2d p=0.5 (one fixed mask)", lambda: _same_mask(nn.Dropout2d(0.5, dtype=f64), 6),
             (x(2, 4, 3, 3),), lambda t, xs, p: xs[0] * t.as_tensor(_mask_of(6, (2, 4, 1, 1), 0.5))),
        Case("Dropout3d p=0.5 (one fixed mask)", lambda: _same_mask(nn.Dropout3d(0.5, dtype=f64), 7),
             (x(2, 4, 2, 2, 2),),
             lambda t, xs, p: xs[0] * t.as_tensor(_mask_of(7, (2, 4, 1, 1, 1), 0.5))),
        # volumes (N, C, D, H, W): their own random stream, so the cases above keep their inputs
        *_volume_cases(nn, f64, fixed),
        Case("UNet depth 1 (whole model)", fixed(lambda: UNet(1, 2, depth=1, base_channels=2, dtype=f64)),
             (x(1, 1, 4, 4),), None),
    ]
    return OrderedDict((c.name, c) for c in cases)


def check_case(case, eps=1e-6, torch=None):
    """(worst finite-difference error, worst error against PyTorch or None) for one Case.

    The PyTorch comparison covers the forward, every input gradient and every parameter gradient
    (float64 on both sides, the same upstream gradient); it runs only when ``torch`` (the imported
    module) is given and the case has a ``torch_fn``."""
    module = case.make()
    xs = case.inputs if len(case.inputs) > 1 else case.inputs[0]
    if case.is_loss:
        fd = gradcheck(module, xs, target=case.target, eps=eps, **case.loss_kwargs)
    else:
        fd = gradcheck(module, xs, eps=eps)
    worst_fd = max(fd.values())
    if torch is None or case.torch_fn is None:
        return worst_fd, None
    return worst_fd, _against_torch(case, torch)


def _against_torch(case, torch):
    module = case.make()
    module.zero_grad()
    module.train()
    xs = [np.array(a, dtype=np.float64) for a in case.inputs]
    if case.is_loss:
        y = module.forward(xs[0], case.target, **case.loss_kwargs)
        g = np.ones(())
        back = module.backward()
    else:
        y = module.forward(*xs)
        g = np.random.default_rng(1).standard_normal(to_numpy(y).shape)
        back = module.backward(g)
    dxs = list(back) if isinstance(back, tuple) else [back]
    txs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in xs]
    tp = {n: torch.tensor(to_numpy(p.data), dtype=torch.float64, requires_grad=True)
          for n, p in module.named_parameters()}
    ty = case.torch_fn(torch, txs, tp)
    ty.backward(torch.tensor(g, dtype=torch.float64))
    errs = [relative_error(np.asarray(to_numpy(y), dtype=np.float64), ty.detach().numpy())]
    errs += [relative_error(d, t.grad.numpy()) for d, t in zip(dxs, txs)]
    errs += [relative_error(p.grad, tp[n].grad.numpy()) for n, p in module.named_parameters()]
    return max(errs)


def _volume_cases(nn, f64, fixed):
    """The 3-D layers' cases: anisotropic kernels, strides and pooling, as nnU-Net uses them."""
    v = np.random.default_rng(30).standard_normal

    def conv3d(**kw):
        return lambda t, xs, p: t.nn.functional.conv3d(xs[0], p["weight"], p.get("bias"), **kw)

    def convT3d(**kw):
        return lambda t, xs, p: t.nn.functional.conv_transpose3d(xs[0], p["weight"], p.get("bias"), **kw)

    def interp(**kw):
        return lambda t, xs, p: t.nn.functional.interpolate(xs[0], **kw)

    target = np.random.default_rng(31).integers(0, 3, (2, 2, 3, 3))
    return [
        Case("Conv3d (1,3,3) stride (1,2,1) pad (0,1,1)",
             fixed(lambda: nn.Conv3d(2, 3, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dtype=f64)),
             (v((2, 2, 2, 5, 4)),), conv3d(stride=(1, 2, 1), padding=(0, 1, 1))),
        Case("Conv3d 3x3x3 same, dilation (2,1,1), no bias",
             fixed(lambda: nn.Conv3d(2, 2, 3, padding="same", dilation=(2, 1, 1), bias=False, dtype=f64)),
             (v((1, 2, 5, 3, 4)),), conv3d(padding=(2, 1, 1), dilation=(2, 1, 1))),
        Case("ConvTranspose3d 2 stride 2", fixed(lambda: nn.ConvTranspose3d(3, 2, 2, stride=2, dtype=f64)),
             (v((1, 3, 2, 2, 3)),), convT3d(stride=2)),
        Case("ConvTranspose3d (1,3,3) stride (1,2,2) pad (0,1,1) output_padding (0,1,1)",
             fixed(lambda: nn.ConvTranspose3d(2, 2, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                                              output_padding=(0, 1, 1), dtype=f64)),
             (v((1, 2, 2, 3, 2)),), convT3d(stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 1))),
        Case("MaxPool3d 2", lambda: nn.MaxPool3d(2, dtype=f64), (v((1, 2, 4, 4, 4)),),
             lambda t, xs, p: t.nn.functional.max_pool3d(xs[0], 2)),
        Case("MaxPool3d (1,2,2)", lambda: nn.MaxPool3d((1, 2, 2), dtype=f64), (v((1, 2, 3, 4, 4)),),
             lambda t, xs, p: t.nn.functional.max_pool3d(xs[0], (1, 2, 2))),
        Case("MaxPool3d 3 stride 2 pad 1", lambda: nn.MaxPool3d(3, 2, 1, dtype=f64), (v((1, 1, 4, 5, 3)),),
             lambda t, xs, p: t.nn.functional.max_pool3d(xs[0], 3, 2, 1)),
        Case("Upsample trilinear x2", lambda: nn.Upsample(2, mode="trilinear", dtype=f64), (v((1, 2, 2, 3, 2)),),
             interp(scale_factor=2, mode="trilinear", align_corners=False)),
        Case("Upsample trilinear (1,2,2) align_corners",
             lambda: nn.Upsample((1, 2, 2), mode="trilinear", align_corners=True, dtype=f64),
             (v((1, 2, 2, 3, 2)),), interp(scale_factor=(1, 2, 2), mode="trilinear", align_corners=True)),
        Case("Upsample nearest x2 (volume)", lambda: nn.Upsample(2, mode="nearest", dtype=f64),
             (v((1, 2, 2, 2, 3)),), interp(scale_factor=2, mode="nearest")),
        Case("Concat (volumes)", lambda: nn.Concat(axis=1, dtype=f64), (v((1, 2, 2, 3, 2)), v((1, 1, 2, 3, 2))),
             lambda t, xs, p: t.cat(xs, 1)),
        Case("CenterCrop (volume)", lambda: nn.CenterCrop((2, 3, 2), dtype=f64), (v((1, 2, 5, 4, 3)),),
             lambda t, xs, p: xs[0][:, :, 1:3, 0:3, 0:2]),
        Case("Pad3d reflect", lambda: nn.Pad3d((2, 1, 1, 0, 1, 2), dtype=f64), (v((1, 2, 3, 3, 4)),),
             lambda t, xs, p: t.nn.functional.pad(xs[0], (2, 1, 1, 0, 1, 2), mode="reflect")),
        Case("Pad3d constant", lambda: nn.Pad3d(1, mode="constant", value=0.5, dtype=f64), (v((1, 1, 2, 2, 3)),),
             lambda t, xs, p: t.nn.functional.pad(xs[0], (1,) * 6, mode="constant", value=0.5)),
        Case("CrossEntropyLoss (volume)", lambda: nn.CrossEntropyLoss(dtype=f64), (v((2, 3, 2, 3, 3)),),
             lambda t, xs, p: t.nn.functional.cross_entropy(xs[0], t.as_tensor(target)), target=target),
    ]

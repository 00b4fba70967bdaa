"""What every segmentation model shares: the conv block, size checks, save/load, PyTorch interop."""
import json

import numpy as np

from .. import backends
from ..nn import BatchNorm2d, BatchNorm3d, Conv2d, Conv3d, ReLU, Sequential
from ..nn.module import Module, check_input, no_grad
from ..nn.conv import check_input_nd

ARCHITECTURES = {}  # name -> class, filled by each model module (for unet_np.load_model)


def register(name):
    def deco(cls):
        cls.arch = name
        ARCHITECTURES[name] = cls
        return cls
    return deco


def conv_block(cin, cout, padding, batchnorm, init, dtype, backend, spatial_dims=2):
    """Two 3x3 (3x3x3 for volumes) convolutions, each followed by [batch-norm and] ReLU: the
    U-Net's block.

    As a Sequential (ConvBlock) so its parameter names ('0.weight', '1.weight', ...) match a PyTorch
    nn.Sequential of the same layers; on a backend with a fused convolution + ReLU each Conv2d -> ReLU
    pair runs as one primitive (see ConvBlock)."""
    pad = 1 if padding == "same" else 0
    Conv, BatchNorm = (Conv2d, BatchNorm2d) if spatial_dims == 2 else (Conv3d, BatchNorm3d)
    layers = []
    for c_in in (cin, cout):
        layers.append(Conv(c_in, cout, 3, padding=pad, init=init, dtype=dtype, backend=backend))
        if batchnorm:
            layers.append(BatchNorm(cout, dtype=dtype, backend=backend))
        layers.append(ReLU(backend=backend))
    return ConvBlock(*layers)


class Block(Module):
    """A U-Net block; its one child is named ``conv`` like the reference PyTorch code's UNetBlock."""

    def __init__(self, cin, cout, padding="same", batchnorm=False, init="torch", dtype=None, backend="numpy",
                 spatial_dims=2):
        super().__init__(backend=backend, dtype=dtype)
        self.conv = conv_block(cin, cout, padding, batchnorm, init, dtype, backend, spatial_dims)

    def forward(self, x):
        return self.conv.forward(x)

    def backward(self, dy):
        return self.conv.backward(dy)


class ConvBlock(Sequential):
    """conv_block's layers: Conv2d [-> BatchNorm2d] -> ReLU, twice (Conv3d, BatchNorm3d in 3-D). The
    same modules, names, parameters and state_dict as the Sequential it is; only how a convolution
    directly followed by a ReLU runs depends on the backend.

    A backend that lists 'conv2d_relu' ('conv3d_relu' for Conv3d) in its ``fused`` set (the cupy and
    numba-cuda backends) runs such a pair as ONE primitive, ``conv2d_forward(..., activation='relu')``
    (conv3d_forward in 3-D): the ReLU is applied in
    the pass that writes the convolution's output (Winograd's output transform, or the GEMM's output
    pass), and its ``conv2d_backward`` masks dy where y <= 0 first, so the activation is written once
    and read once instead of twice. Everywhere else (the numpy reference, which learners read, and
    numba) the layers run one after the other, exactly as a Sequential. Both give the same numbers:
    max(conv + b, 0) forward, dy * (y > 0) backward, the same kernels for the rest."""

    def _steps(self):
        """The layers in order, each Conv2d / Conv3d -> ReLU pair as one (conv, relu) step when the
        backend fuses it."""
        mods = list(self._modules.values())
        fused = getattr(self.backend, "fused", ())
        steps, i = [], 0
        while i < len(mods):
            m = mods[i]
            pair = (i + 1 < len(mods) and type(m) in (Conv2d, Conv3d) and type(mods[i + 1]) is ReLU
                    and f"conv{m.DIMS}d_relu" in fused
                    and not isinstance(m.padding, str))          # int padding: what conv_block builds
            steps.append((m, mods[i + 1]) if pair else (m,))
            i += 2 if pair else 1
        return steps

    def forward(self, x):
        done = []
        for step in self._steps():
            if len(step) == 2:
                x, cache = _conv_relu_forward(step[0], x)
            else:
                x, cache = step[0].forward(x), None
            done.append((step, cache))
        self._keep(done)
        return x

    def backward(self, dy):
        for step, cache in reversed(self._take()):
            dy = _conv_relu_backward(step[0], dy, cache) if len(step) == 2 else step[0].backward(dy)
        self._release()
        return dy


def _conv_relu_forward(conv, x):
    """relu(conv(x)) in one fused primitive -> (y, (cache, y's shape)). As Conv2d.forward, plus
    activation='relu' (conv.FORWARD: conv2d_forward or conv3d_forward)."""
    x = check_input_nd(type(conv).__name__, x, conv.DIMS, conv.OTHER, channels=conv.in_channels,
                       xp=conv.xp, dtype=conv.dtype)
    out_shape = conv.output_shape(x.shape)          # checks the kernel fits
    b = conv.bias.data if conv.bias is not None else None
    y, cache = getattr(conv.ops, conv.FORWARD)(x, conv.weight.data, b, conv.stride, conv.padding,
                                               conv.dilation, activation="relu")
    return y, (cache, out_shape)


def _conv_relu_backward(conv, dy, kept):
    """dx of relu(conv(x)); dw, db added to the convolution's parameters (as Conv2d.backward)."""
    cache, out_shape = kept
    if tuple(dy.shape) != tuple(out_shape):
        raise ValueError(f"{type(conv).__name__}.backward: expected a gradient of shape "
                         f"{tuple(out_shape)} (the forward's output), got {tuple(dy.shape)}")
    dy = conv.xp.asarray(dy, dtype=conv.dtype)
    dx, dw, db = getattr(conv.ops, conv.BACKWARD)(dy, cache, input_grad=conv.needs_input_grad)
    conv.weight.add_grad(dw)
    if conv.bias is not None:
        conv.bias.add_grad(db)
    return dx


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_range(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or \
            (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")


def check_common(in_channels, num_classes, depth, base_channels, upsample, init):
    """The constructor arguments every architecture shares: a clear ValueError for a bad one."""
    check_range("in_channels", in_channels, 1)
    check_range("num_classes", num_classes, 1)
    check_range("depth", depth, 1, 5)
    check_range("base_channels", base_channels, 1)
    check_choice("upsample", upsample, ("transpose", "bilinear"))
    check_choice("init", init, ("torch", "he"))


class SegmentationModel(Module):
    """Base of UNet, UNetPlusPlus and AttentionUNet. Sub-classes set ``self._config`` (constructor
    arguments, JSON-able) and implement ``_forward`` / ``backward``."""

    arch = None
    spatial_dims = 2        # 3 for volumes (N, C, D, H, W)

    # -- configuration ------------------------------------------------------------------------
    def config(self):
        """The constructor arguments that rebuild this architecture (JSON-able)."""
        return dict(self._config, dtype=str(self.dtype))

    @classmethod
    def from_config(cls, config, backend="numpy"):
        return cls(**dict(config), backend=backend)

    # -- input checks -------------------------------------------------------------------------
    def _check_input(self, x):
        x = check_input(type(self).__name__, x, ndim=2 + self.spatial_dims, channels=self.in_channels,
                        xp=self.xp, dtype=self.dtype)
        self.check_size(x.shape[2:])
        return x

    def check_size(self, hw):
        """Raise ValueError if the model cannot take an input of spatial size hw."""
        m = 2 ** self.depth
        bad = [s for s in hw if s % m]
        if bad and not self.pad_input:
            s = bad[0]
            lo, hi = (s // m) * m, (s // m + 1) * m
            near = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            raise ValueError(
                f"{type(self).__name__}: input size {tuple(hw)} is not divisible by 2**depth = {m}; "
                f"the nearest valid sizes for {s} are {near}, or build the model with pad_input=True "
                f"to reflect-pad the input and crop the output back")

    def _pad_amounts(self, hw):
        m = 2 ** self.depth
        pads = []
        for s in hw:
            total = (-s) % m
            pads.append((total // 2, total - total // 2))
        return pads

    def _pad(self, x):
        """Reflect-pad up to a multiple of 2**depth when pad_input is on; remember how much."""
        self._padding = None
        if not self.pad_input:
            return x
        pads = self._pad_amounts(x.shape[2:])              # (before, after) per spatial axis
        if not any(b or a for b, a in pads):
            return x
        if min(x.shape[2:]) <= max(max(p) for p in pads):
            raise ValueError(f"{type(self).__name__}: input {tuple(x.shape)} is too small to be "
                             f"reflect-padded by {pads} pixels")
        flat = tuple(v for p in reversed(pads) for v in p)   # torch's F.pad order: last axis first
        pad_forward = self.ops.pad2d_forward if self.spatial_dims == 2 else self.ops.pad3d_forward
        y, pad_cache = pad_forward(x, flat, "reflect")
        self._padding = (pads, tuple(x.shape[2:]), pad_cache)
        return y

    def _inside(self):
        """The slices of the un-padded input within the padded one."""
        pads, size, _ = self._padding
        return (slice(None), slice(None)) + tuple(slice(b, b + n) for (b, _), n in zip(pads, size))

    def _crop(self, y):
        """Cut the output back to the un-padded input's size."""
        return y if self._padding is None else y[self._inside()]

    def _uncrop(self, dy):
        """Adjoint of _crop: the cropped-away border gets zero gradient."""
        if self._padding is None:
            return dy
        pads, size, _ = self._padding
        out = self.xp.zeros(dy.shape[:2] + tuple(b + n + a for (b, a), n in zip(pads, size)),
                            dtype=dy.dtype)
        out[self._inside()] = dy
        return out

    def _unpad(self, dx):
        """Adjoint of _pad: fold the gradient of the reflected border back onto the input."""
        if self._padding is None:
            return dx
        pad_backward = self.ops.pad2d_backward if self.spatial_dims == 2 else self.ops.pad3d_backward
        return pad_backward(dx, self._padding[-1])

    # -- running -----------------------------------------------------------------------------
    def forward(self, x):
        x = self._check_input(x)
        self._check_memory(x)
        return self._forward(x)

    def backward(self, dlogits, input_grad=True):
        """dlogits (one array, or a list with one per output) -> dx, the gradient w.r.t. the input;
        parameter gradients are added into each p.grad. input_grad=False (a training step, where
        nothing needs the image's gradient) skips the first convolution's input gradient and
        returns None."""
        first = self.first_conv()
        first.needs_input_grad = bool(input_grad)
        try:
            d = self._backward(dlogits)
        finally:
            first.needs_input_grad = True
        return self._unpad(d) if d is not None else None

    def first_conv(self):
        """The convolution that reads the image."""
        return next(m for _, m in self.named_modules() if type(m).__name__ in ("Conv2d", "Conv3d"))

    def _check_memory(self, x):
        """Refuse a forward whose kept activations clearly exceed the machine's memory."""
        need = self.activation_bytes(x.shape) if hasattr(self, "activation_bytes") else 0
        total = _physical_memory()
        if total and need > total:
            raise MemoryError(
                f"{type(self).__name__}: a forward on input {tuple(x.shape)} would keep about "
                f"{need / 2**30:.1f} GiB of activations, more than this machine's {total / 2**30:.1f} GiB; "
                f"use a smaller batch or tile the image (predict with tiles)")

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path, optimizer=None, meta=None):
        """Write one .npz checkpoint (config, weights, running statistics, optional optimizer state
        and meta such as the epoch), atomically; the same as unet_np.save(model, path). Nothing is
        pickled."""
        from ..checkpoint import save_model
        save_model(self, path, optimizer=optimizer, meta=meta)

    @classmethod
    def load(cls, path, backend="numpy", return_checkpoint=False):
        """Rebuild a model from a checkpoint written by ``save`` (never unpickles anything)."""
        from ..checkpoint import load_checkpoint
        ck = load_checkpoint(path)
        config = dict(ck.config)
        arch = config.pop("arch", None)
        target = cls if cls is not SegmentationModel else ARCHITECTURES.get(arch)
        if target is None or (arch is not None and arch != target.arch):
            raise ValueError(f"not a unet_np checkpoint: {path}: it holds architecture {arch!r}, "
                             f"not {getattr(target, 'arch', None)!r}")
        try:
            model = target.from_config(config, backend=backend)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"not a unet_np checkpoint: {path}: bad config: {exc}") from None
        model.load_state_dict(ck.arrays)
        return (model, ck) if return_checkpoint else model

    # -- PyTorch interop -------------------------------------------------------------------------
    def load_torch_state_dict(self, state_dict):
        """Take a PyTorch model's state_dict (tensors or arrays) entry by entry IN ORDER, checking every
        shape. Tensors are converted with .detach().cpu().numpy(); torch itself is never imported."""
        if not hasattr(state_dict, "items"):
            raise TypeError(f"load_torch_state_dict expects a mapping, got {type(state_dict).__name__}")
        theirs = [(k, _tensor_to_numpy(v)) for k, v in state_dict.items()]
        ours = list(self.state_dict().items())
        for i, ((mk, mv), (tk, tv)) in enumerate(zip(ours, theirs)):
            if tuple(mv.shape) != tuple(tv.shape):
                raise ValueError(f"state_dict entry {i} does not fit: ours {mk!r} has shape "
                                 f"{tuple(mv.shape)}, theirs {tk!r} has shape {tuple(tv.shape)}")
        if len(ours) != len(theirs):
            i = min(len(ours), len(theirs))
            extra = f"ours {ours[i][0]!r}" if len(ours) > i else f"theirs {theirs[i][0]!r}"
            raise ValueError(f"state_dict has {len(theirs)} entries, this model has {len(ours)}; "
                             f"the first without a partner is entry {i}: {extra}")
        self.load_state_dict({mk: tv for (mk, _), (_, tv) in zip(ours, theirs)})
        return self

    def torch_state_dict(self):
        """name -> NumPy array, with the names of the matching PyTorch module (wrap each with
        torch.from_numpy to call ``load_state_dict`` on it)."""
        return self.state_dict()


def _tensor_to_numpy(v):
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(backends.to_numpy(v))


def _physical_memory():
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def load_model(path, backend="numpy"):
    """Load any unet_np model from a checkpoint, whatever its architecture."""
    return SegmentationModel.load(path, backend=backend)

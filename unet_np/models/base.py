"""What every segmentation model shares: the conv block, size checks, save/load, PyTorch interop."""
import json

import numpy as np

from .. import backends
from ..nn import BatchNorm2d, Conv2d, ReLU, Sequential
from ..nn.module import Module, check_input, no_grad

ARCHITECTURES = {}  # name -> class, filled by each model module (for unet_np.load_model)


def register(name):
    def deco(cls):
        cls.arch = name
        ARCHITECTURES[name] = cls
        return cls
    return deco


def conv_block(cin, cout, padding, batchnorm, init, dtype, backend):
    """Two 3x3 convolutions, each followed by [batch-norm and] ReLU: the U-Net's block.

    As a Sequential so its parameter names ('0.weight', '1.weight', ...) match a PyTorch
    nn.Sequential of the same layers."""
    pad = 1 if padding == "same" else 0
    layers = []
    for c_in in (cin, cout):
        layers.append(Conv2d(c_in, cout, 3, padding=pad, init=init, dtype=dtype, backend=backend))
        if batchnorm:
            layers.append(BatchNorm2d(cout, dtype=dtype, backend=backend))
        layers.append(ReLU(backend=backend))
    return Sequential(*layers)


class Block(Module):
    """A U-Net block; its one child is named ``conv`` like the reference PyTorch code's UNetBlock."""

    def __init__(self, cin, cout, padding="same", batchnorm=False, init="torch", dtype=None, backend="numpy"):
        super().__init__(backend=backend, dtype=dtype)
        self.conv = conv_block(cin, cout, padding, batchnorm, init, dtype, backend)

    def forward(self, x):
        return self.conv.forward(x)

    def backward(self, dy):
        return self.conv.backward(dy)


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

    # -- configuration ------------------------------------------------------------------------
    def config(self):
        """The constructor arguments that rebuild this architecture (JSON-able)."""
        return dict(self._config, dtype=str(self.dtype))

    @classmethod
    def from_config(cls, config, backend="numpy"):
        return cls(**dict(config), backend=backend)

    # -- input checks -------------------------------------------------------------------------
    def _check_input(self, x):
        x = check_input(type(self).__name__, x, channels=self.in_channels, xp=self.xp, dtype=self.dtype)
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
        (t, b), (l, r) = self._pad_amounts(x.shape[2:])
        if t == b == l == r == 0:
            return x
        if min(x.shape[2:]) <= max(t, b, l, r):
            raise ValueError(f"{type(self).__name__}: input {tuple(x.shape)} is too small to be "
                             f"reflect-padded by ({t}, {b}, {l}, {r}) pixels")
        y, pad_cache = self.ops.pad2d_forward(x, (l, r, t, b), "reflect")
        self._padding = (t, b, l, r, x.shape[2], x.shape[3], pad_cache)
        return y

    def _crop(self, y):
        """Cut the output back to the un-padded input's size."""
        if self._padding is None:
            return y
        t, b, l, r, h, w, _ = self._padding
        return y[:, :, t:t + h, l:l + w]

    def _uncrop(self, dy):
        """Adjoint of _crop: the cropped-away border gets zero gradient."""
        if self._padding is None:
            return dy
        t, b, l, r, h, w, _ = self._padding
        out = self.xp.zeros(dy.shape[:2] + (h + t + b, w + l + r), dtype=dy.dtype)
        out[:, :, t:t + h, l:l + w] = dy
        return out

    def _unpad(self, dx):
        """Adjoint of _pad: fold the gradient of the reflected border back onto the input."""
        if self._padding is None:
            return dx
        return self.ops.pad2d_backward(dx, self._padding[-1])

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
        return next(m for _, m in self.named_modules() if type(m).__name__ == "Conv2d")

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

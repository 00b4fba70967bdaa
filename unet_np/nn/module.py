"""Module, Parameter, Sequential: the small core every layer and model is built on.

A module has a ``forward(x) -> y`` that keeps what its backward needs, and a ``backward(dy) -> dx``
that returns the gradient of the loss with respect to its input and *adds* the gradients of its
parameters into ``param.grad`` (they accumulate until ``zero_grad()``), as PyTorch does.

Under ``no_grad()`` (and in ``Module.predict``) forward passes keep nothing for a backward, so an
inference uses far less memory and several threads may predict with one model at once.
"""
import contextlib
import threading
from collections import OrderedDict

import numpy as np

from .. import backends

_state = threading.local()


def is_grad_enabled():
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad():
    """Within this block forward passes store no activations; a backward is then impossible."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


FLOAT_DTYPES = (np.float32, np.float64)


def resolve_dtype(dtype):
    """float32 (the default) or float64; anything else is a clear error."""
    if dtype is None:
        return np.dtype(np.float32)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_input(owner, x, ndim=4, channels=None, xp=np, dtype=None):
    """Check and convert a layer's input; every error names the layer, what it expected and got.

    owner: the layer's name for messages; ndim=None accepts any rank. Returns ``x`` as an array of
    ``xp`` (GPU layers accept NumPy input), cast to ``dtype`` when given (kept as it is otherwise).
    """
    if x is None or isinstance(x, (str, bytes, list, tuple, dict, int, float, bool)):
        raise TypeError(f"{owner}: expected an array of shape (N, C, H, W), got {type(x).__name__}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{owner}: expected an array of shape (N, C, H, W), got {type(x).__name__}")
    kind = np.dtype(x.dtype).kind
    if kind != "f":
        what = {"i": "integer", "u": "unsigned integer", "b": "bool", "c": "complex"}.get(kind, str(x.dtype))
        raise TypeError(f"{owner}: expected a float32 or float64 array, got {what} dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        layout = {4: " (N, C, H, W)", 5: " (N, C, D, H, W)"}.get(ndim, "")
        raise ValueError(f"{owner}: expected a {ndim}-D array{layout}, got {x.ndim}-D with shape "
                         f"{tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{owner}: expected {channels} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if x.size == 0:
        raise ValueError(f"{owner}: got an empty array of shape {tuple(x.shape)}")
    return xp.asarray(x, dtype=dtype)


class Parameter:
    """A trainable array ``data`` and the gradient ``grad`` accumulated into it (same shape).

    ``backend``: the Backend its arrays live on, set by the module it is assigned to (and by
    ``Module.to``); None for a Parameter made on its own. The optimizers use that backend's fused
    updates when it has them (unet_np.optim).

    ``zero_grad()`` is deferred, as PyTorch's ``set_to_none``: the next backward's gradient becomes
    ``.grad`` itself (``add_grad``), with no zero fill and no add; reading ``.grad`` before that gives
    zeros. So the array behind ``.grad`` may change from step to step; ``keep_grad_array = True``
    (set by unet_np.distributed.GradientBuffer, whose views they are) keeps it the same array.
    On the depth-4 U-Net at 64x64 (31M parameters) the fill and the add took 7% of a training step.
    """

    backend = None

    def __init__(self, data):
        self.data = data
        self._grad = data * 0
        self._zero_pending = False          # zero_grad() called, no gradient added since
        self.keep_grad_array = False

    @property
    def grad(self):
        if self._zero_pending:
            self._grad[...] = 0
            self._zero_pending = False
        return self._grad

    @grad.setter
    def grad(self, value):
        self._grad = value
        self._zero_pending = False

    def zero_grad(self):
        """The gradient back to zero (deferred: see the class docstring)."""
        self._zero_pending = True

    def add_grad(self, g):
        """Accumulate one backward's gradient ``g`` into ``.grad``. The caller hands ``g`` over: after
        ``zero_grad()`` a C-contiguous ``g`` of the same type, shape and dtype becomes ``.grad``."""
        if not self._zero_pending:
            self._grad += g
            return
        self._zero_pending = False
        old = self._grad
        if (not self.keep_grad_array and type(g) is type(old) and g.shape == old.shape
                and g.dtype == old.dtype and g.flags.c_contiguous and getattr(g.flags, "writeable", True)):
            self._grad = g
        else:
            old[...] = g

    @property
    def shape(self):
        return self.data.shape

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class. Sub-classes assign Parameters, buffers (``register_buffer``) and sub-modules as
    attributes; they are found again in the order they were assigned (PyTorch's order)."""

    def __init__(self, backend="numpy", dtype=None):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        self.training = True
        self.dtype = resolve_dtype(dtype)
        self.backend = backends.get(backend)

    # -- registration -------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
            value.backend = self.__dict__.get("backend")
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """A non-trainable array saved in the state_dict (running statistics)."""
        self._buffers[name] = True
        object.__setattr__(self, name, array)

    @property
    def ops(self):
        return self.backend

    @property
    def xp(self):
        return self.backend.xp

    # -- traversal ----------------------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}{name}.")

    def children(self):
        return list(self._modules.values())

    def named_parameters(self, prefix=""):
        for name, p in self._parameters.items():
            yield prefix + name, p
        for name, m in self._modules.items():
            yield from m.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        """Every Parameter, in registration order (own first, then each sub-module's)."""
        return [p for _, p in self.named_parameters()]

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = mode
        return self

    def eval(self):
        return self.train(False)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self, prefix=""):
        """name -> NumPy array (a copy): parameters, then buffers, then each sub-module's, as PyTorch."""
        out = OrderedDict()
        for name, p in self._parameters.items():
            out[prefix + name] = np.array(backends.to_numpy(p.data))
        for name in self._buffers:
            out[prefix + name] = np.array(backends.to_numpy(getattr(self, name)))
        for name, m in self._modules.items():
            out.update(m.state_dict(f"{prefix}{name}."))
        return out

    def _state_slots(self, prefix=""):
        """(name, owner, attribute, is_parameter) for every entry of the state_dict, in order."""
        for name in self._parameters:
            yield prefix + name, self, name, True
        for name in self._buffers:
            yield prefix + name, self, name, False
        for name, m in self._modules.items():
            yield from m._state_slots(f"{prefix}{name}.")

    def load_state_dict(self, state_dict):
        """Copy arrays in by name. Missing, unexpected or mis-shaped entries raise ValueError naming
        the first one; nothing is changed unless every entry fits."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"load_state_dict expects a mapping name -> array, got {type(state_dict).__name__}")
        slots = list(self._state_slots())
        names = [s[0] for s in slots]
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing {len(missing)} entries, the first is {missing[0]!r}")
        unexpected = [k for k in state_dict.keys() if k not in set(names)]
        if unexpected:
            raise ValueError(f"state_dict has unexpected entry {unexpected[0]!r}")
        staged = []
        for name, owner, attr, is_param in slots:
            current = owner._parameters[attr].data if is_param else getattr(owner, attr)
            value = np.asarray(backends.to_numpy(state_dict[name]))
            if value.dtype.kind not in "fiub":
                raise ValueError(f"state_dict entry {name!r} has dtype {value.dtype}, expected numbers")
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(f"state_dict entry {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(current.shape)}")
            staged.append((owner, attr, is_param, value.astype(current.dtype)))
        for owner, attr, is_param, value in staged:
            if is_param:
                owner._parameters[attr].data[...] = owner.backend.asarray(value)
            else:
                getattr(owner, attr)[...] = owner.backend.asarray(value)
        return self

    # -- backend -----------------------------------------------------------------------------
    def to(self, backend, optimizer=None):
        """Move every parameter, gradient and buffer to another backend (in place); returns self.
        Pass the optimizer to move its state (momentum buffers, Adam moments) along with them."""
        target = backends.get(backend)
        for _, m in self.named_modules():
            for p in m._parameters.values():
                p.data = target.asarray(backends.to_numpy(p.data))
                p.grad = target.asarray(backends.to_numpy(p.grad))
                p.backend = target
            for name in m._buffers:
                object.__setattr__(m, name, target.asarray(backends.to_numpy(getattr(m, name))))
            m.backend = target
            m._clear_cache()
        if optimizer is not None:
            # the optimizer holds the Parameters themselves; its buffers are rebuilt on their new arrays
            optimizer.load_state_dict(optimizer.state_dict())
        return self

    def _clear_cache(self):
        """Forget activations kept for a backward."""
        if "_cache" in self.__dict__:
            self._cache = None

    # -- running ---------------------------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def predict(self, x):
        """Forward without keeping anything for a backward (eval mode is the caller's choice)."""
        with no_grad():
            return self.forward(x)

    def _keep(self, cache):
        """Store what the backward needs, unless gradients are off (then keep nothing)."""
        self._cache = cache if is_grad_enabled() else None

    def _take(self):
        """The cache a backward needs; a clear error when there is none."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward that kept "
                               f"its activations (forward under no_grad/predict keeps none, and a "
                               f"backward uses them up: run forward again before another backward)")
        return cache

    def _release(self):
        """Drop the cache at the end of a successful backward, as PyTorch frees a graph's saved
        tensors during its backward: a training step's memory then falls through the backward, and
        no activations are held between steps. (A backward that raises, e.g. on a dy of the wrong
        shape, keeps them.)"""
        self._cache = None

    def __repr__(self):
        inner = "".join(f"\n  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in self._modules.items())
        return f"{type(self).__name__}({self.extra_repr()}{inner}{chr(10) if inner else ''})"

    def extra_repr(self):
        return ""


class Sequential(Module):
    """Modules applied in order; the backward runs them in reverse."""

    def __init__(self, *modules):
        super().__init__(backend=modules[0].backend if modules else "numpy",
                         dtype=modules[0].dtype if modules else None)
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(self._modules.values()):
            dy = m.backward(dy)
        return dy

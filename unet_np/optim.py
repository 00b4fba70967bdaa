"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient-norm clipping.

Each optimizer repeats PyTorch's single-tensor update (torch.optim.* on CPU) operation for
operation, so a run in float64 follows PyTorch's trajectory to the last few bits. The update is done
in place on ``p.data`` with in-place operators and the array module of ``p.data``, so the same code
is meant to update CuPy parameters too (only NumPy is tested here). That array code is the reference:
when a parameter lives on a backend with fused updates (cupy: kernels/cuda/optim.cu, numba-cuda:
kernels/cuda_optim.py), the same update runs there as one kernel pass per parameter instead
(``_fused``; tests/backends compare the two paths step by step).

State is a flat dict name -> NumPy array, saveable in an ``.npz`` without pickling:
    "step"  (0-d int64)  and every hyper-parameter ("lr", "momentum", "betas", ...) as arrays,
    "state.<i>.<buffer>" for parameter i ("momentum_buffer", "exp_avg", "exp_avg_sq",
    "max_exp_avg_sq"), present once a step has created them (as in PyTorch, buffers are made lazily).
"""
import math
import numbers

import numpy as np

from .backends import to_numpy
from .nn.module import Parameter

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepLR", "CosineAnnealingLR", "PolynomialLR",
           "clip_grad_norm_"]


def _xp(a):
    """The array module of ``a``: cupy for a CuPy array, numpy otherwise."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def _fused(p, name):
    """The fused update ``name`` ("sgd_step" or "adam_step") of the backend ``p`` lives on, or None.

    A GPU backend (cupy, numba-cuda) does a whole update in one kernel pass per parameter; it takes
    the same arguments whatever the backend (see CudaKernels.sgd_step / adam_step in
    unet_np/backends/cupy_backend.py). None (the array code below runs) when the backend has no such
    update, or when p's arrays are not contiguous arrays of that backend's array module."""
    backend = p.backend
    update = getattr(backend, name, None)
    if update is None or not isinstance(p.data, backend.xp.ndarray) or not p.data.flags.c_contiguous:
        return None
    return update


def _number(owner, name, value, low=None, high=None, low_open=False, high_open=False):
    """A finite real number within [low, high] (ends optionally open), as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
            value = value.item()
        else:
            raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if low is not None and high is not None:
            rng = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {low}"
        else:
            rng = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{owner}: invalid {name} {value}: it must be a finite number {rng}")
    return value


def _scalar(sd, key, owner):
    """A 0-d entry of a state dict as a Python number (arrays and plain numbers both accepted)."""
    a = np.asarray(to_numpy(sd[key]))
    if a.ndim != 0:
        raise ValueError(f"{owner} state_dict entry {key!r} must be a scalar (0-d array), got shape "
                         f"{a.shape}")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{owner} state_dict entry {key!r} has dtype {a.dtype}, expected a number")
    return a.item()


class Optimizer:
    """Base class: holds the parameters, their per-parameter state and the step count.

    Sub-classes list their hyper-parameters in ``_HYPER`` (state-dict names) and the buffers a step
    creates in ``_buffers()``; they implement ``_update(p, state)`` for one parameter.
    """
    _HYPER = ()

    def __init__(self, params):
        name = type(self).__name__
        if hasattr(params, "parameters") and callable(params.parameters):
            raise TypeError(f"{name}: params must be an iterable of Parameters; pass model.parameters(), "
                            f"not the model")
        if isinstance(params, Parameter):
            raise TypeError(f"{name}: params must be an iterable of Parameters, got one Parameter; "
                            f"wrap it in a list")
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"{name}: params must be an iterable of Parameters, got "
                            f"{type(params).__name__}") from None
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{name}: parameter {i} is a {type(p).__name__}, expected "
                                f"unet_np.nn.Parameter")
        self.params = params
        self.state = [dict() for _ in params]
        self.step_count = 0

    # -- running -----------------------------------------------------------------------------
    def zero_grad(self):
        """Every parameter's gradient back to zero (deferred until the next backward or the next
        read of .grad: see unet_np.nn.Parameter)."""
        for p in self.params:
            p.zero_grad()

    def step(self):
        """One update of every parameter from its current ``.grad``."""
        self.step_count += 1
        self._prepare()
        for p, state in zip(self.params, self.state):
            self._update(p, state)

    def _prepare(self):
        pass

    def _update(self, p, state):
        raise NotImplementedError

    def _buffers(self):
        """Names of the per-parameter buffers a step keeps (with the current hyper-parameters)."""
        return ()

    # -- state -------------------------------------------------------------------------------
    def _hyper_values(self):
        return {k: getattr(self, k) for k in self._HYPER}

    def state_dict(self):
        """Flat dict name -> NumPy array (copies): "step", hyper-parameters, then per-parameter buffers."""
        out = {"step": np.array(self.step_count, dtype=np.int64)}
        for k, v in self._hyper_values().items():
            out[k] = np.array(v, dtype=bool if isinstance(v, bool) else np.float64)
        for i, state in enumerate(self.state):
            for b in self._buffers():
                if b in state:
                    out[f"state.{i}.{b}"] = np.array(to_numpy(state[b]))
        return out

    def load_state_dict(self, state_dict):
        """Restore from ``state_dict()``'s output (arrays or plain numbers). Every name and shape is
        checked before anything changes; a wrong one is a ValueError naming it."""
        name = type(self).__name__
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"{name}.load_state_dict expects a mapping name -> array, got "
                            f"{type(state_dict).__name__}")
        required = ("step",) + tuple(self._HYPER)
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"{name} state_dict is missing {missing[0]!r} (is it from another optimizer?); "
                             f"expected entries {', '.join(required)} and state.<i>.<buffer>")
        step = _scalar(state_dict, "step", name)
        if isinstance(step, float) and not step.is_integer() or step < 0:
            raise ValueError(f"{name} state_dict entry 'step' must be a whole number >= 0, got {step}")
        step = int(step)
        # Hyper-parameters go through the constructor's checks on a scratch copy.
        hyper = {}
        for k in self._HYPER:
            if k == "betas":
                b = np.asarray(to_numpy(state_dict[k]), dtype=np.float64)
                if b.shape != (2,):
                    raise ValueError(f"{name} state_dict entry 'betas' must have shape (2,), got {b.shape}")
                hyper[k] = (float(b[0]), float(b[1]))
            else:
                hyper[k] = _scalar(state_dict, k, name)
        scratch = object.__new__(type(self))
        scratch._set_hyper(**hyper)
        expected = {f"state.{i}.{b}": i for i in range(len(self.params))
                    for b in scratch._buffers()} if step > 0 else {}
        known = set(required) | set(expected)
        unexpected = [k for k in state_dict.keys() if k not in known]
        if unexpected:
            raise ValueError(f"{name} state_dict has unexpected entry {unexpected[0]!r} (this optimizer "
                             f"has {len(self.params)} parameters, step {step})")
        missing = [k for k in expected if k not in state_dict]
        if missing:
            raise ValueError(f"{name} state_dict is missing {missing[0]!r}")
        staged = []
        for key, i in expected.items():
            value = np.asarray(to_numpy(state_dict[key]))
            p = self.params[i]
            if value.dtype.kind not in "fiu":
                raise ValueError(f"{name} state_dict entry {key!r} has dtype {value.dtype}, expected numbers")
            if tuple(value.shape) != tuple(p.data.shape):
                raise ValueError(f"{name} state_dict entry {key!r} has shape {tuple(value.shape)}, but "
                                 f"parameter {i} has shape {tuple(p.data.shape)}")
            staged.append((i, key.rsplit(".", 1)[1], value))
        # Everything fits: apply.
        self._set_hyper(**hyper)
        self.step_count = step
        self.state = [dict() for _ in self.params]
        for i, buf, value in staged:
            data = self.params[i].data
            self.state[i][buf] = _xp(data).array(value, dtype=data.dtype)
        return self

    def __repr__(self):
        hp = ", ".join(f"{k}={v}" for k, v in self._hyper_values().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {hp})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and L2 weight decay,
    exactly as torch.optim.SGD:

        g = grad + weight_decay * p
        buf = g (first step), else buf = momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov), else g = buf          (only when momentum != 0)
        p = p - lr * g
    """
    _HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        super().__init__(params)
        self._set_hyper(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)

    def _set_hyper(self, lr, momentum, dampening, weight_decay, nesterov):
        self.lr = _number("SGD", "learning rate lr", lr, low=0)
        self.momentum = _number("SGD", "momentum", momentum, low=0)
        self.dampening = _number("SGD", "dampening", dampening)
        self.weight_decay = _number("SGD", "weight_decay", weight_decay, low=0)
        if not isinstance(nesterov, (bool, np.bool_, int)):
            raise TypeError(f"SGD: nesterov must be a bool, got {type(nesterov).__name__}")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum > 0 and zero dampening")

    def _buffers(self):
        return ("momentum_buffer",) if self.momentum != 0 else ()

    def _update(self, p, state):
        fused = _fused(p, "sgd_step")
        if fused is not None:                           # the same update in one kernel pass
            first = self.momentum != 0 and "momentum_buffer" not in state
            if first:
                state["momentum_buffer"] = _xp(p.data).empty_like(p.data)   # the kernel sets it to g
            fused(p.data, p.grad, state.get("momentum_buffer"), self.lr, momentum=self.momentum,
                  dampening=self.dampening, weight_decay=self.weight_decay, nesterov=self.nesterov,
                  first=first)
            return
        g = p.grad
        if self.weight_decay != 0:
            g = g + self.weight_decay * p.data
        if self.momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba), exactly as torch.optim.Adam (L2 weight decay added to the gradient):

        g = grad + weight_decay * p
        m = m + (1 - beta1) (g - m)           (torch's lerp)
        v = beta2 v + (1 - beta2) g^2
        vmax = max(vmax, v)                   (amsgrad only; v below is then vmax)
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    _HYPER = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False):
        super().__init__(params)
        self._set_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def _set_hyper(self, lr, betas, eps, weight_decay, amsgrad):
        name = type(self).__name__
        self.lr = _number(name, "learning rate lr", lr, low=0)
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise TypeError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}") from None
        self.betas = (_number(name, "beta parameter at index 0", b1, 0, 1, high_open=True),
                      _number(name, "beta parameter at index 1", b2, 0, 1, high_open=True))
        self.eps = _number(name, "epsilon value eps", eps, low=0)
        self.weight_decay = _number(name, "weight_decay value", weight_decay, low=0)
        if not isinstance(amsgrad, (bool, np.bool_, int)):
            raise TypeError(f"{name}: amsgrad must be a bool, got {type(amsgrad).__name__}")
        self.amsgrad = bool(amsgrad)

    def _buffers(self):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def _prepare(self):
        b1, b2 = self.betas
        t = self.step_count
        self._step_size = self.lr / (1 - b1 ** t)
        self._bc2_sqrt = (1 - b2 ** t) ** 0.5

    def _update(self, p, state):
        xp = _xp(p.data)
        if not state:
            for b in self._buffers():
                state[b] = xp.zeros_like(p.data)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        fused = _fused(p, "adam_step")
        if fused is not None:                           # the same update in one kernel pass
            fused(p.data, p.grad, m, v, self.step_count, self.lr, betas=self.betas, eps=self.eps,
                  weight_decay=self.weight_decay, decoupled=self._decoupled,
                  vmax=state["max_exp_avg_sq"] if self.amsgrad else None)
            return
        b1, b2 = self.betas
        g = p.grad
        if self.weight_decay != 0:
            if self._decoupled:
                p.data *= 1 - self.lr * self.weight_decay
            else:
                g = g + self.weight_decay * p.data
        w = 1 - b1                                      # m.lerp_(g, w), in torch's two branches
        if w < 0.5:
            m += w * (g - m)
        else:
            m[...] = g - (g - m) * (1 - w)
        v *= b2
        v += ((1 - b2) * g) * g
        if self.amsgrad:
            vmax = state["max_exp_avg_sq"]
            xp.maximum(vmax, v, out=vmax)
            v = vmax
        denom = xp.sqrt(v)
        denom /= self._bc2_sqrt
        denom += self.eps
        update = m * self._step_size
        update /= denom
        p.data -= update


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter), exactly as torch.optim.AdamW: before the
    Adam step, p = p * (1 - lr * weight_decay); the gradient itself is not changed."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


# -- learning-rate schedules -------------------------------------------------------------------------

class _Schedule:
    """Sets ``optimizer.lr`` from a closed form of the epoch count ``last_epoch`` (0 at construction,
    +1 per ``step()``); the base rate is the optimizer's lr when the schedule is made."""
    _HYPER = ()

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__}: expected a unet_np.optim optimizer, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.last_epoch = 0
        self._apply()

    def lr_at(self, epoch):
        raise NotImplementedError

    def _apply(self):
        self._last_lr = self.lr_at(self.last_epoch)
        self.optimizer.lr = self._last_lr

    def step(self):
        """Advance one epoch (or iteration) and set the optimizer's lr."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self):
        """The lr last set, as a one-element list (PyTorch's form: one entry per parameter group)."""
        return [self._last_lr]

    def state_dict(self):
        """Flat dict name -> 0-d NumPy array: "last_epoch", "base_lr" and the schedule's settings."""
        out = {"last_epoch": np.array(self.last_epoch, dtype=np.int64),
               "base_lr": np.array(self.base_lr, dtype=np.float64)}
        for k in self._HYPER:
            out[k] = np.array(getattr(self, k))
        return out

    def load_state_dict(self, state_dict):
        """Restore from ``state_dict()``'s output (0-d arrays or plain numbers); the optimizer's lr is
        left as it is (it is part of the optimizer's own state), as in PyTorch."""
        name = type(self).__name__
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"{name}.load_state_dict expects a mapping name -> value, got "
                            f"{type(state_dict).__name__}")
        names = ("last_epoch", "base_lr") + self._HYPER
        missing = [k for k in names if k not in state_dict]
        if missing:
            raise ValueError(f"{name} state_dict is missing {missing[0]!r}")
        unexpected = [k for k in state_dict.keys() if k not in names]
        if unexpected:
            raise ValueError(f"{name} state_dict has unexpected entry {unexpected[0]!r}")
        values = {k: _scalar(state_dict, k, name) for k in names}
        epoch = values.pop("last_epoch")
        if epoch < 0 or float(epoch) != int(epoch):
            raise ValueError(f"{name} state_dict entry 'last_epoch' must be a whole number >= 0, got {epoch}")
        base_lr = _number(name, "base_lr", values.pop("base_lr"), low=0)
        self._set_hyper(**values)
        self.base_lr, self.last_epoch = base_lr, int(epoch)
        self._last_lr = self.lr_at(self.last_epoch)
        return self

    def __repr__(self):
        hp = ", ".join(f"{k}={getattr(self, k)}" for k in self._HYPER)
        return f"{type(self).__name__}({hp}, last_epoch={self.last_epoch})"


def _positive_int(owner, name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, float)) \
            or float(value) != int(value) or int(value) <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return int(value)


class StepLR(_Schedule):
    """lr = base_lr * gamma ** (last_epoch // step_size)."""
    _HYPER = ("step_size", "gamma")

    def __init__(self, optimizer, step_size, gamma=0.1):
        self._set_hyper(step_size, gamma)
        super().__init__(optimizer)

    def _set_hyper(self, step_size, gamma):
        self.step_size = _positive_int("StepLR", "step_size", step_size)
        self.gamma = _number("StepLR", "gamma", gamma, low=0)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (base_lr - eta_min) (1 + cos(pi * last_epoch / T_max)) / 2 (periodic past T_max,
    as PyTorch's recursive form is)."""
    _HYPER = ("T_max", "eta_min")

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self._set_hyper(T_max, eta_min)
        super().__init__(optimizer)

    def _set_hyper(self, T_max, eta_min):
        self.T_max = _positive_int("CosineAnnealingLR", "T_max", T_max)
        self.eta_min = _number("CosineAnnealingLR", "eta_min", eta_min, low=0)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class PolynomialLR(_Schedule):
    """lr = base_lr * (1 - min(last_epoch, total_iters) / total_iters) ** power (0 from total_iters on)."""
    _HYPER = ("total_iters", "power")

    def __init__(self, optimizer, total_iters=5, power=1.0):
        self._set_hyper(total_iters, power)
        super().__init__(optimizer)

    def _set_hyper(self, total_iters, power):
        self.total_iters = _positive_int("PolynomialLR", "total_iters", total_iters)
        self.power = _number("PolynomialLR", "power", power, low=0)

    def lr_at(self, epoch):
        return self.base_lr * (1.0 - min(self.total_iters, epoch) / self.total_iters) ** self.power


# -- gradient clipping -------------------------------------------------------------------------------

def clip_grad_norm_(params, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale every gradient in place so that their joint norm is at most ``max_norm``; as
    torch.nn.utils.clip_grad_norm_.

    total = || (||g_1||, ..., ||g_k||) ||  (the norm of all gradients taken as one vector)
    each g *= min(1, max_norm / (total + 1e-6)).
    params: a Parameter or an iterable of them; norm_type: a float > 0 or inf. Returns total (the
    norm before clipping) as a Python float; 0.0 for no parameters. A NaN/inf total raises
    RuntimeError when error_if_nonfinite is True. max_norm must be >= 0 (PyTorch does not check).
    """
    if isinstance(params, Parameter):
        params = [params]
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"clip_grad_norm_: parameter {i} is a {type(p).__name__}, expected "
                            f"unet_np.nn.Parameter")
    max_norm = _number("clip_grad_norm_", "max_norm", max_norm, low=0)
    if isinstance(norm_type, (bool, np.bool_)) or not isinstance(norm_type, numbers.Real):
        raise TypeError(f"clip_grad_norm_: norm_type must be a number, got {type(norm_type).__name__}")
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 or inf, got {norm_type}")
    if not params:
        return 0.0
    grads = [p.grad for p in params]
    if norm_type == math.inf:
        total = max(float(_xp(g).abs(g).max()) if g.size else 0.0 for g in grads)
    elif norm_type == 2.0:
        norms = [float(_xp(g).sqrt((g * g).sum())) for g in grads]
        total = math.sqrt(sum(n * n for n in norms))
    else:
        norms = [float(((_xp(g).abs(g) ** norm_type).sum()) ** (1 / norm_type)) for g in grads]
        total = sum(n ** norm_type for n in norms) ** (1 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is "
                           f"{total}; set error_if_nonfinite=False to clip anyway")
    coef = min(max_norm / (total + 1e-6), 1.0)
    if coef < 1.0 or not math.isfinite(total):
        for g in grads:
            g *= coef
    return total

"""Backends: a small table of primitives plus an array module.

A layer never knows which backend it runs on: it calls ``self.ops.<primitive>(...)``, and the
backend decides how that primitive is computed. The ``numpy`` backend is the reference; its
primitives are the plain functions written beside each layer in ``unet_np/nn/*.py`` (each family file
lists them in its ``OPS`` tuple). Faster backends start from that table and replace entries with
kernels from ``unet_np.kernels``.

    get("numpy")      -> Backend
    available()       -> names of the backends that run on this machine
"""
import importlib

NAMES = ("numpy", "numba", "cupy", "numba-cuda")

# The extra that brings each backend's dependencies, for error messages.
EXTRAS = {"numba": "numba", "cupy": "cuda12", "numba-cuda": "numba-cuda"}
# How to install what a backend needs: the packages themselves (works anywhere), and the extra, which
# pip resolves only from a checkout (pip install '.[extra]'): unet-np is on no package registry.
INSTALL = {
    "numba": "pip install numba threadpoolctl (the unet-np[numba] extra; in a checkout: "
             "pip install '.[numba]')",
    "cupy": "pip install cupy-cuda12x, or cupy-cuda13x for CUDA 13 (the unet-np[cuda12] / [cuda13] "
            "extras; in a checkout: pip install '.[cuda12]')",
    "numba-cuda": "pip install numba numba-cuda (the unet-np[numba-cuda] extra; in a checkout: "
                  "pip install '.[numba-cuda]')",
}

_MODULES = {"numpy": "numpy_backend", "numba": "numba_backend", "cupy": "cupy_backend",
            "numba-cuda": "numba_cuda_backend"}

_cache = {}


class Backend:
    """A named table of primitives. ``xp`` is its array module (numpy or cupy).

    A backend may also offer fused optimizer updates, ``sgd_step`` and ``adam_step`` (one kernel
    pass per parameter, see kernels/cuda/optim.cu and kernels/cuda_optim.py); unet_np.optim calls them
    for the parameters that live on this backend and runs its array code where they are None.
    """

    sgd_step = None
    adam_step = None

    def __init__(self, name, xp, ops):
        self.name = name
        self.xp = xp
        self.ops = dict(ops)
        if getattr(xp, "__name__", "numpy") != "numpy":
            # primitives this backend took unchanged from the NumPy reference, and which that
            # reference computes with NumPy calls only, run on the host (see host_fallback)
            from .numpy_backend import HOST_ONLY, reference_ops
            ref = reference_ops()
            for key in HOST_ONLY:
                if self.ops.get(key) is ref[key]:
                    self.ops[key] = host_fallback(ref[key], xp)
        for key, fn in self.ops.items():
            setattr(self, key, fn)

    def asarray(self, a, dtype=None):
        """Bring any array (NumPy or this backend's) onto this backend."""
        return self.xp.asarray(a, dtype=dtype)

    def __repr__(self):
        return f"Backend({self.name!r})"


def host_fallback(fn, xp):
    """``fn``, a NumPy reference primitive, for a backend whose arrays live elsewhere (a GPU): its
    array arguments are copied to the host, and the arrays it returns (the result, or the entries of
    a result tuple: y of (y, cache), each of (dx, dw, db)) copied back with ``xp.asarray``. A cache
    stays on the host, where the matching backward (also a fallback) reads it. Correct, not fast:
    a backend replaces the entry with its own kernel to go fast."""
    import numpy as np

    def host(*args, **kwargs):
        args = [to_numpy(a) if hasattr(a, "shape") and hasattr(a, "dtype") else a for a in args]
        out = fn(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(xp.asarray(o) if isinstance(o, np.ndarray) else o for o in out)
        return xp.asarray(out) if isinstance(out, np.ndarray) else out

    host.__name__ = getattr(fn, "__name__", "primitive")
    host.__doc__ = f"{fn.__doc__ or ''}\n(Run on the host: this backend has no kernel for it.)"
    host.reference = fn
    return host


class BackendUnavailable(RuntimeError):
    """Raised when a backend is named that cannot run on this machine."""


def _load(name):
    module = importlib.import_module(f"unet_np.backends.{_MODULES[name]}")
    return module.make_backend()


def get(name="numpy"):
    """The backend called ``name``; a Backend passes through unchanged."""
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(NAMES)}")
    if name not in _cache:
        try:
            _cache[name] = _load(name)
        except BackendUnavailable:
            raise
        except Exception as exc:  # missing package, no GPU, old driver ...
            here = ", ".join(available()) or "none"
            hint = f" Install it with: {INSTALL[name]}." if name in INSTALL else ""
            raise BackendUnavailable(
                f"backend {name!r} cannot run here: {type(exc).__name__}: {exc}.{hint} "
                f"Backends available here: {here}.") from exc
    return _cache[name]


def available():
    """Names of the backends that load and run on this machine. numba is listed when Numba imports:
    loading the backend itself would start its OpenMP threads, and a process that has started them
    cannot use the backend in a fork()ed child (see numba_backend), so asking must not do that."""
    names = []
    for name in NAMES:
        if name in _cache:
            names.append(name)
            continue
        if name == "numba":
            try:
                importlib.import_module("numba")
                names.append(name)
            except Exception:
                pass
            continue
        try:
            _cache[name] = _load(name)
            names.append(name)
        except Exception:
            pass
    return names


def to_numpy(a):
    """Any backend's array (or a Python number) as a NumPy array."""
    import numpy as np
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)

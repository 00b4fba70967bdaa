"""Central finite differences against a module's hand-written backward: the learner's check.

For a module f and a fixed random upstream gradient g, the scalar L = sum(f(x) * g) has
dL/dx = backward(g). Each entry of x (and of every parameter) is nudged by +-eps and
(L(x + eps) - L(x - eps)) / (2 eps) is compared with the analytic value. The error reported for an
array is max|analytic - numeric| / max(max|numeric|, 1e-8): a relative error over the whole array,
so one entry near zero does not blow it up. In float64 with eps=1e-6 it is typically below 1e-7.
"""
import numpy as np

from .backends import to_numpy


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


def _rel(analytic, numeric):
    analytic = to_numpy(analytic).astype(np.float64)
    scale = max(float(np.max(np.abs(numeric))), 1e-8)
    return float(np.max(np.abs(analytic - numeric)) / scale)


def gradcheck(module, x, target=None, eps=1e-6, seed=0, **loss_kwargs):
    """Worst relative error of ``module``'s backward against finite differences.

    module: a layer (``forward(x)`` or ``forward(*xs)``), or a loss (``forward(logits, target)``,
    pass ``target=``). x: an array, or a tuple of arrays for multi-input layers. Use float64 arrays
    and a float64 module, on tiny shapes: every entry costs two forwards.
    Returns {'input' (or 'input0', 'input1', ...): err, '<parameter name>': err, ...}.
    """
    xs = [np.array(a, dtype=np.float64) for a in (x if isinstance(x, tuple) else (x,))]
    is_loss = target is not None
    rng = np.random.default_rng(seed)

    if is_loss:
        def run():
            return float(to_numpy(module.forward(xs[0], target, **loss_kwargs)))
        run()
        grads_in = [module.backward()]
    else:
        y = module.forward(*xs)
        outs = y if isinstance(y, tuple) else (y,)
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
        report["input" if len(xs) == 1 else f"input{i}"] = _rel(g, _numeric(run, a, eps))
    for name, p in module.named_parameters():
        analytic = np.array(to_numpy(p.grad), dtype=np.float64)
        if not isinstance(p.data, np.ndarray):
            raise TypeError("gradcheck runs on the numpy backend; move the module with .to('numpy')")
        report[name] = _rel(analytic, _numeric(run, p.data, eps))
    return report

"""Where unet_np's time goes in one training step: per-layer forward / backward timings.

Every leaf module of the model (a module without sub-modules: Conv2d, ReLU, MaxPool2d, Concat, ...)
gets its instance's ``forward`` and ``backward`` replaced by a wrapper that records
``time.perf_counter()`` around the call; the loss's forward and backward and the optimizer's
``zero_grad`` and ``step`` are wrapped the same way. What remains of the step (the model's own code
between its layers: the skip-gradient additions, checks) is reported as "glue". The wrappers are
instance attributes, removed again afterwards, so the model is left as it was.

Run it through the benchmark, which sets up threads and BLAS first:

    python -m benchmarks.cpu --profile-only [--profile-net article] [--profile-batch 8] [--profile-size 128]

(``python -m benchmarks.profile_layers ...`` does the same.) This module imports nothing heavy at
the top, so the benchmark can import it before NumPy is loaded.
"""
import os
import sys
import time
from collections import defaultdict


def _leaf_modules(model):
    """(name, module) for every module that has no sub-modules, in registration order."""
    out = []
    for name, m in model.named_modules():
        if not m.children():
            out.append((name.rstrip(".") or type(m).__name__, m))
    return out


def _wrap(obj, method, key, record):
    """Replace obj.<method> by a timing wrapper (an instance attribute); return an undo function."""
    inner = getattr(obj, method)
    clock = time.perf_counter

    def timed(*args, **kwargs):
        t0 = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            record[key] += clock() - t0

    object.__setattr__(obj, method, timed)

    def undo():
        obj.__dict__.pop(method, None)

    return undo


def profile_layers(model, x, target, loss_fn, optimizer, steps=3, warmup=1):
    """Time the parts of ``steps`` training steps (after ``warmup`` untimed ones).

    model: a unet_np model; x (N, C, H, W) and target (N, H, W) its input and labels;
    loss_fn: e.g. CrossEntropyLoss(); optimizer: e.g. SGD(model.parameters(), lr, momentum=0.9).
    Returns a dict: step_s (median total of a step), per-step mean seconds ``by_name``
    {(module name, 'forward'|'backward'): s}, ``by_type`` {(layer type, phase): s}, the loss and
    optimizer times, the glue (the step less everything measured) and each entry's percent of the step.
    """
    model.train()

    def step():
        optimizer.zero_grad()
        logits = model.forward(x)
        loss_fn.forward(logits, target)
        model.backward(loss_fn.backward())
        optimizer.step()

    for _ in range(warmup):
        step()

    record = defaultdict(float)
    types = {}
    undo = []
    for name, m in _leaf_modules(model):
        types[name] = type(m).__name__
        for phase in ("forward", "backward"):
            undo.append(_wrap(m, phase, (name, phase), record))
    undo.append(_wrap(loss_fn, "forward", ("loss", "forward"), record))
    undo.append(_wrap(loss_fn, "backward", ("loss", "backward"), record))
    undo.append(_wrap(optimizer, "zero_grad", ("optimizer", "zero_grad"), record))
    undo.append(_wrap(optimizer, "step", ("optimizer", "step"), record))
    totals = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t0)
    finally:
        for u in undo:
            u()

    totals.sort()
    step_s = totals[len(totals) // 2]
    mean_total = sum(totals) / len(totals)
    per = {k: v / steps for k, v in record.items()}
    by_name = [dict(name=k[0], phase=k[1], type=types.get(k[0], k[0]), seconds=v) for k, v in per.items()]
    by_type_acc = defaultdict(float)
    for e in by_name:
        by_type_acc[(e["type"], e["phase"])] += e["seconds"]
    measured = sum(per.values())
    glue = max(mean_total - measured, 0.0)
    by_type = [dict(type=k[0], phase=k[1], seconds=v) for k, v in by_type_acc.items()]
    by_type.append(dict(type="glue (model code between layers)", phase="-", seconds=glue))
    for lst in (by_name, by_type):
        for e in lst:
            e["percent"] = 100.0 * e["seconds"] / mean_total if mean_total > 0 else 0.0
        lst.sort(key=lambda e: -e["seconds"])
    return dict(steps=steps, warmup=warmup, step_s=step_s, step_mean_s=mean_total, step_times_s=totals,
                glue_s=glue, by_name=by_name, by_type=by_type,
                input_shape=list(x.shape))


def format_profile(prof, top=15):
    """Plain-text tables of a profile_layers() result (top entries by module name, all by type)."""
    lines = [f"per-layer breakdown of one unet_np training step, input {tuple(prof['input_shape'])}: "
             f"median step {prof['step_s']:.3f} s (mean {prof['step_mean_s']:.3f} s over {prof['steps']})",
             "  by layer type:"]
    for e in prof["by_type"]:
        lines.append(f"    {e['type']:<34} {e['phase']:<9} {e['seconds'] * 1e3:9.1f} ms {e['percent']:6.1f} %")
    lines.append(f"  top {top} modules:")
    for e in prof["by_name"][:top]:
        lines.append(f"    {e['name']:<22} {e['type']:<16} {e['phase']:<9} {e['seconds'] * 1e3:9.1f} ms "
                     f"{e['percent']:6.1f} %")
    return "\n".join(lines)


if __name__ == "__main__":
    # Delegate to the benchmark, which cleans the BLAS environment and sets threads before NumPy loads.
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.cpu", "--profile-only", *sys.argv[1:]])

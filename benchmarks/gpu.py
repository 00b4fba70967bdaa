"""GPU benchmark: unet_np's GPU backends against PyTorch + cuDNN on the same networks and weights.

    python -m benchmarks.gpu [--nets article,depth4] [--batch 16] [--size 256] [--budget-s 330]
    python -m benchmarks.gpu --smoke        # the plumbing on the CPU (numpy backend, torch CPU, tiny)
    python -m benchmarks.gpu --volumes      # the 3-D case: net unet3d, batch 2 at 64^3 (issue 18)

What it measures (float32, batch 16, 256x256 by default):
  * a training step (forward, cross-entropy, backward, SGD momentum 0.9) and a forward alone (eval
    mode, no activations kept) of the article's network UNet(1, 2, depth=2, base_channels=64) and a
    depth-4 UNet(1, 2, depth=4, base_channels=64), on
      - PyTorch with cuDNN, cudnn.benchmark on, TF32 OFF (the reference: both sides in true float32)
        and TF32 ON (a second figure: what PyTorch does by default for convolutions),
      - the unet_np backends cupy (CUDA C kernels + cuBLAS) and numba-cuda (when it loads here);
    the median of --repeats runs after --warmup runs, each run bracketed by a device synchronize,
    and each backend's ratio to cuDNN (TF32 off);
  * peak GPU memory of each training step: for CuPy, the high-water mark of its memory pool
    (total_bytes after one step that starts from an emptied pool: an upper bound of the bytes in use,
    the weights included); for PyTorch, torch.cuda.max_memory_allocated;
  * where the cupy backend's step goes: CUDA events around every leaf module's forward and backward,
    the loss and the optimizer;
  * the hand-written tiled SGEMMs of kernels/cuda/gemm.cu against cuBLAS at 4096^3 (each checked
    against cuBLAS's result before it is timed);
  * numba-cuda's batched GEMM (kernels/cuda_gemm.py gemm_batched) against cuBLAS on the Winograd
    position GEMMs of this benchmark's networks (36 per convolution, one launch), checked first, and
    the old path (36 launches of the blocked kernel) on the first shape.
Before any timing, the cupy model's logits are checked against PyTorch's on the same weights.
Writes benchmarks/results/gpu-<date>-<device>.json and .md, and prints the markdown.

--volumes (issue 18): the net unet3d, UNet(1, 2, depth=3, base_channels=16, spatial_dims=3), batch
--batch3d (2) at --size3d^3 (64^3), float32, on cupy (kernels/cuda/vol.cu + cuBLAS) and numba-cuda side
by side with PyTorch's 3-D twin (benchmarks/cpu3d.py build_torch: cuDNN's Conv3d, the same weights);
training step and forward, the logits check (1x1x16^3) and the per-layer breakdown of the cupy step.
Writes gpu-<date>-<device>-3d.json / .md. With --smoke: 16^3, numpy backend, torch on the CPU.

A soft time budget (--budget-s) keeps the whole run short: the parts are run most important first
(cuDNN and cupy, then the SGEMMs, the per-layer breakdown, numba-cuda) and a part that would start
after the budget is spent is skipped and says so.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import time
import traceback

import numpy as np

from benchmarks.cpu import _torch_twin_classes

NETS = {
    "article": dict(desc="article net: UNet(1, 2, depth=2, base_channels=64)",
                    kwargs=dict(in_channels=1, num_classes=2, depth=2, base_channels=64)),
    "depth4": dict(desc="depth-4 U-Net: UNet(1, 2, depth=4, base_channels=64)",
                   kwargs=dict(in_channels=1, num_classes=2, depth=4, base_channels=64)),
    # volumes (--volumes): the 3-D U-Net of benchmarks/cpu3d.py, built by UNet itself
    "unet3d": dict(desc="3-D U-Net: UNet(1, 2, depth=3, base_channels=16, spatial_dims=3)",
                   kwargs=dict(in_channels=1, num_classes=2, depth=3, base_channels=16, spatial_dims=3)),
}
GIB = 2.0 ** 30
DEFAULT_BACKENDS = "cupy,cupy-im2col,cupy-tf32,cupy-direct,numba-cuda"
DEFAULT_BACKENDS_3D = "cupy,numba-cuda"          # Winograd and the direct kernel are 2-D only


def is_3d(net):
    return NETS[net]["kwargs"].get("spatial_dims", 2) == 3


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", default="article,depth4",
                   help="comma list of article,depth4,unet3d (unet3d at --batch3d x --size3d^3)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image height = width")
    p.add_argument("--backends", default=None,
                   help="unet_np backends to time; cupy-im2col: the cupy backend with Winograd off "
                        "(winograd='never'), cupy-tf32: with allow_tf32 (compare with torch_tf32_on), "
                        "cupy-direct: Winograd off and every forward through the implicit-GEMM kernel "
                        "(direct='always'; compare with cupy-im2col). Default: "
                        f"{DEFAULT_BACKENDS}; with --volumes {DEFAULT_BACKENDS_3D}")
    p.add_argument("--modes", default="train,forward", help="comma list of train,forward")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compilation, autotuning)")
    p.add_argument("--max-run-s", type=float, default=3.0,
                   help="a case whose warm-up run took longer gets only 2 timed runs")
    p.add_argument("--gemm-n", type=int, default=4096, help="size of the SGEMM comparison (0: skip)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--layers-net", default="article", help="network of the per-layer breakdown")
    p.add_argument("--budget-s", type=float, default=330.0, help="soft time budget for the whole run")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="CPU plumbing check: numpy backend in place of cupy, torch on the CPU, batch 2, 32x32")
    p.add_argument("--volumes", action="store_true",
                   help="the 3-D case instead: net unet3d on cupy and numba-cuda (unless --backends names "
                        "others), batch --batch3d at --size3d^3, per-layer breakdown of unet3d, no SGEMMs")
    p.add_argument("--batch3d", type=int, default=2, help="batch of the 3-D nets")
    p.add_argument("--size3d", type=int, default=64, help="volume depth = height = width of the 3-D nets")
    return p


# ---------------------------------------------------------------------------------------------------
# Devices: synchronisation, events and memory, with CPU stand-ins for --smoke
# ---------------------------------------------------------------------------------------------------
class _CpuEvent:
    def record(self):
        self.t = time.perf_counter()

    def elapsed_ms(self, end):
        return (end.t - self.t) * 1e3


class _CupyEvent:
    def __init__(self):
        import cupy
        self._cupy = cupy
        self.e = cupy.cuda.Event()

    def record(self):
        self.e.record()

    def elapsed_ms(self, end):
        end.e.synchronize()
        return self._cupy.cuda.get_elapsed_time(self.e, end.e)


def _sync_for(name, smoke):
    """A function that waits for all queued work of backend / side ``name``."""
    if smoke:
        return lambda: None
    if name == "torch":
        import torch
        return torch.cuda.synchronize
    if name == "numba-cuda":
        from numba import cuda
        return cuda.synchronize
    import cupy
    return lambda: cupy.cuda.Device().synchronize()


def _free_gpu_memory(smoke):
    gc.collect()
    if smoke:
        return
    try:
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    except Exception:
        pass
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------------
# Models on both sides, with the same weights
# ---------------------------------------------------------------------------------------------------
def torch_model(net, seed, device):
    import torch
    if is_3d(net):        # cpu3d's twin takes its weights from our model, parameter by parameter
        from benchmarks.cpu3d import build_torch
        return build_torch(ours_model(net, "numpy", weights_from_torch(net, seed))).float().to(device)
    ArticleUNet, TorchUNet, _ = _torch_twin_classes()
    torch.manual_seed(seed)
    kw = NETS[net]["kwargs"]
    if net == "article":
        m = ArticleUNet()
    else:
        m = TorchUNet(kw["in_channels"], kw["num_classes"], depth=kw["depth"], base=kw["base_channels"])
    return m.float().to(device)


def weights_from_torch(net, seed):
    """The state_dict (NumPy) of the PyTorch twin: both sides start from the same weights. For a 3-D
    net, our own state_dict with seeded weights (uniform, scaled by 1/sqrt(fan-in) as cpu3d's), which
    torch_model copies into the twin."""
    if is_3d(net):
        import unet_np
        m = unet_np.UNet(**NETS[net]["kwargs"], dtype=np.float32)
        rng = np.random.default_rng(seed)
        for p in m.parameters():
            fan_in = p.data[0].size if p.data.ndim > 1 else 16
            p.data[...] = rng.uniform(-1, 1, p.data.shape) / np.sqrt(fan_in)
        return {k: np.array(v) for k, v in m.state_dict().items()}
    import torch
    m = torch_model(net, seed, "cpu")
    return {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}


def ours_model(net, backend, weights):
    import unet_np
    m = unet_np.UNet(**NETS[net]["kwargs"], dtype=np.float32, backend=backend)
    if weights is not None and is_3d(net):
        m.load_state_dict(weights)
    elif weights is not None:
        m.load_torch_state_dict(weights)
    return m


def unet_forward_flops(model, shape):
    """FLOPs of one forward (2 x multiply-adds of the convolutions), for the GFLOPS columns. shape:
    (N, C, H, W) or (N, C, D, H, W)."""
    from unet_np.nn import Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d
    n, size = shape[0], tuple(shape[2:])
    total = 0
    sizes = {}
    # Spatial size per level: level i runs at (size / 2^i); the block convolutions keep it.
    depth = model.depth
    for i in range(1, depth + 1):
        sizes[f"enc{i}"] = tuple(s >> (i - 1) for s in size)
        sizes[f"dec{i}"] = tuple(s >> (i - 1) for s in size)
        sizes[f"up{i}"] = tuple(s >> i for s in size)          # the input of the up-convolution
    sizes["bottleneck"] = tuple(s >> depth for s in size)
    sizes["final"] = size
    for name, m in model.named_modules():
        top = name.split(".")[0]
        if top not in sizes or not isinstance(m, (Conv2d, Conv3d, ConvTranspose2d, ConvTranspose3d)):
            continue
        # per output (conv) or input (transposed) voxel: in * out * prod(kernel) multiply-adds
        total += 2 * n * int(np.prod(sizes[top])) * m.out_channels * m.in_channels * int(np.prod(m.kernel_size))
    return total


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def time_runs(fn, sync, warmup, repeats, max_run_s):
    """Median wall time (s) of ``repeats`` runs of fn after ``warmup`` runs; each run is synchronised
    on both ends. A slow case (warm-up run > max_run_s) gets 2 timed runs."""
    first = None
    for _ in range(max(1, warmup)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - t0
    if first > max_run_s:
        repeats = min(repeats, 2)
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), runs=len(times),
                times_s=[round(t, 6) for t in times])


def torch_fns(model, x, t, lr=1e-3):
    import torch
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def train():
        model.train()
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()

    def forward():
        model.eval()
        with torch.inference_mode():
            model(x)

    return dict(train=train, forward=forward)


def ours_fns(model, backend, x, t, lr=1e-3):
    from unet_np.nn import CrossEntropyLoss
    from unet_np.optim import SGD
    loss_fn = CrossEntropyLoss(backend=backend)
    opt = SGD(model.parameters(), lr=lr, momentum=0.9)

    def train():
        model.train()
        opt.zero_grad()
        logits = model.forward(x)
        loss_fn.forward(logits, t)
        model.backward(loss_fn.backward())
        opt.step()

    def forward():
        model.eval()
        model.predict(x)

    return dict(train=train, forward=forward), loss_fn, opt


def _device_inputs(backend, x, t):
    """x, t on the backend's device when its array module is CuPy (NumPy otherwise: GPU models accept
    NumPy input)."""
    xp = backend.xp
    if xp.__name__ == "cupy":
        return xp.asarray(x), xp.asarray(t)
    return x, t


# ---------------------------------------------------------------------------------------------------
# The parts
# ---------------------------------------------------------------------------------------------------
def run_torch(net, args, x, t, device, smoke, tf32):
    import torch
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = torch_model(net, args.seed, device)
    tx = torch.from_numpy(x).to(device)
    tt = torch.from_numpy(t).to(device)
    fns = torch_fns(model, tx, tt)
    sync = _sync_for("torch", smoke)
    out = {}
    for mode in args.modes:
        peak = None
        if not smoke:
            _free_gpu_memory(smoke)
            torch.cuda.reset_peak_memory_stats()
        res = time_runs(fns[mode], sync, args.warmup, args.repeats, args.max_run_s)
        if not smoke:
            peak = torch.cuda.max_memory_allocated()
        res["peak_bytes"] = peak
        out[mode] = res
    del model, fns, tx, tt
    _free_gpu_memory(smoke)
    return out


# Variants of the cupy backend timed under names of their own: settings of backend.kernels.
CUPY_VARIANTS = {"cupy-im2col": dict(winograd="never"), "cupy-tf32": dict(allow_tf32=True),
                 # every convolution forward through direct.cu's implicit GEMM (compare with cupy-im2col)
                 "cupy-direct": dict(winograd="never", direct="always")}


def base_backend(name):
    """The unet_np backend a timed name runs on (a cupy variant runs on 'cupy')."""
    return "cupy" if name in CUPY_VARIANTS else name


def run_ours(net, name, args, x, t, weights, smoke):
    from unet_np import backends
    backend = backends.get("numpy" if smoke else base_backend(name))
    k = getattr(backend, "kernels", None)
    variant = CUPY_VARIANTS.get(name, {}) if k is not None else {}
    saved = (k.winograd, k.allow_tf32, k.direct) if k is not None else None
    try:
        if "winograd" in variant:
            k.winograd = variant["winograd"]
        if "direct" in variant:
            k.direct = variant["direct"]
        if variant.get("allow_tf32"):
            k.set_allow_tf32(True)
        return _run_ours(net, name, backend, args, x, t, weights, smoke)
    finally:
        if k is not None:
            k.winograd, k.direct = saved[0], saved[2]
            k.set_allow_tf32(saved[1])


def _run_ours(net, name, backend, args, x, t, weights, smoke):
    model = ours_model(net, backend, weights)
    dx, dt = _device_inputs(backend, x, t)
    fns, loss_fn, _ = ours_fns(model, backend, dx, dt)
    sync = _sync_for(name, smoke)
    out = {}
    for mode in args.modes:
        for _, m in list(model.named_modules()) + [("loss", loss_fn)]:
            m._clear_cache()            # drop the activations a previous mode kept for its backward
        pool = None
        if not smoke and backend.xp.__name__ == "cupy":
            import cupy
            pool = cupy.get_default_memory_pool()
        _free_gpu_memory(smoke)
        res = time_runs(fns[mode], sync, args.warmup, args.repeats, args.max_run_s)
        res["peak_bytes"] = pool.total_bytes() if pool is not None else None
        out[mode] = res
    del model, fns, dx, dt
    _free_gpu_memory(smoke)
    return out


def check_against_torch(net, args, device, weights, smoke):
    """Relative error of the cupy model's logits against PyTorch's (TF32 off), batch 2 at 64x64
    (a 3-D net: batch 1 at 16^3)."""
    import torch
    from unet_np import backends, to_numpy
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, 16, 16, 16) if is_3d(net) else (2, 1, 64, 64), dtype=np.float32)
    tm = torch_model(net, args.seed, device).eval()
    with torch.inference_mode():
        want = tm(torch.from_numpy(x).to(device)).double().cpu().numpy()
    m = ours_model(net, backends.get("numpy" if smoke else "cupy"), weights).eval()
    got = np.asarray(to_numpy(m.predict(x)), dtype=np.float64)
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def layer_breakdown(net, args, x, t, weights, smoke, steps=2):
    """Per leaf module forward / backward times (ms per step) of the cupy backend's training step,
    from CUDA events recorded around every call (--smoke: the clock around the numpy backend)."""
    from collections import defaultdict

    from unet_np import backends
    backend = backends.get("numpy" if smoke else "cupy")
    model = ours_model(net, backend, weights)
    dx, dt = _device_inputs(backend, x, t)
    fns, loss_fn, opt = ours_fns(model, backend, dx, dt)
    Event = _CpuEvent if smoke else _CupyEvent
    sync = _sync_for("cupy", smoke)
    records = []            # (key, start event, end event)
    undo = []

    def wrap(obj, method, key):
        inner = getattr(obj, method)

        def timed(*a, **kw):
            e0, e1 = Event(), Event()
            e0.record()
            try:
                return inner(*a, **kw)
            finally:
                e1.record()
                records.append((key, e0, e1))

        object.__setattr__(obj, method, timed)
        undo.append(lambda: obj.__dict__.pop(method, None))

    leaves = []
    # On a backend that fuses Conv2d -> ReLU (backend.fused), a U-Net block (models/base.py ConvBlock)
    # runs its pairs as one primitive and never calls those layers' forward: it is timed as one unit,
    # type 'ConvBlock', and its layers are not wrapped.
    fused = "conv2d_relu" in getattr(backend, "fused", ())
    units = []
    for name, m in model.named_modules():
        if any(name.startswith(u) for u in units):
            continue
        unit = fused and type(m).__name__ == "ConvBlock"
        if unit:
            units.append(name)
        if unit or not m.children():
            leaves.append((name.rstrip("."), m))
            wrap(m, "forward", (name.rstrip("."), type(m).__name__, "forward"))
            wrap(m, "backward", (name.rstrip("."), type(m).__name__, "backward"))
    wrap(loss_fn, "forward", ("loss", "CrossEntropyLoss", "forward"))
    wrap(loss_fn, "backward", ("loss", "CrossEntropyLoss", "backward"))
    wrap(opt, "step", ("optimizer", "SGD", "step"))
    wrap(opt, "zero_grad", ("optimizer", "SGD", "zero_grad"))
    fns["train"]()                                                   # warm-up
    sync()
    totals = defaultdict(float)
    step_ms = []
    for _ in range(steps):
        records.clear()
        e0, e1 = Event(), Event()
        sync()
        e0.record()
        fns["train"]()
        e1.record()
        sync()
        step_ms.append(e0.elapsed_ms(e1))
        for key, a, b in records:
            totals[key] += a.elapsed_ms(b) / steps
    for u in undo:
        u()
    step = statistics.median(step_ms)
    rows = [dict(name=k[0], type=k[1], phase=k[2], ms=round(v, 4), percent=round(100 * v / step, 2))
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    by_type = defaultdict(float)
    for k, v in totals.items():
        by_type[(k[1], k[2])] += v
    types = [dict(type=k[0], phase=k[1], ms=round(v, 4), percent=round(100 * v / step, 2))
             for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])]
    measured = sum(totals.values())
    del model, fns
    _free_gpu_memory(smoke)
    return dict(net=net, step_ms=round(step, 4), glue_ms=round(step - measured, 4), layers=rows, by_type=types)


def gemm_comparison(n, smoke):
    """The hand-written tiled SGEMMs (gemm.cu v1, v2) against cuBLAS (cupy.matmul), n^3, float32."""
    if smoke:
        return dict(skipped="--smoke: no GPU")
    import cupy
    from unet_np.backends import cupy_backend
    k = cupy_backend.kernels()
    rng = cupy.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=cupy.float32)
    b = rng.standard_normal((n, n), dtype=cupy.float32)

    def timed(fn, repeats=10):
        fn()
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(repeats):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
        return statistics.median(times)

    ref = cupy.matmul(a, b)
    out = dict(n=n, flop=2 * n ** 3)
    t = timed(lambda: cupy.matmul(a, b))
    out["cublas"] = dict(s=t, tflops=2 * n ** 3 / t / 1e12)
    scale = float(cupy.abs(ref).max())
    for v in (1, 2):
        c = k.gemm_tiled(a, b, version=v)
        err = float(cupy.abs(c - ref).max()) / scale
        entry = dict(rel_err_vs_cublas=err)
        if err > 1e-4:
            entry["skipped"] = "wrong result: not timed"
        else:
            t = timed(lambda: k.gemm_tiled(a, b, version=v), repeats=5)
            entry.update(s=t, tflops=2 * n ** 3 / t / 1e12, fraction_of_cublas=out["cublas"]["s"] / t)
        out[f"tiled_v{v}"] = entry
    del a, b, ref
    _free_gpu_memory(False)
    return out


# The Winograd position GEMMs of a batch-16, 256x256 U-Net (F(4x4, 3x3): P = 16 * (S/4)^2 tiles):
# (name, M, N, K, trans_b): forward / input gradient M = U @ V (O x P, K = C) per level, and the
# weight gradient dU = Z @ V^T (O x C, K = P).
WINO_GEMM_SHAPES = (
    ("fwd 64ch 256^2", 64, 65536, 64, False), ("fwd 128ch 128^2", 128, 16384, 128, False),
    ("fwd 256ch 64^2", 256, 4096, 256, False), ("fwd 512ch 32^2", 512, 1024, 512, False),
    ("dW 64ch 256^2", 64, 64, 65536, True), ("dW 256ch 64^2", 256, 256, 4096, True),
)


def numba_gemm_comparison(smoke, batch=36, repeats=5):
    """numba-cuda's batched GEMM (kernels/cuda_gemm.py gemm_batched, default tiles) against cuBLAS
    (cupy.matmul on the stacked (36, M, K) x (36, K, N) arrays) on the Winograd GEMM shapes, float32;
    plus, on the first shape, the old path (36 launches of the blocked layout kernel)."""
    if smoke:
        return dict(skipped="--smoke: no GPU")
    import cupy
    from unet_np.kernels import cuda_gemm

    def timed(fn):
        fn()
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            cupy.cuda.Device().synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rng = cupy.random.default_rng(0)
    out = dict(batch=batch, config=dict(big=cuda_gemm.BATCHED_GPU_CONFIGS[0], small=cuda_gemm.BATCHED_GPU_CONFIGS[1]))
    for i, (name, M, N, K, tb) in enumerate(WINO_GEMM_SHAPES):
        a = rng.standard_normal((batch, M, K), dtype=cupy.float32)
        b = rng.standard_normal((batch, N, K) if tb else (batch, K, N), dtype=cupy.float32)
        bt = b.transpose(0, 2, 1) if tb else b
        flop = 2 * batch * M * N * K
        ref = cupy.matmul(a, bt)
        entry = dict(M=M, N=N, K=K, trans_b=tb, flop=flop)
        t = timed(lambda: cupy.matmul(a, bt))
        entry["cublas"] = dict(s=t, tflops=flop / t / 1e12)
        c = cupy.empty((batch, M, N), dtype=cupy.float32)
        run = lambda: cuda_gemm.gemm_batched(a.reshape(-1), b.reshape(-1), c.reshape(-1), M, N, K,  # noqa: E731
                                             batch=batch, trans_b=tb)
        run()
        err = float(cupy.abs(c - ref).max()) / float(cupy.abs(ref).max())
        entry["batched"] = dict(rel_err_vs_cublas=err)
        if err <= 1e-4:
            t = timed(run)
            entry["batched"].update(s=t, tflops=flop / t / 1e12, fraction_of_cublas=entry["cublas"]["s"] / t)
        if i == 0:                                 # the old path: 36 launches of the layout kernel
            def old():
                for p in range(batch):
                    cuda_gemm.gemm(a[p].reshape(-1), b[p].reshape(-1), c[p].reshape(-1), M, N, K,
                                   cuda_gemm.dense(K), cuda_gemm.dense(K if tb else N, trans=tb), cuda_gemm.dense(N))
            t = timed(old)
            entry["blocked_36_launches"] = dict(s=t, tflops=flop / t / 1e12, fraction_of_cublas=entry["cublas"]["s"] / t)
        out[name] = entry
        print(f"numba-cuda GEMM {name} (36 x {M}x{N}x{K}{' B^T' if tb else ''}): cuBLAS "
              f"{entry['cublas']['tflops']:.2f} TFLOPS, gemm_batched "
              f"{entry['batched'].get('tflops', float('nan')):.2f} (err {err:.1e})", flush=True)
    _free_gpu_memory(False)
    return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------
def machine_info(smoke):
    info = dict(python=platform.python_version(), numpy=np.__version__, host=platform.node(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    try:
        import torch
        info["torch"] = torch.__version__
        if not smoke and torch.cuda.is_available():
            info["cudnn"] = torch.backends.cudnn.version()
            info["device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    if not smoke:
        try:
            import cupy
            info["cupy"] = cupy.__version__
            rt = cupy.cuda.runtime
            info["cuda_runtime"] = rt.runtimeGetVersion()
            info["cuda_driver"] = rt.driverGetVersion()
            props = rt.getDeviceProperties(0)
            name = props["name"]
            info["device"] = name.decode() if isinstance(name, bytes) else str(name)
            info["device_memory_gib"] = round(props["totalGlobalMem"] / GIB, 1)
        except Exception as exc:
            info["cupy_error"] = f"{type(exc).__name__}: {exc}"
    try:
        import numba
        info["numba"] = numba.__version__
    except Exception:
        pass
    info.setdefault("device", "cpu-smoke" if smoke else "unknown")
    return info


def _ms(entry):
    if not isinstance(entry, dict) or "median_s" not in entry:
        return None
    return entry["median_s"] * 1e3


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def to_markdown(res):
    info, cfg = res["machine"], res["config"]
    lines = [f"# GPU benchmark: {info.get('device')} ({info['date'][:10]})", ""]
    size = f"{cfg['size']}^3 volumes" if cfg.get("volumes") else f"{cfg['size']}x{cfg['size']}"
    lines.append(f"float32, batch {cfg['batch']}, {size}; median of {cfg['repeats']} "
                 f"runs after {cfg['warmup']} warm-up runs, each bracketed by a device synchronize. "
                 f"PyTorch {info.get('torch')} + cuDNN {info.get('cudnn')}, cudnn.benchmark on; CuPy "
                 f"{info.get('cupy')}, CUDA runtime {info.get('cuda_runtime')}, driver {info.get('cuda_driver')}.")
    lines.append("Training step = forward, cross-entropy, backward, SGD momentum 0.9; forward = eval mode, "
                 "nothing kept for a backward. Ratio = time / cuDNN (TF32 off); < 1 is faster than cuDNN.")
    lines.append("")
    backs = [b for b in cfg["backends"]]
    head = "| network | mode | cuDNN TF32 off (ms) | cuDNN TF32 on (ms) |"
    sep = "|---|---|---|---|"
    for b in backs:
        head += f" {b} (ms) | {b} / cuDNN |"
        sep += "---|---|"
    lines += [head, sep]
    for net, r in res["nets"].items():
        for mode in cfg["modes"]:
            ref = _ms(r.get("torch_tf32_off", {}).get(mode))
            row = f"| {net} | {mode} | {_fmt(ref)} | {_fmt(_ms(r.get('torch_tf32_on', {}).get(mode)))} |"
            for b in backs:
                got = r.get(b, {})
                v = _ms(got.get(mode)) if isinstance(got, dict) else None
                note = got.get("skipped") or got.get("error") if isinstance(got, dict) else None
                ratio = None if (v is None or not ref) else v / ref
                row += f" {_fmt(v) if v is not None else (note or '-')[:60]} | {_fmt(ratio, '.2f')} |"
            lines.append(row)
    lines.append("")
    lines.append("Peak GPU memory of a training step (GiB; CuPy: memory-pool high-water mark, an upper bound; "
                 "PyTorch: max_memory_allocated):")
    lines.append("")
    lines.append("| network | cuDNN TF32 off | " + " | ".join(backs) + " |")
    lines.append("|---|---|" + "---|" * len(backs))
    for net, r in res["nets"].items():
        def peak(side):
            e = r.get(side, {})
            e = e.get("train") if isinstance(e, dict) else None
            p = e.get("peak_bytes") if isinstance(e, dict) else None
            return _fmt(None if p is None else p / GIB, ".2f")
        lines.append(f"| {net} | {peak('torch_tf32_off')} | " + " | ".join(peak(b) for b in backs) + " |")
    for net, r in res["nets"].items():
        if "flops_forward" in r:
            lines.append("")
            lines.append(f"{net}: {r['flops_forward'] / 1e9:.1f} GFLOP per forward; logits of the cupy model vs "
                         f"PyTorch (TF32 off, {'1x1x16^3' if is_3d(net) else '2x1x64x64'}): relative error {_fmt(r.get('check_rel_err'), '.2e')}.")
    g = res.get("gemm")
    if isinstance(g, dict) and "cublas" in g:
        lines += ["", f"SGEMM {g['n']}^3 (float32):", "", "| kernel | ms | TFLOPS | fraction of cuBLAS | rel. err |",
                  "|---|---|---|---|---|",
                  f"| cuBLAS (cupy.matmul) | {g['cublas']['s'] * 1e3:.2f} | {g['cublas']['tflops']:.2f} | 1 | 0 |"]
        for v in (1, 2):
            e = g.get(f"tiled_v{v}", {})
            if "s" in e:
                lines.append(f"| gemm.cu tiled v{v} | {e['s'] * 1e3:.2f} | {e['tflops']:.2f} | "
                             f"{e['fraction_of_cublas']:.3f} | {e['rel_err_vs_cublas']:.1e} |")
            else:
                lines.append(f"| gemm.cu tiled v{v} | - | - | - | {e.get('skipped', e.get('error', '-'))} |")
    elif g:
        lines += ["", f"SGEMM: {g.get('skipped') or g.get('error')}"]
    ng = res.get("numba_gemm")
    if isinstance(ng, dict) and any(isinstance(v, dict) and "cublas" in v for v in ng.values()):
        lines += ["", f"numba-cuda gemm_batched on the Winograd GEMM shapes (batch {ng['batch']}, float32; "
                      "issue 16 target: >= 0.5 of cuBLAS):", "",
                  "| shape | M x N x K | cuBLAS TFLOPS | gemm_batched TFLOPS | fraction of cuBLAS | rel. err |",
                  "|---|---|---|---|---|---|"]
        for name, e in ng.items():
            if not (isinstance(e, dict) and "cublas" in e):
                continue
            bt = e["batched"]
            frac = f"{bt['fraction_of_cublas']:.3f}" if "fraction_of_cublas" in bt else "not timed"
            lines.append(f"| {name} | {e['M']}x{e['N']}x{e['K']}{' (B^T)' if e['trans_b'] else ''} | "
                         f"{e['cublas']['tflops']:.2f} | {_fmt(bt.get('tflops'), '.2f')} | {frac} | "
                         f"{bt['rel_err_vs_cublas']:.1e} |")
            if "blocked_36_launches" in e:
                old = e["blocked_36_launches"]
                lines.append(f"| {name}, old path (36 launches) | | | {old['tflops']:.2f} | "
                             f"{old['fraction_of_cublas']:.3f} | |")
    elif ng:
        lines += ["", f"numba-cuda GEMM: {ng.get('skipped') or ng.get('error')}"]
    lb = res.get("layers")
    if isinstance(lb, dict) and "by_type" in lb:
        lines += ["", f"Where the cupy training step goes ({lb['net']}, {lb['step_ms']:.1f} ms per step by CUDA "
                      f"events; glue = the step less every measured call: {lb['glue_ms']:.1f} ms):", "",
                  "| layer type | phase | ms | % of step |", "|---|---|---|---|"]
        for row in lb["by_type"]:
            lines.append(f"| {row['type']} | {row['phase']} | {row['ms']:.2f} | {row['percent']:.1f} |")
        lines += ["", "The slowest single calls:", "", "| module | type | phase | ms | % |", "|---|---|---|---|---|"]
        for row in lb["layers"][:15]:
            lines.append(f"| {row['name']} | {row['type']} | {row['phase']} | {row['ms']:.2f} | {row['percent']:.1f} |")
    elif lb:
        lines += ["", f"Per-layer breakdown: {lb.get('skipped') or lb.get('error')}"]
    if res.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def _slug(s):
    return re.sub(r"[^a-z0-9]+", "-", str(s).lower()).strip("-") or "device"


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.backends is None:
        args.backends = DEFAULT_BACKENDS_3D if args.volumes else DEFAULT_BACKENDS
    if args.volumes:
        args.nets, args.layers_net, args.gemm_n = "unet3d", "unet3d", 0
    if args.smoke:
        args.batch, args.size = min(args.batch, 2), min(args.size, 32)
        args.batch3d, args.size3d = min(args.batch3d, 2), min(args.size3d, 16)
        args.repeats, args.warmup, args.gemm_n = min(args.repeats, 2), 1, 0
    args.nets = [n for n in args.nets.split(",") if n]
    args.modes = [m for m in args.modes.split(",") if m]
    for n in args.nets:
        if n not in NETS:
            raise SystemExit(f"unknown net {n!r}: expected one of {', '.join(NETS)}")
    backs = [b for b in args.backends.split(",") if b]
    t_start = time.perf_counter()

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    info = machine_info(args.smoke)
    res = dict(machine=info, config=dict(batch=args.batch3d if args.volumes else args.batch,
                                         size=args.size3d if args.volumes else args.size, repeats=args.repeats,
                                         warmup=args.warmup, modes=args.modes, backends=backs,
                                         nets=args.nets, smoke=args.smoke, budget_s=args.budget_s,
                                         volumes=args.volumes),
               nets={}, notes=[])
    print(f"device: {info.get('device')}; torch {info.get('torch')}, cupy {info.get('cupy')}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gpu-{datetime.date.today().isoformat()}-{_slug(info.get('device'))}"
                                  f"{'-3d' if args.volumes else ''}")

    def save(final=False):
        """Write the JSON and markdown so far (after every part: a run cut short keeps its results)."""
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        res["complete"] = final
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1, default=str)
        md = to_markdown(res)
        with open(stem + ".md", "w") as f:
            f.write(md)
        if final:
            print(md)
            print(f"wrote {stem}.json and .md ({res['elapsed_s']} s)")
    have_torch = False
    if not args.no_torch:
        try:
            import torch
            have_torch = args.smoke or torch.cuda.is_available()
        except ImportError:
            res["notes"].append("PyTorch is not installed: no cuDNN figures")
    device = "cpu" if args.smoke else "cuda"
    from unet_np import backends
    usable = {}
    for b in backs:
        if args.smoke:
            usable[b] = None
            continue
        try:
            backends.get(base_backend(b))
            usable[b] = None
        except Exception as exc:
            usable[b] = f"unavailable: {exc}"
            print(f"backend {b}: {usable[b]}", flush=True)

    def inputs(net):
        """(x, t) of a net: batch x 1 x size^2 images, or (a 3-D net) batch3d x 1 x size3d^3 volumes."""
        rng = np.random.default_rng(args.seed)
        batch, size = (args.batch3d, (args.size3d,) * 3) if is_3d(net) else (args.batch, (args.size,) * 2)
        return (rng.standard_normal((batch, 1) + size, dtype=np.float32),
                rng.integers(0, 2, size=(batch,) + size, dtype=np.int64))

    # Most important first: cuDNN and cupy on every net, then the SGEMMs, layers, numba-cuda.
    order = [b for b in backs if b != "numba-cuda"]
    late = [b for b in backs if b == "numba-cuda"]
    for net in args.nets:
        r = res["nets"].setdefault(net, {})
        x, t = inputs(net)
        weights = weights_from_torch(net, args.seed) if have_torch else None
        r["desc"] = NETS[net]["desc"]
        try:
            r["flops_forward"] = unet_forward_flops(ours_model(net, "numpy", None), x.shape)
        except Exception as exc:
            r["flops_error"] = str(exc)
        if have_torch and ("cupy" in backs and usable.get("cupy") is None):
            try:
                r["check_rel_err"] = check_against_torch(net, args, device, weights, args.smoke)
                print(f"[{net}] cupy logits vs PyTorch: relative error {r['check_rel_err']:.2e}", flush=True)
                if r["check_rel_err"] > 1e-3:
                    res["notes"].append(f"{net}: the cupy model's logits differ from PyTorch's by "
                                        f"{r['check_rel_err']:.2e} (relative): check before trusting timings")
            except Exception as exc:
                r["check_error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
        if have_torch:
            for tf32 in (False, True):
                key = f"torch_tf32_{'on' if tf32 else 'off'}"
                if left() < 0:
                    r[key] = dict(skipped="time budget spent")
                    continue
                try:
                    r[key] = run_torch(net, args, x, t, device, args.smoke, tf32)
                    print(f"[{net}] {key}: " + ", ".join(f"{m} {_ms(r[key][m]):.2f} ms" for m in args.modes),
                          flush=True)
                except Exception as exc:
                    r[key] = dict(error=f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                save()
        for b in order:
            r[b] = _run_backend(net, b, args, x, t, weights, usable, left)
            save()
    if args.gemm_n and not args.smoke:
        if left() < 0 or usable.get("cupy") is not None:
            res["gemm"] = dict(skipped="time budget spent" if left() < 0 else "cupy unavailable")
        else:
            try:
                res["gemm"] = gemm_comparison(args.gemm_n, args.smoke)
                g = res["gemm"]
                print(f"SGEMM {args.gemm_n}^3: cuBLAS {g['cublas']['tflops']:.2f} TFLOPS; " + ", ".join(
                    f"v{v} {g[f'tiled_v{v}'].get('tflops', float('nan')):.2f}" for v in (1, 2)), flush=True)
            except Exception as exc:
                res["gemm"] = dict(error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
        save()
    if args.gemm_n and not args.smoke and "numba-cuda" in backs:
        if left() < 0 or usable.get("cupy") is not None:
            res["numba_gemm"] = dict(skipped="time budget spent" if left() < 0 else "cupy unavailable")
        else:
            try:
                res["numba_gemm"] = numba_gemm_comparison(args.smoke)
            except Exception as exc:
                res["numba_gemm"] = dict(error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
        save()
    if not args.no_layers and "cupy" in backs:
        if left() < 0 or usable.get("cupy") is not None:
            res["layers"] = dict(skipped="time budget spent" if left() < 0 else "cupy unavailable")
        else:
            try:
                res["layers"] = layer_breakdown(args.layers_net, args, *inputs(args.layers_net),
                                                weights_from_torch(args.layers_net, args.seed) if have_torch else None,
                                                args.smoke)
                print(f"per-layer breakdown: {res['layers']['step_ms']:.2f} ms per step", flush=True)
            except Exception as exc:
                res["layers"] = dict(error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
        save()
    for b in late:
        for net in args.nets:
            weights = weights_from_torch(net, args.seed) if have_torch else None
            res["nets"][net][b] = _run_backend(net, b, args, *inputs(net), weights, usable, left)
            save()
    save(final=True)
    return res


def _run_backend(net, b, args, x, t, weights, usable, left):
    if usable.get(b) is not None:
        return dict(skipped=usable[b])
    if left() < 0:
        return dict(skipped="time budget spent")
    try:
        out = run_ours(net, b, args, x, t, weights, args.smoke)
        print(f"[{net}] {b}: " + ", ".join(f"{m} {_ms(out[m]):.2f} ms" for m in args.modes), flush=True)
        return out
    except Exception as exc:
        traceback.print_exc()
        _free_gpu_memory(args.smoke)
        return dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")


if __name__ == "__main__":
    main()

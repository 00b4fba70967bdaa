"""CPU benchmark: unet_np against PyTorch on the same network, weights, inputs and threads.

    python -m benchmarks.cpu [--quick] [--threads 2] [--out benchmarks/results]
    python -m benchmarks.cpu --profile-only          # only the per-layer breakdown

What it does (see benchmarks/README.md for how to read it):
  * cleans its own environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some machines for old
    OpenBLAS builds, they slow a current NumPy) are removed by re-executing itself without them, and
    OMP/OPENBLAS/MKL/NUMBA thread counts are set to --threads, all before NumPy is imported; and
    OPENBLAS_THREAD_TIMEOUT=4 (unless set, or --blas-spin): OpenBLAS's idle threads go to sleep at once
    instead of spinning for about 0.1 s after each GEMM. In this interleaved comparison the spinning
    threads took a core from whatever ran next: unet_np's Numba kernels, and PyTorch's own step (at
    batch 1, 64x64 PyTorch's step took 0.19-0.22 s with them spinning and 0.12 s without);
  * waits --settle-s (0.05 s, untimed, busy on the main thread) before each timed call, so that the
    threads the other side left spinning (PyTorch's OpenMP workers, ~10 ms after each op) are idle
    when it starts;
  * measures the machine's float32 GEMM peak (np.matmul 2048^3);
  * times a training step (forward, cross-entropy, backward, SGD momentum 0.9) and a forward alone
    for the article's UNet(1, 2, depth=2, base_channels=64) and a depth-4 UNet(1, 2, depth=4,
    base_channels=64), unet_np and PyTorch interleaved in one process, median of several runs;
  * measures peak memory of each side in a fresh child process ('spawn');
  * breaks one unet_np training step down by layer;
  * writes results/cpu-<date>.json, cpu-latest.json, cpu-latest.md and cpu-latest.png (a --quick,
    --profile-only or narrowed run: cpu-quick-*, cpu-profile-*, cpu-partial-*, so that it never
    replaces the full sweep's files).

Nothing is imported at the top that could load a BLAS library before the environment is settled.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_REMOVE = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS")
_UNSET_NOTE = "UNET_NP_BENCH_UNSET"  # what the re-exec removed, for the report
_QUIET_BLAS = ("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles of spinning, then sleep (default 2^28)


def _default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a small subset: article net, batch 1 and 4, 64x64 and 128x128")
    p.add_argument("--threads", type=int, default=_default_threads(),
                   help="threads for BLAS / OpenMP / PyTorch (default: the CPUs this process may use)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    p.add_argument("--backend", default="numpy", help="unet_np backend (default numpy)")
    p.add_argument("--nets", default=None, help="comma list of article,depth4 (default both; quick: article)")
    p.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,4,8)")
    p.add_argument("--sizes", default=None, help="comma list of image sizes (default 64,128,256)")
    p.add_argument("--modes", default="train,forward", help="comma list of train,forward")
    p.add_argument("--max-step-s", type=float, default=25.0,
                   help="skip a case whose unet_np iteration is estimated to take longer (seconds)")
    p.add_argument("--target-s", type=float, default=None,
                   help="time to spend measuring each case, both sides (default 12; quick 5)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--max-repeats", type=int, default=15)
    p.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer breakdown")
    p.add_argument("--profile-only", action="store_true", help="only the per-layer breakdown")
    p.add_argument("--profile-net", default="article")
    p.add_argument("--profile-batch", type=int, default=8)
    p.add_argument("--profile-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=0.05,
                   help="untimed busy wait before each timed call, so that the other side's spinning threads "
                        "have gone idle (PyTorch's OpenMP workers spin some milliseconds after each op)")
    p.add_argument("--blas-spin", action="store_true",
                   help="leave OPENBLAS_THREAD_TIMEOUT unset (OpenBLAS threads spin ~0.1 s after each GEMM)")
    return p


def bootstrap(argv):
    """Settle the environment of this process before NumPy is imported: re-exec without
    OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE if either is set, and set the thread-count variables and
    (without --blas-spin, unless already set) OPENBLAS_THREAD_TIMEOUT."""
    args = build_parser().parse_args(argv)
    threads = str(max(1, args.threads))
    if args.blas_spin:
        os.environ.pop(_QUIET_BLAS[0], None)
    else:
        os.environ.setdefault(*_QUIET_BLAS)
    present = {k: os.environ[k] for k in _REMOVE if k in os.environ}
    if present:
        if "numpy" in sys.modules:
            raise RuntimeError("benchmarks.cpu: NumPy was imported before the environment was cleaned")
        env = {k: v for k, v in os.environ.items() if k not in _REMOVE}
        env.update({k: threads for k in _THREAD_VARS})
        env[_UNSET_NOTE] = json.dumps(present)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.cpu", *argv], env)
    for k in _THREAD_VARS:
        os.environ[k] = threads
    return args


if __name__ == "__main__":
    _ARGS = bootstrap(sys.argv[1:])

import numpy as np  # noqa: E402  (after bootstrap on purpose)

from benchmarks.profile_layers import format_profile, profile_layers  # noqa: E402

MIB = 2.0 ** 20

# The networks: name -> (description, UNet keyword arguments, which PyTorch twin).
NETS = {
    "article": dict(desc="article net: UNet(1, 2, depth=2, base_channels=64)",
                    kwargs=dict(in_channels=1, num_classes=2, depth=2, base_channels=64), torch="article"),
    "depth4": dict(desc="depth-4 U-Net: UNet(1, 2, depth=4, base_channels=64)",
                   kwargs=dict(in_channels=1, num_classes=2, depth=4, base_channels=64), torch="generic"),
}


# ---------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------
def layer_flops(model, input_shape):
    """Per convolution of ``model``: (name, type, input shape, output shape, MACs) for an input of
    ``input_shape``. The shapes are recorded in one forward (model.predict, batch 1, zeros) through
    wrappers on every Conv2d / ConvTranspose2d instance; MACs scale with the batch exactly.

    Conv2d: MACs = N * C_out * H_out * W_out * C_in * kh * kw (every output takes one window).
    ConvTranspose2d: MACs = N * C_in * H_in * W_in * C_out * kh * kw (every input pixel scatters one
    kernel), whatever the stride and padding (the padding crops outputs, not work).
    """
    from unet_np.nn import Conv2d, ConvTranspose2d

    n = int(input_shape[0])
    seen = []
    undo = []
    for name, m in model.named_modules():
        if isinstance(m, (Conv2d, ConvTranspose2d)):
            inner = m.forward

            def rec(x, *a, _inner=inner, _name=name.rstrip(".") or type(m).__name__, _m=m, **k):
                y = _inner(x, *a, **k)
                seen.append((_name, _m, tuple(x.shape), tuple(y.shape)))
                return y

            object.__setattr__(m, "forward", rec)
            undo.append(m)
    try:
        x = np.zeros((1,) + tuple(int(s) for s in input_shape[1:]), dtype=model.dtype)
        model.predict(x)
    finally:
        for m in undo:
            m.__dict__.pop("forward", None)
    out = []
    for name, m, xs, ys in seen:
        kh, kw = m.kernel_size
        if isinstance(m, ConvTranspose2d):
            macs = xs[1] * xs[2] * xs[3] * m.out_channels * kh * kw
        else:
            macs = ys[1] * ys[2] * ys[3] * m.in_channels * kh * kw
        out.append(dict(name=name, type=type(m).__name__, input=[n, *xs[1:]], output=[n, *ys[1:]],
                        macs=int(macs) * n))
    return out


def unet_flops(model, input_shape):
    """Forward FLOPs of ``model`` on ``input_shape`` (N, C, H, W): 2 x the MACs of every Conv2d and
    ConvTranspose2d (the rest -- ReLU, pooling, concatenation, loss -- is not counted). A training
    step is counted as 3x this (forward, input gradient, weight gradient)."""
    return 2 * sum(e["macs"] for e in layer_flops(model, input_shape))


# ---------------------------------------------------------------------------------------------------
# Machine, BLAS, GEMM peak
# ---------------------------------------------------------------------------------------------------
def machine_info(threads):
    info = dict(platform=platform.platform(), python=platform.python_version(),
                logical_cpus=os.cpu_count(), threads=threads)
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["avx2"] = "avx2" in flags
        info["avx512f"] = "avx512f" in flags
    except OSError:
        info["cpu_model"] = platform.processor()
    try:
        import psutil
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    return info


def blas_info():
    """threadpoolctl's view of the loaded BLAS / OpenMP libraries (which kernel ran)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [dict(error="threadpoolctl not installed")]
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture",
            "threading_layer", "filepath")
    return [{k: e.get(k) for k in keep if k in e} for e in threadpool_info()]


def sgemm_peak(n=2048, repeats=5):
    """float32 np.matmul n^3 after one warm-up: median seconds and GFLOPS (2 n^3 FLOPs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return dict(n=n, repeats=repeats, times_s=times, median_s=med, gflops=2 * n ** 3 / med / 1e9)


def torch_sgemm(n=2048, repeats=5):
    import torch
    a = torch.randn(n, n, dtype=torch.float32)
    b = torch.randn(n, n, dtype=torch.float32)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return dict(n=n, median_s=med, gflops=2 * n ** 3 / med / 1e9)


def versions():
    import unet_np
    out = dict(numpy=np.__version__, unet_np=getattr(unet_np, "__version__", "?"))
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except ImportError:
        out["torch"] = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out["git"] = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ---------------------------------------------------------------------------------------------------
# Models on both sides
# ---------------------------------------------------------------------------------------------------
def _torch_twin_classes():
    """The PyTorch networks of tests/models/torch_reference.py, validated against unet_np there.
    The benchmarks run from the source checkout (python -m benchmarks....), where tests/ is importable."""
    from tests.models.torch_reference import ArticleUNet, TorchUNet
    return ArticleUNet, TorchUNet, "tests.models.torch_reference"


def build_pair(spec, backend="numpy", seed=0, with_torch=True, with_ours=True):
    """(unet_np model, torch model) with the same float32 weights (PyTorch's init, copied over)."""
    import unet_np
    ours = theirs = None
    if with_torch:
        import torch
        ArticleUNet, TorchUNet, _ = _torch_twin_classes()
        torch.manual_seed(seed)
        kw = spec["kwargs"]
        if spec.get("torch") == "article":
            theirs = ArticleUNet()
        else:
            theirs = TorchUNet(kw["in_channels"], kw["num_classes"], depth=kw["depth"], base=kw["base_channels"])
        theirs = theirs.float()
    if with_ours:
        ours = unet_np.UNet(**spec["kwargs"], dtype=np.float32, backend=backend)
        if theirs is not None:
            ours.load_torch_state_dict(theirs.state_dict())
    return ours, theirs


def check_same_weights(ours, theirs, size):
    """Max |difference| of the two sides' logits on one random image, relative to max |logits|."""
    import torch
    x = np.random.default_rng(1).standard_normal((1, ours.in_channels, size, size), dtype=np.float32)
    ours.eval()
    theirs.eval()
    a = np.asarray(ours.predict(x), dtype=np.float64)
    with torch.inference_mode():
        b = theirs(torch.from_numpy(x)).double().numpy()
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def make_inputs(batch, size, cin, ncls, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cin, size, size), dtype=np.float32)
    t = rng.integers(0, ncls, size=(batch, size, size), dtype=np.int64)
    return x, t


def step_fns(ours, theirs, x, t, lr=1e-3):
    """Closures for one training step and one forward of each side (None where a side is absent)."""
    from unet_np.nn.loss import CrossEntropyLoss
    from unet_np.optim import SGD
    fns = {}
    if ours is not None:
        loss = CrossEntropyLoss()
        opt = SGD(ours.parameters(), lr=lr, momentum=0.9)

        def ours_train():
            ours.train()
            opt.zero_grad()
            logits = ours.forward(x)
            loss.forward(logits, t)
            ours.backward(loss.backward(), input_grad=False)  # the image needs no gradient
            opt.step()

        def ours_forward():
            ours.eval()
            ours.predict(x)

        fns["unet_np"] = dict(train=ours_train, forward=ours_forward)
    if theirs is not None:
        import torch
        tx, tt = torch.from_numpy(x), torch.from_numpy(t)
        tloss = torch.nn.CrossEntropyLoss()
        topt = torch.optim.SGD(theirs.parameters(), lr=lr, momentum=0.9)

        def torch_train():
            theirs.train()
            topt.zero_grad()
            out = tloss(theirs(tx), tt)
            out.backward()
            topt.step()

        def torch_forward():
            theirs.eval()
            with torch.inference_mode():
                theirs(tx)

        fns["torch"] = dict(train=torch_train, forward=torch_forward)
    return fns


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _settle(seconds):
    """Wait ``seconds`` busily on this thread. (A sleep instead let the next timed call start slow:
    article net forward at batch 1, 64x64, ratio 1.23 after a 50 ms sleep, 0.81 after the busy wait,
    0.73-0.83 with no wait, in one session.)"""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_interleaved(fa, fb, target_s=10.0, min_repeats=3, max_repeats=15, warmup=None, settle_s=0.0):
    """Time fa and fb alternately (a, b, a, b, ...) after warm-up; the number of repeats is chosen
    from the warm-up times so that the measurement takes about target_s. Before each timed call the
    process waits settle_s (untimed), so that the threads the other side left spinning have gone
    idle. Returns two lists of seconds and the warm-up count."""
    wa = _timed(fa)
    wb = _timed(fb)
    if warmup is None:
        warmup = 1 if wa + wb > 2.0 else 2
    for _ in range(warmup - 1):
        wa = _timed(fa)
        wb = _timed(fb)
    repeats = int(max(min_repeats, min(max_repeats, target_s // max(wa + wb, 1e-6))))
    ta, tb = [], []
    for _ in range(repeats):
        gc.collect()
        _settle(settle_s)
        ta.append(_timed(fa))
        _settle(settle_s)
        tb.append(_timed(fb))
    return ta, tb, warmup


# ---------------------------------------------------------------------------------------------------
# Memory (child processes)
# ---------------------------------------------------------------------------------------------------
_MEMORY_METHOD = (
    "Each side runs alone in a fresh child process (multiprocessing 'spawn', same thread settings). "
    "Baseline = the child's RSS after imports, model build and input creation. Forward: one warm-up "
    "forward, then the kernel's peak-RSS mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs and "
    "one forward (unet_np: predict in eval mode; torch: inference_mode) runs; peak = VmHWM - baseline. "
    "Train: one warm-up training step, reset, one training step (forward, CE, backward, SGD momentum "
    "0.9); peak = VmHWM - baseline (includes gradients, momentum buffers and memory the allocator kept "
    "from the warm-up). Where clear_refs cannot be written, ru_maxrss (lifetime peak) - baseline is used. "
    "unet_np also reports tracemalloc's peak over the same forward / step (NumPy's array allocations are "
    "traced), relative to what was allocated when tracing started.")


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_bytes():
    v = _status_kib("VmRSS")
    if v is not None:
        return v * 1024
    import psutil
    return psutil.Process().memory_info().rss


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(reset_ok):
    if reset_ok:
        v = _status_kib("VmHWM")
        if v is not None:
            return v * 1024, "VmHWM"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _memory_child(spec, side, batch, size, threads, backend, seed):
    """Runs in a spawned child: peak memory of one forward and one training step of one side."""
    import tracemalloc
    if side == "torch":
        import torch
        torch.set_num_threads(threads)
    ours, theirs = build_pair(spec, backend=backend, seed=seed, with_torch=(side == "torch"),
                              with_ours=(side == "unet_np"))
    kw = spec["kwargs"]
    x, t = make_inputs(batch, size, kw["in_channels"], kw["num_classes"], seed)
    fns = step_fns(ours, theirs, x, t)[side]
    gc.collect()
    base = _rss_bytes()
    out = dict(side=side, baseline_mib=base / MIB)
    for mode in ("forward", "train"):
        fns[mode]()  # warm-up
        gc.collect()
        tracing = side == "unet_np"
        if tracing:
            tracemalloc.start()
            traced0 = tracemalloc.get_traced_memory()[0]
        ok = _reset_peak()
        fns[mode]()
        peak, how = _peak_bytes(ok)
        res = dict(peak_rss_growth_mib=(peak - base) / MIB, peak_source=how,
                   rss_after_mib=(_rss_bytes() - base) / MIB)
        if tracing:
            res["tracemalloc_peak_mib"] = (tracemalloc.get_traced_memory()[1] - traced0) / MIB
            tracemalloc.stop()
        out[mode] = res
    import resource
    out["ru_maxrss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / MIB
    return out


def _memory_child_entry(conn, *args):
    try:
        conn.send(("ok", _memory_child(*args)))
    except BaseException as e:  # report anything, MemoryError included, to the parent
        import traceback
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
    finally:
        conn.close()


def measure_memory(spec, side, batch, size, threads, backend="numpy", seed=0, timeout=900):
    """Peak memory of one side in a fresh 'spawn' child (see _MEMORY_METHOD). A failure (the child
    dies, runs out of memory, times out) is returned as {'error': ...}, never raised."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_memory_child_entry,
                       args=(child, spec, side, batch, size, threads, backend, seed), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout):
            status, value = parent.recv()
        else:
            status, value = "error", f"no answer within {timeout} s"
    except EOFError:
        status, value = "error", "the child process died without an answer"
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status == "ok":
        return value
    err = dict(error=value, side=side)
    err["forward"] = err["train"] = dict(error=value.splitlines()[0] if value else "error")
    err["baseline_mib"] = None
    return err


# ---------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------
def plan_cases(nets, modes, batches, sizes):
    """Cases in order of growing work inside each (net, mode), so that a slow case can be foreseen."""
    cases = []
    for net in nets:
        for mode in modes:
            for size in sorted(sizes):
                for batch in sorted(batches):
                    cases.append(dict(net=net, mode=mode, batch=batch, size=size))
    return cases


def _available_bytes():
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None


def run_benchmark(nets=None, cases=None, threads=1, backend="numpy", seed=0, peak_gflops=None,
                  target_s=10.0, min_repeats=3, max_repeats=15, warmup=None, max_step_s=25.0,
                  memory=True, memory_sides=("unet_np", "torch"), settle_s=0.0, log=print):
    """Time every case (dict net, mode, batch, size) on both sides, interleaved; return the record.

    nets: name -> spec (as NETS); peak_gflops: the sgemm peak the percentages refer to;
    memory: measure peak memory in child processes, for the sides in memory_sides.
    """
    import torch
    torch.set_num_threads(threads)
    nets = nets or NETS
    results, skipped, net_info = [], [], {}
    models = {}
    flops_cache = {}
    last_rate = {}  # (net, mode) -> seconds per FLOP of unet_np in the last case, to foresee slow ones
    mem_cache = {}
    for case in cases:
        name, mode, batch, size = case["net"], case["mode"], case["batch"], case["size"]
        spec = nets[name]
        if name not in models:
            # one pair per network, reused by its cases (the optimizer state restarts per case)
            gc.collect()
            models.clear()
            ours, theirs = build_pair(spec, backend=backend, seed=seed)
            models[name] = (ours, theirs)
            chk = max(16, 2 ** spec["kwargs"]["depth"] * 2)
            net_info[name] = dict(desc=spec["desc"], kwargs=spec["kwargs"],
                                  torch_twin=_torch_twin_classes()[2] + (
                                      ".ArticleUNet" if spec.get("torch") == "article" else ".TorchUNet"),
                                  params=int(sum(p.data.size for p in ours.parameters())),
                                  logits_rel_diff=check_same_weights(ours, theirs, chk))
            log(f"[{name}] {spec['desc']}: {net_info[name]['params']} parameters, same weights on both "
                f"sides (logits rel. diff {net_info[name]['logits_rel_diff']:.1e})")
        ours, theirs = models[name]
        key = (name, size)
        if key not in flops_cache:
            flops_cache[key] = unet_flops(ours, (1, spec["kwargs"]["in_channels"], size, size))
        fwd = flops_cache[key] * batch
        flops = 3 * fwd if mode == "train" else fwd
        label = f"{name} {mode:<7} batch {batch} {size}x{size}"
        need = ours.activation_bytes((batch, spec["kwargs"]["in_channels"], size, size)) \
            if mode == "train" and hasattr(ours, "activation_bytes") else 0
        avail = _available_bytes()
        if avail and 2 * need > 0.8 * avail:
            why = (f"not enough memory: unet_np keeps about {need / 2 ** 30:.1f} GiB for a step, PyTorch "
                   f"similar, {avail / 2 ** 30:.1f} GiB available")
            skipped.append(dict(case, reason=why))
            log(f"  skip {label}: {why}")
            continue
        rate = last_rate.get((name, mode))
        if rate is not None and rate * flops > max_step_s:
            why = (f"too slow: one unet_np iteration estimated at {rate * flops:.0f} s "
                   f"(> --max-step-s {max_step_s:g}) from the previous case")
            skipped.append(dict(case, reason=why))
            log(f"  skip {label}: {why}")
            continue
        x, t = make_inputs(batch, size, spec["kwargs"]["in_channels"], spec["kwargs"]["num_classes"], seed)
        fns = step_fns(ours, theirs, x, t)
        gc.collect()
        ta, tb, w = time_interleaved(fns["unet_np"][mode], fns["torch"][mode], target_s=target_s,
                                     min_repeats=min_repeats, max_repeats=max_repeats, warmup=warmup,
                                     settle_s=settle_s)
        del fns, x, t
        ma, mb = statistics.median(ta), statistics.median(tb)
        last_rate[(name, mode)] = ma / flops
        rec = dict(case, net_desc=spec["desc"], flops=flops, forward_flops=fwd, warmup=w, repeats=len(ta),
                   ratio=ma / mb)
        for side, times, med in (("unet_np", ta, ma), ("torch", tb, mb)):
            g = flops / med / 1e9
            rec[side] = dict(times_s=times, median_s=med, min_s=min(times), gflops=g,
                             pct_peak=(100.0 * g / peak_gflops) if peak_gflops else None)
        if memory:
            mkey = (name, batch, size)
            if mkey not in mem_cache:
                mem_cache[mkey] = {s: measure_memory(spec, s, batch, size, threads, backend, seed)
                                   for s in memory_sides}
            for s in memory_sides:
                m = mem_cache[mkey][s]
                rec[s]["memory"] = dict(m[mode], baseline_mib=m["baseline_mib"])
        results.append(rec)
        mem = ""
        if memory:
            mem = f"  mem {_fmt_mem(rec, 'unet_np')} / {_fmt_mem(rec, 'torch')} MiB"

        log(f"  {label}: unet_np {ma:.4f} s  torch {mb:.4f} s  ratio {ma / mb:.2f}  "
            f"({rec['unet_np']['gflops']:.0f} / {rec['torch']['gflops']:.0f} GFLOPS, {len(ta)} runs){mem}")
    models.clear()
    return dict(nets=net_info, cases=results, skipped=skipped,
                memory_method=_MEMORY_METHOD if memory else None)


def run_profile(spec, batch, size, backend="numpy", seed=0, steps=3, warmup=1):
    from unet_np.nn.loss import CrossEntropyLoss
    from unet_np.optim import SGD
    import unet_np
    model = unet_np.UNet(**spec["kwargs"], dtype=np.float32, backend=backend)
    x, t = make_inputs(batch, size, spec["kwargs"]["in_channels"], spec["kwargs"]["num_classes"], seed)
    prof = profile_layers(model, x, t, CrossEntropyLoss(), SGD(model.parameters(), lr=1e-3, momentum=0.9),
                          steps=steps, warmup=warmup)
    prof["net_desc"] = spec["desc"]
    return prof


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def _fmt_mem(rec, side, key="peak_rss_growth_mib"):
    m = rec[side].get("memory")
    if m and "error" in m:
        return "error"
    if not m or m.get(key) is None:
        return "-"
    return f"{m[key]:.0f}"


def to_markdown(res):
    m, s = res["machine"], res["sgemm"]
    lines = [f"# unet_np vs PyTorch on the CPU ({res['mode']} run, {res['date']})", "",
             "## Machine", "",
             "| | |", "|---|---|",
             f"| CPU | {m.get('cpu_model', '?')} (AVX2 {m.get('avx2')}, AVX-512 {m.get('avx512f')}) |",
             f"| cores | {m.get('logical_cpus')} logical, {m.get('physical_cores')} physical, "
             f"{m.get('affinity_cpus')} usable; **{res['threads']} threads** used |",
             f"| memory | {m.get('memory_gib')} GiB |",
             f"| versions | numpy {res['versions'].get('numpy')}, torch {res['versions'].get('torch')}, "
             f"unet_np {res['versions'].get('unet_np')} ({res['versions'].get('git', '')}), "
             f"Python {m.get('python')}, backend {res['backend']} |"]
    for b in res["blas"]:
        lines.append(f"| {b.get('user_api')} | {b.get('internal_api')} {b.get('version')} "
                     f"({b.get('prefix')}), kernel {b.get('architecture', '-')}, {b.get('num_threads')} threads, "
                     f"{b.get('threading_layer', '')} |")
    lines.append(f"| env removed | {res['env'].get('unset') or 'none were set'} |")
    lines.append(f"| OPENBLAS_THREAD_TIMEOUT | {res['env'].get('OPENBLAS_THREAD_TIMEOUT') or 'unset (--blas-spin)'}"
                 f" (idle OpenBLAS threads sleep instead of spinning into the next step, ours or PyTorch's) |")
    if res.get("settle_s") is not None:
        lines.append(f"| pause before each timed call | {res['settle_s']:g} s, not timed (--settle-s: the "
                     f"other side's spinning threads go idle first) |")
    if res.get("loadavg_start"):
        lines.append(f"| load average | {res['loadavg_start'][0]:.2f} at start, "
                     f"{(res.get('loadavg_end') or [float('nan')])[0]:.2f} at end (1 min; our own run included) |")
    lines.append(f"| sgemm peak | **{s['gflops']:.0f} GFLOPS** (NumPy float32 matmul {s['n']}^3, median of "
                 f"{s['repeats']}); torch.mm {res.get('torch_sgemm', {}).get('gflops', float('nan')):.0f} GFLOPS |")
    lines += ["", "## Networks", ""]
    for name, n in res["nets"].items():
        lines.append(f"- **{name}**: {n['desc']}, {n['params']:,} parameters; PyTorch twin "
                     f"{n['torch_twin']} with the same weights (logits relative difference "
                     f"{n['logits_rel_diff']:.1e})")
    lines += ["", "## Times", "",
              "Median seconds per iteration; ratio = unet_np / PyTorch (below 1: unet_np faster). "
              "GFLOPS from 2 x conv MACs (x3 for a training step); % of the sgemm peak above. "
              "Memory: peak RSS growth in MiB (see below); tm = unet_np's tracemalloc peak.", "",
              "| net | mode | batch | size | GFLOP | unet_np s | torch s | ratio | unet_np GFLOPS | "
              "torch GFLOPS | unet_np % peak | torch % peak | unet_np MiB | torch MiB | unet_np tm MiB | runs |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["cases"]:
        a, b = r["unet_np"], r["torch"]
        pa = f"{a['pct_peak']:.0f}" if a["pct_peak"] is not None else "-"
        pb = f"{b['pct_peak']:.0f}" if b["pct_peak"] is not None else "-"
        lines.append(f"| {r['net']} | {r['mode']} | {r['batch']} | {r['size']} | {r['flops'] / 1e9:.2f} | "
                     f"{a['median_s']:.4f} | {b['median_s']:.4f} | **{r['ratio']:.2f}** | {a['gflops']:.0f} | "
                     f"{b['gflops']:.0f} | {pa} | {pb} | {_fmt_mem(r, 'unet_np')} | {_fmt_mem(r, 'torch')} | "
                     f"{_fmt_mem(r, 'unet_np', 'tracemalloc_peak_mib')} | {r['repeats']} |")
    if res["skipped"]:
        lines += ["", "Skipped:", ""]
        for sk in res["skipped"]:
            lines.append(f"- {sk['net']} {sk['mode']} batch {sk['batch']} {sk['size']}x{sk['size']}: {sk['reason']}")
    if res.get("memory_method"):
        lines += ["", "## How memory was measured", "", res["memory_method"]]
    p = res.get("profile")
    if p:
        lines += ["", f"## Where unet_np's training step goes ({p['net_desc']}, input {tuple(p['input_shape'])})",
                  "", f"Median step {p['step_s']:.3f} s (mean {p['step_mean_s']:.3f} s of {p['steps']} "
                  f"after {p['warmup']} warm-up). Each leaf module's forward/backward timed by wrapping "
                  f"the instance methods with perf_counter.", "",
                  "| layer type | phase | ms / step | % of step |", "|---|---|---:|---:|"]
        for e in p["by_type"]:
            lines.append(f"| {e['type']} | {e['phase']} | {e['seconds'] * 1e3:.1f} | {e['percent']:.1f} |")
        lines += ["", "| module | type | phase | ms / step | % of step |", "|---|---|---|---:|---:|"]
        for e in p["by_name"][:20]:
            lines.append(f"| {e['name']} | {e['type']} | {e['phase']} | {e['seconds'] * 1e3:.1f} | "
                         f"{e['percent']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def plot(res, path):
    """Time against pixels (batch 1) and against batch size (128x128), train and forward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    colours = {"unet_np": "tab:blue", "torch": "tab:orange"}
    styles = ["-o", "--s", ":^", "-.d"]
    nets = list(res["nets"])
    drew = False
    for row, mode in enumerate(("train", "forward")):
        for col, (xkey, fixed, fval, xlabel) in enumerate((
                ("pixels", "batch", 1, "pixels per image (batch 1)"),
                ("batch", "size", 128, "batch size (128x128)"))):
            ax = axes[row][col]
            for ni, net in enumerate(nets):
                rows = [r for r in res["cases"] if r["net"] == net and r["mode"] == mode and r[fixed] == fval]
                rows.sort(key=lambda r: r["size"] ** 2 if xkey == "pixels" else r["batch"])
                if not rows:
                    continue
                xs = [r["size"] ** 2 if xkey == "pixels" else r["batch"] for r in rows]
                for side in ("unet_np", "torch"):
                    ax.plot(xs, [r[side]["median_s"] for r in rows], styles[ni % len(styles)],
                            color=colours[side], label=f"{side} {net}")
                    drew = True
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ticks = sorted({x for ln in ax.lines for x in ln.get_xdata()})
            if ticks:
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{int(round(v ** 0.5))}²" if xkey == "pixels" else str(int(v))
                                    for v in ticks])
            fmt = matplotlib.ticker.FormatStrFormatter("%.3g")
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(fmt)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("seconds")
            ax.set_title(f"{'training step' if mode == 'train' else 'forward'}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"unet_np vs PyTorch, CPU, {res['threads']} threads, {res['machine'].get('cpu_model', '')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drew


def results_name(args):
    """'cpu' for the full sweep, whose cpu-latest.* files the README quotes; 'cpu-quick',
    'cpu-profile' or 'cpu-partial' for a smaller run, so that it never replaces them."""
    if args.profile_only:
        return "cpu-profile"
    if args.quick:
        return "cpu-quick"
    if args.nets or args.batches or args.sizes or args.modes != "train,forward":
        return "cpu-partial"
    return "cpu"


def write_outputs(res, out_dir, stamp=None, name="cpu"):
    """JSON (dated and latest), markdown and PNG, as name-<stamp>.json and name-latest.*; returns the
    paths written."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = stamp or datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = dict(json=os.path.join(out_dir, f"{name}-{stamp}.json"),
                 latest=os.path.join(out_dir, f"{name}-latest.json"),
                 md=os.path.join(out_dir, f"{name}-latest.md"), png=os.path.join(out_dir, f"{name}-latest.png"))
    text = json.dumps(res, indent=1, default=float)
    for k in ("json", "latest"):
        with open(paths[k], "w") as f:
            f.write(text)
    with open(paths["md"], "w") as f:
        f.write(to_markdown(res))
    plot(res, paths["png"])
    return paths


def collect(args, log=print):
    """The whole run for parsed arguments: header, sgemm, sweep, profile. Returns the record."""
    threads = max(1, args.threads)
    # torch before unet_np's numba backend: so PyTorch keeps its own OpenMP library with its default
    # settings, and Numba gets a second one with a short spin (see unet_np/backends/numba_backend.py)
    import torch
    torch.set_num_threads(threads)
    unset = json.loads(os.environ.get(_UNSET_NOTE, "null"))
    res = dict(schema="unet_np-cpu-bench/1", date=datetime.datetime.now().isoformat(timespec="seconds"),
               mode="profile-only" if args.profile_only else ("quick" if args.quick else "full"),
               argv=sys.argv[1:], threads=threads, backend=args.backend, settle_s=args.settle_s,
               env=dict(unset=unset, **{k: os.environ.get(k) for k in _THREAD_VARS},
                        OPENBLAS_THREAD_TIMEOUT=os.environ.get(_QUIET_BLAS[0]),
                        torch_num_threads=torch.get_num_threads()),
               machine=machine_info(threads), versions=versions(), blas=blas_info(),
               loadavg_start=list(os.getloadavg()))
    log(f"CPU {res['machine'].get('cpu_model')}, {threads} threads; numpy {np.__version__}, "
        f"torch {torch.__version__}; removed from env: {unset or 'nothing (none set)'}")
    if res["loadavg_start"][0] > 0.5:
        log(f"note: load average {res['loadavg_start'][0]:.1f} at start: other processes share the CPUs, "
            f"absolute times will be noisy (the interleaved ratios less so)")
    for b in res["blas"]:
        log(f"  {b.get('user_api')}: {b.get('internal_api')} {b.get('version')} kernel "
            f"{b.get('architecture', '-')} threads {b.get('num_threads')}")
    res["sgemm"] = sgemm_peak()
    res["torch_sgemm"] = torch_sgemm()
    log(f"sgemm 2048^3 float32: NumPy {res['sgemm']['gflops']:.0f} GFLOPS, torch.mm "
        f"{res['torch_sgemm']['gflops']:.0f} GFLOPS")
    res.update(nets={}, cases=[], skipped=[], memory_method=None)
    if not args.profile_only:
        if args.quick:
            nets = ["article"]
            batches, sizes = [1, 4], [64, 128]
            target = args.target_s or 5.0
        else:
            nets = ["article", "depth4"]
            batches, sizes = [1, 4, 8], [64, 128, 256]
            target = args.target_s or 12.0
        if args.nets:
            nets = args.nets.split(",")
        if args.batches:
            batches = [int(v) for v in args.batches.split(",")]
        if args.sizes:
            sizes = [int(v) for v in args.sizes.split(",")]
        modes = args.modes.split(",")
        cases = plan_cases(nets, modes, batches, sizes)
        log(f"{len(cases)} cases: nets {nets}, modes {modes}, batches {batches}, sizes {sizes}")
        res.update(run_benchmark(NETS, cases, threads=threads, backend=args.backend, seed=args.seed,
                                 peak_gflops=res["sgemm"]["gflops"], target_s=target,
                                 min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                                 max_step_s=args.max_step_s, memory=not args.no_memory,
                                 settle_s=args.settle_s, log=log))
    res["profile"] = None
    if args.profile_only or not args.no_profile:
        prof = run_profile(NETS[args.profile_net], args.profile_batch, args.profile_size,
                           backend=args.backend, seed=args.seed)
        res["profile"] = prof
        log(format_profile(prof))
    return res


def main(args):
    t0 = time.time()
    res = collect(args)
    res["wall_s"] = time.time() - t0
    res["loadavg_end"] = list(os.getloadavg())
    paths = write_outputs(res, args.out, name=results_name(args))
    print(f"done in {res['wall_s']:.0f} s; wrote " + ", ".join(paths.values()))
    return res


if __name__ == "__main__":
    main(_ARGS)

"""CPU benchmark in 3-D: a 3-D U-Net built from unet_np's layers against its PyTorch twin.

    python -m benchmarks.cpu3d [--threads 2] [--backend numba] [--cases 1x64,2x64] [--repeats 5]

The network (depth 3, base 16, same padding, as issue 18 names it): three encoder levels
(16, 32, 64 channels), each two 3x3x3 convolutions + ReLU then a 2x2x2 max-pool; a 128-channel
bottleneck; three decoder levels, each a 2x2x2 stride-2 transposed convolution, the concatenation
[upsampled, skip] and two 3x3x3 convolutions + ReLU; a final 1x1x1 convolution to 2 classes. Ours is
the library's unet_np.UNet(1, 2, depth=3, base_channels=16, spatial_dims=3); PyTorch's twin is built
here from torch.nn. Both sides get the same weights and inputs. Conventions as benchmarks/cpu.py: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed by a
re-exec, thread counts set before NumPy loads, threadpoolctl's view of the libraries reported, a
training step = forward + cross-entropy + backward + SGD (momentum 0.9), timed interleaved with
PyTorch, medians; peak memory (VmHWM growth over one forward / one step) in a fresh spawned child
per side. Writes results/3d/cpu3d-<date>.json and cpu3d-latest.md under --out.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

_REMOVE = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
_UNSET_NOTE = "UNET_NP_BENCH_UNSET"


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu3d", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="numba")
    p.add_argument("--cases", default="1x64,2x64", help="batch x size, comma separated (e.g. 1x96)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--note", default="", help="a line on the machine's state, copied into the report")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "3d"))
    return p


def bootstrap(argv):
    args = build_parser().parse_args(argv)
    threads = str(max(1, args.threads))
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    present = {k: os.environ[k] for k in _REMOVE if k in os.environ}
    if present:
        env = {k: v for k, v in os.environ.items() if k not in _REMOVE}
        env.update({k: threads for k in _THREAD_VARS})
        env[_UNSET_NOTE] = json.dumps(present)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.cpu3d", *argv], env)
    for k in _THREAD_VARS:
        os.environ[k] = threads
    return args


if __name__ == "__main__":
    _ARGS = bootstrap(sys.argv[1:])

import numpy as np  # noqa: E402  (after bootstrap on purpose)

CHANNELS = (16, 32, 64, 128)


# ---------------------------------------------------------------------------------------------------
# The two networks
# ---------------------------------------------------------------------------------------------------
def build_ours(backend, seed=0, dtype=np.float32):
    """The library's own 3-D U-Net, UNet(1, 2, depth=3, base_channels=16, spatial_dims=3), with seeded
    weights (uniform, scaled by 1/sqrt(fan-in)); its parameters come in the order build_torch copies."""
    import unet_np
    net = unet_np.UNet(1, 2, depth=3, base_channels=CHANNELS[0], spatial_dims=3, backend=backend,
                       dtype=dtype)
    rng = np.random.default_rng(seed)
    for p in net.parameters():
        fan_in = p.data[0].size if p.data.ndim > 1 else 16
        p.data[...] = rng.uniform(-1, 1, p.data.shape) / np.sqrt(fan_in)
    return net


def build_torch(ours=None):
    import torch
    from torch import nn as tnn

    def block(cin, cout):
        return tnn.Sequential(tnn.Conv3d(cin, cout, 3, padding=1), tnn.ReLU(inplace=True),
                              tnn.Conv3d(cout, cout, 3, padding=1), tnn.ReLU(inplace=True))

    class UNet3d(tnn.Module):
        def __init__(self):
            super().__init__()
            c = CHANNELS
            self.enc = tnn.ModuleList(block(1 if i == 0 else c[i - 1], c[i]) for i in range(3))
            self.bottleneck = block(c[2], c[3])
            self.up = tnn.ModuleList()
            self.dec = tnn.ModuleList()
            for i in reversed(range(3)):
                self.up.append(tnn.ConvTranspose3d(c[i + 1], c[i], 2, stride=2))
                self.dec.append(block(2 * c[i], c[i]))
            self.final = tnn.Conv3d(c[0], 2, 1)

        def forward(self, x):
            skips = []
            for enc in self.enc:
                x = enc(x)
                skips.append(x)
                x = torch.nn.functional.max_pool3d(x, 2)
            x = self.bottleneck(x)
            for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
                x = dec(torch.cat([up(x), skip], 1))
            return self.final(x)

    net = UNet3d()
    if ours is not None:          # parameters in the same order on both sides
        theirs = [p for _, p in _torch_params_in_order(net)]
        mine = ours.parameters()
        assert len(theirs) == len(mine)
        with torch.no_grad():
            for t, m in zip(theirs, mine):
                assert tuple(t.shape) == tuple(m.data.shape), (t.shape, m.data.shape)
                t.copy_(torch.from_numpy(np.ascontiguousarray(m.data)))
    return net


def _torch_params_in_order(net):
    order = []
    for enc in net.enc:
        order += list(enc.named_parameters())
    order += list(net.bottleneck.named_parameters())
    for up, dec in zip(net.up, net.dec):
        order += list(up.named_parameters()) + list(dec.named_parameters())
    return order + list(net.final.named_parameters())


def make_inputs(batch, size, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, size, size, size)).astype(np.float32)
    t = rng.integers(0, 2, (batch, size, size, size))
    return x, t


def step_fns(side, backend, batch, size):
    """{'forward': f, 'train': f} for one side."""
    x, t = make_inputs(batch, size)
    if side == "unet_np":
        from unet_np import nn, optim
        net = build_ours(backend)
        loss = nn.CrossEntropyLoss()
        opt = optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

        def train():
            opt.zero_grad()
            loss.forward(net.forward(x), t)
            net.backward(loss.backward(), input_grad=False)      # the image needs no gradient
            opt.step()

        def forward():
            with nn.no_grad():
                net.forward(x)
        return dict(forward=forward, train=train), net
    import torch
    net = build_torch(build_ours("numpy"))
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), tt).backward()
        opt.step()

    def forward():
        with torch.no_grad():
            net(xt)
    return dict(forward=forward, train=train), net


# ---------------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------------
def _settle(seconds=0.05):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def time_case(batch, size, backend, repeats):
    ours, _ = step_fns("unet_np", backend, batch, size)
    theirs, _ = step_fns("torch", backend, batch, size)
    out = {}
    for mode in ("train", "forward"):
        ours[mode]()
        theirs[mode]()                                                  # warm-up (JIT, caches)
        times = {"unet_np": [], "torch": []}
        for _ in range(repeats):
            for side, fns in (("unet_np", ours), ("torch", theirs)):
                _settle()
                t0 = time.perf_counter()
                fns[mode]()
                times[side].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        # on a shared machine the load moves between runs: each interleaved pair ran under about
        # the same load, so the median of the pairs' ratios is reported next to the ratio of medians
        pairs = [a / b for a, b in zip(times["unet_np"], times["torch"])]
        out[mode] = dict(unet_np_s=med["unet_np"], torch_s=med["torch"],
                         ratio=med["unet_np"] / med["torch"], pair_ratio=statistics.median(pairs),
                         all=times)
    return out


def _peak_child(conn, side, backend, batch, size, threads):
    try:
        if side == "torch":
            import torch
            torch.set_num_threads(threads)
        fns, _ = step_fns(side, backend, batch, size)
        res = {}
        for mode in ("forward", "train"):
            fns[mode]()
            base = _status_kib("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            fns[mode]()
            res[mode + "_peak_growth_mib"] = (_status_kib("VmHWM") - base) / 1024
        conn.send(("ok", res))
    except BaseException as e:          # report anything to the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory(side, backend, batch, size, threads):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_peak_child, args=(b, side, backend, batch, size, threads))
    p.start()
    status, res = a.recv()
    p.join()
    return res if status == "ok" else {"error": res}


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [dict(error="threadpoolctl not installed")]
    keep = ("user_api", "internal_api", "num_threads", "version", "architecture", "threading_layer")
    return [{k: e.get(k) for k in keep if k in e} for e in threadpool_info()]


def report_md(res):
    lines = [f"# 3-D U-Net (depth 3, base 16, same padding), CPU, {res['date']}", "",
             f"unet_np backend {res['backend']!r} against PyTorch {res['torch']}, {res['threads']} threads, "
             f"float32; medians of {res['repeats']} interleaved runs. Ratio = unet_np / PyTorch (below 1: "
             "unet_np faster).", ""]
    if res["note"]:
        lines += [f"Machine state: {res['note']}", ""]
    lines += ["Ratio: of the medians; in brackets the median of the interleaved pairs' ratios. Load: the "
              "1-minute load average before and after the case (2 cores).", ""]
    lines += ["| batch x size^3 | step unet_np (s) | step PyTorch (s) | step ratio | forward unet_np (s) | "
              "forward PyTorch (s) | forward ratio | peak MiB step unet_np / PyTorch | load |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["cases"].items():
        mem = r.get("memory", {})
        m = (f"{mem['unet_np'].get('train_peak_growth_mib', float('nan')):.0f} / "
             f"{mem['torch'].get('train_peak_growth_mib', float('nan')):.0f}") if mem else "-"
        lines.append(f"| {key} | {r['train']['unet_np_s']:.3f} | {r['train']['torch_s']:.3f} | "
                     f"{r['train']['ratio']:.2f} ({r['train'].get('pair_ratio', float('nan')):.2f}) | "
                     f"{r['forward']['unet_np_s']:.3f} | {r['forward']['torch_s']:.3f} | "
                     f"{r['forward']['ratio']:.2f} ({r['forward'].get('pair_ratio', float('nan')):.2f}) | "
                     f"{m} | {r.get('load', ('?', '?'))[0]} - {r.get('load', ('?', '?'))[1]} |")
    lines += ["", f"Environment removed for this run: {res['unset'] or 'nothing'}; BLAS/OpenMP as "
              "threadpoolctl saw them:", "", "```", json.dumps(res["threadpool"], indent=1), "```", ""]
    return "\n".join(lines)


def main(args):
    import torch
    torch.set_num_threads(args.threads)
    from unet_np import backends
    backends.get(args.backend)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    res = dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), backend=args.backend,
               threads=args.threads, repeats=args.repeats, torch=torch.__version__, numpy=np.__version__,
               machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), note=args.note,
               unset=json.loads(os.environ.get(_UNSET_NOTE, "{}")), cases={})
    for batch, size in cases:
        key = f"{batch}x{size}"
        print(f"case {key} ...", flush=True)
        load0 = os.getloadavg()[0]
        r = time_case(batch, size, args.backend, args.repeats)
        r["load"] = (round(load0, 1), round(os.getloadavg()[0], 1))
        if not args.no_memory:
            r["memory"] = {side: peak_memory(side, args.backend, batch, size, args.threads)
                           for side in ("unet_np", "torch")}
        res["cases"][key] = r
        print(f"  step {r['train']['unet_np_s']:.3f} s vs {r['train']['torch_s']:.3f} s "
              f"(ratio {r['train']['ratio']:.2f}); forward {r['forward']['unet_np_s']:.3f} vs "
              f"{r['forward']['torch_s']:.3f} (ratio {r['forward']['ratio']:.2f})", flush=True)
    res["threadpool"] = blas_info()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"cpu3d-{stamp}.json"), "w") as f:
        json.dump(res, f, indent=1)
    md = report_md(res)
    with open(os.path.join(args.out, "cpu3d-latest.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main(_ARGS)

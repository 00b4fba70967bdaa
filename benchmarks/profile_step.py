"""Quick interleaved timing of one case, unet_np (one or more backends) against PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m benchmarks.profile_step \
        [--batch 8] [--size 128] [--depth 2] [--backends numpy,numba] [--modes train,forward] [--repeats 5]

Same process, same weights (benchmarks.cpu.build_pair), runs interleaved (torch, ours, torch, ours,
...); prints the median of each side and the ratio ours / torch, which is the only figure that
means anything on a shared machine. Set the thread count with --threads (default 2) before NumPy
and torch load. benchmarks.cpu is the full benchmark (sweep, memory, per-layer profile).
"""
import argparse
import os
import statistics
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--backends", default="numpy")
    p.add_argument("--modes", default="train,forward")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np  # noqa: F401  (after the thread settings)
    import torch
    torch.set_num_threads(args.threads)
    from benchmarks.cpu import build_pair, make_inputs, step_fns

    spec = dict(kwargs=dict(in_channels=1, num_classes=2, depth=args.depth, base_channels=64),
                torch="article" if args.depth == 2 else None)
    backends = args.backends.split(",")
    x, t = make_inputs(args.batch, args.size, 1, 2, seed=0)
    ours, theirs = build_pair(spec, backend=backends[0])
    fns = step_fns(ours, theirs, x, t)
    sides = {"torch": fns["torch"]}
    for name in backends:
        model, _ = build_pair(spec, backend=name, with_torch=False)
        model.load_state_dict(ours.state_dict())
        sides[name] = step_fns(model, None, x, t)["unet_np"]
    print(f"batch {args.batch}, {args.size}x{args.size}, depth {args.depth}, {args.threads} threads")
    for mode in args.modes.split(","):
        times = {k: [] for k in sides}
        for f in sides.values():                                      # warm-up (and JIT)
            f[mode]()
        for _ in range(args.repeats):
            for k, f in sides.items():
                t0 = time.perf_counter()
                f[mode]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        line = ", ".join(f"{k} {v:.3f} s ({v / med['torch']:.2f}x)" for k, v in med.items())
        print(f"  {mode:8s} {line}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

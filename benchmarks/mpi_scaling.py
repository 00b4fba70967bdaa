"""MPI data-parallel scaling: time per global training step with 1 and 2 ranks (one thread each).

    python -m benchmarks.mpi_scaling [--ranks 1,2] [--batch 8] [--size 64] [--base-channels 32]
                                     [--steps 6] [--warmup 2] [--out benchmarks/results]

Strong scaling: the GLOBAL batch is fixed, so K ranks each compute batch/K samples. For each K the
driver launches ``mpiexec -n K python benchmarks/mpi_scaling.py --worker ...`` with every thread
count set to --threads (default 1) and OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE removed (DESIGN.md). On
each rank the worker times DistributedTrainer.train_step (forward, cross-entropy, backward, the
gradient Allreduce, SGD) between barriers; rank 0 reports the median, and the part of it spent in the
gradient Allreduce. Besides, one process with K threads (no MPI) shows what the same cores give to
BLAS threading instead.

    speedup(K)    = T(1 rank) / T(K ranks)
    efficiency(K) = speedup(K) / K

Writes results/mpi-scaling.json and results/mpi-scaling.md. Nothing here is asserted anywhere.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

_REMOVE = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.mpi_scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts (default 1,2)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per rank (default 1)")
    p.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--batchnorm", action="store_true", help="batch-norm (synchronised) in every block")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="launch every configuration this many times, interleaved (default 3); the "
                        "report takes the median over all timed steps of all launches and the best "
                        "launch, since a shared machine's load comes and goes")
    p.add_argument("--no-threads-baseline", action="store_true",
                   help="skip the one-process run with K threads")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-mpi", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p


# -- the worker (one rank) -----------------------------------------------------------------------------
def worker(args):
    import numpy as np
    import unet_np
    from unet_np.distributed import DistributedTrainer, LocalComm, world
    from unet_np.nn import CrossEntropyLoss
    from unet_np.optim import SGD

    comm = LocalComm() if args.no_mpi else world()
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, args.size, args.size)).astype(args.dtype)
    y = rng.integers(0, 2, size=(args.batch, args.size, args.size))
    model = unet_np.UNet(1, 2, depth=args.depth, base_channels=args.base_channels,
                         batchnorm=args.batchnorm, dtype=args.dtype)
    opt = SGD(model.parameters(), lr=1e-3, momentum=0.9)
    trainer = DistributedTrainer(model, opt, loss=CrossEntropyLoss(), comm=comm)

    comm_time = [0.0]
    reduce = trainer._grads.allreduce

    def timed_reduce():
        t = time.perf_counter()
        reduce()
        comm_time[0] += time.perf_counter() - t
    trainer._grads.allreduce = timed_reduce

    steps, comms = [], []
    for i in range(args.warmup + args.steps):
        comm.Barrier()
        comm_time[0] = 0.0
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        comm.Barrier()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            steps.append(dt)
            comms.append(comm_time[0])
    grad_bytes = int(trainer._grads.buf.nbytes)
    if rank == 0:
        blas = None
        try:
            from threadpoolctl import threadpool_info
            blas = [{k: d.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                    for d in threadpool_info() if d.get("user_api") == "blas"]
        except ImportError:
            pass
        out = dict(ranks=size, threads=args.threads, mpi=not args.no_mpi, step_s=steps,
                   median_step_s=statistics.median(steps), min_step_s=min(steps),
                   median_allreduce_s=statistics.median(comms), gradient_bytes=grad_bytes,
                   parameters=int(sum(p.data.size for p in model.parameters())), blas=blas)
        with open(args.result, "w") as f:
            json.dump(out, f)


# -- the driver ----------------------------------------------------------------------------------------
def _env(threads):
    env = {k: v for k, v in os.environ.items() if k not in _REMOVE}
    for k in _THREAD_VARS:
        env[k] = str(threads)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _worker_args(args, result):
    a = ["--worker", "--result", result, "--batch", args.batch, "--size", args.size, "--depth",
         args.depth, "--base-channels", args.base_channels, "--dtype", args.dtype, "--steps",
         args.steps, "--warmup", args.warmup, "--threads", args.threads]
    if args.batchnorm:
        a.append("--batchnorm")
    return [str(v) for v in a]


def _run(cmd, env, result):
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    with open(result) as f:
        return json.load(f)


def _mpi_version():
    try:
        from mpi4py import MPI
        return MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - only for the report
        return None


def driver(args):
    import tempfile
    if shutil.which("mpiexec") is None:
        sys.exit("benchmarks.mpi_scaling: mpiexec not found (pip install '.[mpi]' in a checkout)")
    ranks = [int(k) for k in args.ranks.split(",")]
    configs = [("mpi", k) for k in ranks]
    if not args.no_threads_baseline:
        configs += [("threads", k) for k in ranks if k > 1]
    runs = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for kind, k in configs:               # interleaved, so slow spells hit every config
                res = os.path.join(tmp, f"{kind}{k}.json")
                load = os.getloadavg()[0]
                if kind == "mpi":
                    cmd = ["mpiexec", "-n", str(k), sys.executable, os.path.abspath(__file__)] + \
                        _worker_args(args, res)
                    env = _env(args.threads)
                    print(f"[mpi_scaling] run {rep + 1}: {k} rank(s) x {args.threads} thread(s)", flush=True)
                else:
                    t_args = argparse.Namespace(**dict(vars(args), threads=k * args.threads))
                    cmd = [sys.executable, os.path.abspath(__file__), "--no-mpi"] + _worker_args(t_args, res)
                    env = _env(k * args.threads)
                    print(f"[mpi_scaling] run {rep + 1}: 1 process x {k * args.threads} threads (no MPI)",
                          flush=True)
                r = _run(cmd, env, res)
                r["load_before"] = load
                runs[kind, k].append(r)

    def summary(rs):
        out = {k: rs[0][k] for k in ("ranks", "threads", "mpi", "gradient_bytes", "parameters", "blas")}
        steps = [s for r in rs for s in r["step_s"]]
        out.update(median_step_s=statistics.median(steps),
                   best_launch_step_s=min(r["median_step_s"] for r in rs),
                   median_allreduce_s=statistics.median(r["median_allreduce_s"] for r in rs),
                   launches=[dict(median_step_s=r["median_step_s"], load_before=r["load_before"])
                             for r in rs])
        return out
    rows = [summary(runs[c]) for c in configs if c[0] == "mpi"]
    baselines = [summary(runs[c]) for c in configs if c[0] == "threads"]
    t1 = next((r["median_step_s"] for r in rows if r["ranks"] == 1), None)
    b1 = next((r["best_launch_step_s"] for r in rows if r["ranks"] == 1), None)
    for r in rows + baselines:
        if t1 is not None:
            r["speedup"] = t1 / r["median_step_s"]
            r["speedup_best"] = b1 / r["best_launch_step_s"]
            n = r["ranks"] if r["mpi"] else r["threads"] // args.threads
            r["efficiency"] = r["speedup"] / n
            r["efficiency_best"] = r["speedup_best"] / n
    report = dict(
        config=dict(net=f"UNet(1, 2, depth={args.depth}, base_channels={args.base_channels}, "
                        f"batchnorm={args.batchnorm})", global_batch=args.batch,
                    image=f"{args.size}x{args.size}", dtype=args.dtype, steps=args.steps,
                    warmup=args.warmup, threads_per_rank=args.threads, repeats=args.repeats),
        machine=dict(cpus=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                     mpi=_mpi_version()),
        ranks=rows, threads_baseline=baselines,
        date=time.strftime("%Y-%m-%d %H:%M:%S"))
    loads = [x["load_before"] for r in rows + baselines for x in r["launches"]]
    if loads and max(loads) > (os.cpu_count() or 1):
        report["note"] = (f"measured while other jobs loaded this {os.cpu_count()}-CPU machine (load average "
                          f"{min(loads):.0f}-{max(loads):.0f}): absolute times are inflated and noisy; a "
                          f"multi-threaded run suffers most, since OpenBLAS threads spin-wait for each other")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "mpi-scaling.json"), "w") as f:
        json.dump(report, f, indent=1)
    md = _markdown(report)
    with open(os.path.join(args.out, "mpi-scaling.md"), "w") as f:
        f.write(md)
    print(md)
    return report


def _markdown(rep):
    c = rep["config"]
    lines = [f"# MPI data-parallel scaling ({rep['date']})", "",
             f"{c['net']}, global batch {c['global_batch']} of {c['image']} {c['dtype']} images, "
             f"cross-entropy, SGD momentum; median of {c['steps']} steps after {c['warmup']} warm-up "
             f"steps. Machine: {rep['machine']['cpus']} CPUs, {rep['machine']['platform']}, "
             f"{rep['machine']['mpi']}.", "",
             "| run | time per global step (median / best launch) | of it: gradient Allreduce (incl. waiting for the slower rank) | "
             "speedup (median / best) | efficiency (median / best) | load average at launches |",
             "|---|---|---|---|---|---|"]
    nan = float("nan")
    for r in rep["ranks"] + rep["threads_baseline"]:
        name = (f"{r['ranks']} rank(s) x {r['threads']} thread" if r["mpi"] else
                f"1 process x {r['threads']} threads (no MPI)")
        ar = (f"{r['median_allreduce_s'] * 1e3:.1f} ms ({r['gradient_bytes'] / 2**20:.1f} MiB)"
              if r["mpi"] else "-")
        loads = ", ".join(f"{x['load_before']:.1f}" for x in r["launches"])
        lines.append(f"| {name} | {r['median_step_s'] * 1e3:.0f} / {r['best_launch_step_s'] * 1e3:.0f} ms | "
                     f"{ar} | {r.get('speedup', nan):.2f}x / {r.get('speedup_best', nan):.2f}x | "
                     f"{r.get('efficiency', nan) * 100:.0f}% / {r.get('efficiency_best', nan) * 100:.0f}% | "
                     f"{loads} |")
    lines += ["", "speedup = T(1 rank) / T(run); efficiency = speedup / ranks (strong scaling: the global "
              "batch is fixed and split over the ranks)."]
    if rep.get("note"):
        lines += ["", f"Note: {rep['note']}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    main()

"""Skip connections and depth, measured: the reference article's two claims on this project's U-Net.

    python -m benchmarks.experiments.skip_depth            # the full grid (about 10-25 min, 2 cores)
    python -m benchmarks.experiments.skip_depth --quick    # a smoke run (under a minute)

Claims under test (DESIGN.md): removing the skip connections loses spatial precision, and depth adds
context. The grid: two synthetic data sets x skip on/off x depth 1..4 x three seeds, every run with
the same budget (same number of optimizer steps, batch size, learning rate, base channels, data):

  touching_cells  binary; cells that touch and must be told apart at a thin dark line. Precision at
                  boundaries matters: what the skip connections are said to bring.
  shapes          three classes; discs and squares with one grey level and one noise, so only the
                  outline over a whole object tells them apart: what context (depth) is said to bring.

Scores on a held-out test set (other seeds of the generators): Dice and IoU averaged over the
foreground classes (background left out: it is easy and would hide the differences), and the
boundary F1 with a tolerance of 2 px (averaged over the foreground classes).

Writes results.json (every run), results.md (mean +- std over seeds) and results.png beside this file
(or into --out). Runs in --jobs worker processes with one BLAS thread each: for these small layers
one thread per process is much faster than two threads fighting over one process's small GEMMs.
"""
import argparse
import json
import os
import sys
import time

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS")
if __name__ == "__main__" and "numpy" not in sys.modules:  # before NumPy loads its BLAS
    for _k in _THREAD_VARS:
        os.environ.setdefault(_k, "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

FULL = dict(size=64, n_train=64, n_test=32, base_channels=8, batch_size=8, steps=250, lr=2e-3,
            depths=(1, 2, 3, 4), seeds=(0, 1, 2), datasets=("touching_cells", "shapes"))
QUICK = dict(FULL, n_train=16, n_test=8, steps=10, depths=(1, 2), seeds=(0,))


def build_parser():
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments.skip_depth",
                                description="U-Net with and without skip connections, depths 1-4, "
                                            "same budget, on two synthetic data sets")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 depths, 1 seed, 10 steps")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 250)")
    p.add_argument("--depths", help="comma list (default 1,2,3,4)")
    p.add_argument("--seeds", help="comma list (default 0,1,2)")
    p.add_argument("--datasets", help="comma list of touching_cells,shapes")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes (default: 2 or the CPU count)")
    p.add_argument("--report", action="store_true",
                   help="only rewrite results.md / results.png from results.json")
    p.add_argument("--fresh", action="store_true",
                   help="ignore the runs of an earlier invocation (default: skip those already done)")
    p.add_argument("--out", default=None, help="output folder (default: beside this script; "
                                                "--quick: <that>/quick)")
    return p


# ---------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------
_DATA = {}


def _data(name, cfg):
    """(train_x, train_y, test_x, test_y), images normalised per image; cached per process."""
    key = (name, cfg["size"], cfg["n_train"], cfg["n_test"])
    if key not in _DATA:
        from unet_np.data import normalize_image, shapes, touching_cells
        gen = {"touching_cells": lambda n, s: touching_cells(n, cfg["size"], seed=s)[:2],
               "shapes": lambda n, s: shapes(n, cfg["size"], seed=s)}[name]
        tx, ty = gen(cfg["n_train"], 1)
        vx, vy = gen(cfg["n_test"], 1001)
        norm = lambda xs: np.stack([normalize_image(x) for x in xs])  # noqa: E731
        _DATA[key] = (norm(tx), ty, norm(vx), vy)
    return _DATA[key]


def foreground_scores(pred, target, num_classes):
    """Dice, IoU and boundary F1 (2 px) averaged over the foreground classes 1..C-1."""
    from unet_np.metrics import boundary_scores, evaluate
    ev = evaluate(pred, target, num_classes)
    fg = ev["per_class"][1:]
    dice = float(np.nanmean([c["dice"] for c in fg]))
    iou = float(np.nanmean([c["iou"] for c in fg]))
    if num_classes == 2:
        bf = boundary_scores(pred, target, tolerance=2)["f1"]
    else:
        per = boundary_scores(pred, target, tolerance=2, num_classes=num_classes)["per_class_f1"]
        bf = float(np.nanmean(per[1:]))
    return dict(dice=dice, iou=iou, boundary_f1=float(bf), pixel_accuracy=ev["pixel_accuracy"])


def run_one(job):
    """Train one UNet for cfg['steps'] steps and score it on the test set."""
    dataset, skip, depth, seed, cfg = job
    import unet_np
    from unet_np.nn.loss import CrossEntropyLoss
    from unet_np.optim import Adam
    from unet_np.train import predict_labels
    tx, ty, vx, vy = _data(dataset, cfg)
    num_classes = int(max(ty.max(), vy.max())) + 1
    unet_np.seed(seed)
    model = unet_np.UNet(1, num_classes, depth=depth, base_channels=cfg["base_channels"], skip=skip)
    opt = Adam(model.parameters(), lr=cfg["lr"])
    loss = CrossEntropyLoss()
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    losses = []
    for _ in range(cfg["steps"]):
        idx = rng.choice(len(tx), cfg["batch_size"], replace=False)
        x, y = tx[idx], ty[idx]
        k = int(rng.integers(4))  # a random quarter turn: cheap augmentation, same for every run
        x, y = np.ascontiguousarray(np.rot90(x, k, (2, 3))), np.ascontiguousarray(np.rot90(y, k, (1, 2)))
        model.train()
        out = model.forward(x)
        losses.append(float(loss.forward(out, y)))
        opt.zero_grad()
        model.backward(loss.backward())
        opt.step()
    train_s = time.perf_counter() - t0
    pred = predict_labels(model, vx, batch_size=8)
    scores = foreground_scores(pred, vy, num_classes)
    n_params = int(sum(p.data.size for p in model.parameters()))
    return dict(dataset=dataset, skip=skip, depth=depth, seed=seed, steps=cfg["steps"],
                final_loss=float(np.mean(losses[-20:])), train_seconds=train_s, params=n_params,
                **scores)


# ---------------------------------------------------------------------------------------------------
# Aggregation and output
# ---------------------------------------------------------------------------------------------------
METRICS = ("dice", "iou", "boundary_f1")


def aggregate(runs):
    """{(dataset, skip, depth): {metric: (mean, std, n)}} over seeds."""
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["skip"], r["depth"]), []).append(r)
    out = {}
    for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "touching_cells", kv[0][0],
                                                          not kv[0][1], kv[0][2])):
        out[key] = {m: (float(np.mean([r[m] for r in rs])),
                        float(np.std([r[m] for r in rs], ddof=1)) if len(rs) > 1 else 0.0, len(rs))
                    for m in METRICS + ("train_seconds",)}
        out[key]["params"] = rs[0]["params"]
    return out


def markdown_table(agg):
    lines = ["| data set | skip | depth | params | seeds | Dice | IoU | boundary F1 (2 px) | train s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (ds, skip, depth), a in agg.items():
        cell = lambda m: (f"{a[m][0]:.3f} ± {a[m][1]:.3f}" if a[m][2] > 1  # noqa: E731
                          else f"{a[m][0]:.3f}")
        lines.append(f"| {ds} | {'yes' if skip else 'no'} | {depth} | {a['params']:,} | {a['dice'][2]} | "
                     f"{cell('dice')} | {cell('iou')} | {cell('boundary_f1')} | {a['train_seconds'][0]:.0f} |")
    return "\n".join(lines)


def plot(agg, path):
    """Dice and boundary F1 against depth, skip on/off, one column per data set. Returns the path, or
    None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    datasets = sorted({k[0] for k in agg}, key=lambda d: d != "touching_cells")
    fig, axes = plt.subplots(2, len(datasets), figsize=(4.5 * len(datasets), 6.5), squeeze=False)
    for j, ds in enumerate(datasets):
        for i, m in enumerate(("dice", "boundary_f1")):
            ax = axes[i, j]
            for skip, style in ((True, "o-"), (False, "s--")):
                pts = sorted((k[2], v[m]) for k, v in agg.items() if k[0] == ds and k[1] == skip)
                if not pts:
                    continue
                d = [p[0] for p in pts]
                ax.errorbar(d, [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], fmt=style,
                            capsize=3, label="with skips" if skip else "no skips")
            ax.set_xticks(sorted({k[2] for k in agg}))
            ax.set_xlabel("depth (poolings)")
            ax.set_ylabel({"dice": "Dice (foreground)", "boundary_f1": "boundary F1 (2 px)"}[m])
            ax.set_title(ds)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("U-Net: skip connections and depth, same budget (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir, cfg, runs, elapsed):
    os.makedirs(out_dir, exist_ok=True)
    agg = aggregate(runs)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                   "elapsed_seconds": elapsed, "runs": runs,
                   "summary": [dict(dataset=k[0], skip=k[1], depth=k[2], params=v["params"],
                                    **{m: {"mean": v[m][0], "std": v[m][1], "n": v[m][2]}
                                       for m in METRICS})
                               for k, v in agg.items()]}, f, indent=1)
    png = plot(agg, os.path.join(out_dir, "results.png"))
    write_markdown(os.path.join(out_dir, "results.md"), cfg, agg, runs, elapsed)
    return agg, png


BEGIN, END = "<!-- table: written by skip_depth.py -->", "<!-- end of table -->"


def write_markdown(path, cfg, agg, runs, elapsed):
    """results.md: the table between the markers is rewritten on every call; the text around it
    (the reading of the numbers, written by a person) is kept."""
    n_seeds = sorted({a["dice"][2] for a in agg.values()})
    table = (f"{BEGIN}\n{len(runs)} runs; {cfg['steps']} Adam steps (lr {cfg['lr']:g}) of batch "
             f"{cfg['batch_size']} each, {cfg['size']}x{cfg['size']} images, base_channels "
             f"{cfg['base_channels']}, {cfg['n_train']} training / {cfg['n_test']} test images; "
             f"mean ± std over {'/'.join(map(str, n_seeds))} seed(s) per row; Dice and IoU over "
             f"the foreground classes; boundary F1 with 2 px tolerance.\n\n"
             f"{markdown_table(agg)}\n\n![results](results.png)\n{END}")
    text = None
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if text and BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
    else:
        text = ("# Skip connections and depth: measured\n\n"
                "`python -m benchmarks.experiments.skip_depth` (see its docstring).\n\n"
                f"{table}\n\n## Reading\n\n(to be written after looking at the numbers)\n")
    with open(path, "w") as f:
        f.write(text)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps:
        cfg["steps"] = args.steps
    if args.depths:
        cfg["depths"] = tuple(int(d) for d in args.depths.split(","))
    if args.seeds:
        cfg["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if args.datasets:
        cfg["datasets"] = tuple(args.datasets.split(","))
    out_dir = args.out or (os.path.join(HERE, "quick") if args.quick else HERE)
    if args.report:
        with open(os.path.join(out_dir, "results.json")) as f:
            old = json.load(f)
        write_outputs(out_dir, cfg, old["runs"], old.get("elapsed_seconds", 0.0))
        print(markdown_table(aggregate(old["runs"])))
        return 0
    # seed-major order: an interrupted run still covers the whole grid with its first seeds
    jobs = [(ds, skip, depth, seed, cfg) for seed in cfg["seeds"] for ds in cfg["datasets"]
            for depth in cfg["depths"] for skip in (True, False)]
    runs = [] if args.fresh else _previous_runs(out_dir, cfg)
    done = {(r["dataset"], r["skip"], r["depth"], r["seed"]) for r in runs}
    if done:
        print(f"resuming: {len(done)} runs already in {out_dir}/results.json (--fresh to redo them)")
    jobs = [j for j in jobs if j[:4] not in done]
    print(f"{len(jobs)} runs of {cfg['steps']} steps (batch {cfg['batch_size']}, {cfg['size']}x"
          f"{cfg['size']}, base {cfg['base_channels']}) on {args.jobs} worker(s)", flush=True)
    t0 = time.perf_counter() - (sum(r["train_seconds"] for r in runs) / max(1, args.jobs))
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                runs.append(r)
                _report(r, len(runs), len(jobs) + len(done), t0)
                write_outputs(out_dir, cfg, runs, time.perf_counter() - t0)  # partial results survive
    else:
        for job in jobs:
            runs.append(run_one(job))
            _report(runs[-1], len(runs), len(jobs) + len(done), t0)
            write_outputs(out_dir, cfg, runs, time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    agg, png = write_outputs(out_dir, cfg, runs, elapsed)
    print(markdown_table(agg))
    print(f"done in {elapsed:.0f} s; wrote {out_dir}/results.json" + (f" and {png}" if png else
                                                                    " (matplotlib missing: no figure)"))
    return 0


def _previous_runs(out_dir, cfg):
    """The runs of an earlier, interrupted invocation with the same configuration."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    same = {k: v for k, v in old.get("config", {}).items() if k not in ("depths", "seeds", "datasets")}
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
            if k not in ("depths", "seeds", "datasets")}
    return list(old.get("runs", [])) if same == want else []


def _report(r, i, n, t0):
    print(f"[{i}/{n} {time.perf_counter() - t0:5.0f}s] {r['dataset']:14s} skip={str(r['skip']):5s} "
          f"depth={r['depth']} seed={r['seed']}: Dice {r['dice']:.3f} IoU {r['iou']:.3f} "
          f"BF1 {r['boundary_f1']:.3f} ({r['train_seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())

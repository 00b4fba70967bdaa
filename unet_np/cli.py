"""The ``unet-np`` command: demo, train, predict, evaluate, gradcheck, bench.

    unet-np demo                                   # synthetic cells: train, evaluate, plot (~1.5 min)
    unet-np train --images imgs/ --masks masks/ --out run/
    unet-np predict --model run/model.npz --input new_imgs/ --out pred/
    unet-np evaluate --model run/model.npz --images test_imgs/ --masks test_masks/ --json
    unet-np gradcheck                              # every layer's backward, checked
    unet-np bench --quick                          # the CPU benchmark (source checkout only)

Every sub-command has --help. A problem with the input (missing folder, image without mask, corrupt
file, unknown mask values, unwritable output, existing model) ends the command with one line on
stderr naming the problem and exit status 2; --debug shows the traceback instead.

NumPy only: Pillow (reading images), matplotlib (plots) and tqdm (progress bars) are the optional
[viz] extra, imported when needed. Without matplotlib the command still trains and says which plots
it skipped.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .backends import NAMES as BACKENDS

__all__ = ["main", "build_parser", "CLIError"]

PROG = "unet-np"


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------
def _say(msg="", quiet=False):
    if not quiet:
        print(msg, flush=True)


def _warn(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _json_clean(obj):
    """NaN / inf -> None, NumPy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _prepare_out_dir(path):
    """Create the output folder and make sure a file can be written there."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: output folder is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".unet-np-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"{out}: output folder is not writable ({e.strerror or e})") from None
    return out


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _plot(name, fn, skipped, *args, **kwargs):
    """Draw one plot; a missing matplotlib (or a plotting failure) adds it to `skipped`."""
    from . import viz
    try:
        return fn(*args, **kwargs)
    except viz.VizUnavailable:
        skipped.append(name)
    except Exception as e:  # noqa: BLE001 - a plot must never lose a trained model
        skipped.append(f"{name} ({type(e).__name__}: {e})")
    return None


def _load_model(path, backend="numpy"):
    """(model, data meta) from a checkpoint; the meta says how images were normalised and masks
    written during training (defaults for a checkpoint written by the Python API)."""
    from .models.base import SegmentationModel
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: model file does not exist")
    model, ck = SegmentationModel.load(str(p), backend=backend, return_checkpoint=True)
    data = dict(ck.meta.get("data") or {})
    data.setdefault("normalize", "image")
    data.setdefault("mask_convention", "binary255" if model.num_classes <= 2 else "labels")
    return model, data


def _normalise(x, data):
    from .data import normalize_image
    mode = data.get("normalize", "image")
    if mode in (None, "none"):
        return np.asarray(x, dtype=np.float32)
    return normalize_image(x, mode, data.get("mean"), data.get("std"))


def _image_files(path):
    from .data import IMAGE_EXTENSIONS
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: input does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CLIError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def _distributed(args):
    """True when this run trains data-parallel over MPI ranks (mpiexec -n K, or --distributed)."""
    from . import distributed
    return bool(getattr(args, "distributed", False)) or distributed.launched_by_mpi()


def _trainer_class(distributed=False):
    if distributed:
        from .distributed import DistributedTrainer as Trainer
    else:
        from .train import Trainer

    class CLITrainer(Trainer):
        """Trainer whose checkpoints also carry what prediction needs: how images were normalised
        and how masks were written (meta['data'])."""
        data_meta = {}

        def _meta(self):
            meta = super()._meta()
            meta["data"] = self.data_meta
            return meta

    return CLITrainer


def _crop_size(model, sizes, depth):
    """The common training input size: the largest size every image can give that the model takes
    ('same': a multiple of 2**depth; 'valid': a size every pooling sees even)."""
    h = min(s[0] for s in sizes)
    w = min(s[1] for s in sizes)
    m = 2 ** depth
    out = []
    for n in (h, w):
        if getattr(model, "padding", "same") == "valid":
            s = n
            while s > 0 and model._trace(s) is None:
                s -= 1
        else:
            s = n // m * m
        if s <= 0:
            kind = "'valid' " if getattr(model, "padding", "same") == "valid" else ""
            least = (model.valid_input_shape((1, 1))[0] if kind else m)
            raise CLIError(f"images of {h}x{w} pixels are too small for a depth-{depth} {kind}model "
                           f"(it needs at least {least}x{least}; use a smaller --depth)")
        out.append(s)
    return tuple(out)


def _out_crop(model, in_hw):
    """(top, left, h, w) of the output inside an input of size in_hw ('valid' models shrink)."""
    if getattr(model, "padding", "same") != "valid":
        return 0, 0, in_hw[0], in_hw[1]
    oh, ow = model.output_shape(in_hw)
    return (in_hw[0] - oh) // 2, (in_hw[1] - ow) // 2, oh, ow


def _make_batcher(model, crop, augment, random_crop=True):
    """augment(x, y, w, rng) for Trainer.fit: per sample, a crop to the common size (random in
    training), the augmentation, and for 'valid' models the target cut to the output's size."""
    from .data import compose, elastic, flip_rotate
    aug = {"none": None, "basic": flip_rotate, "elastic": compose(flip_rotate, elastic)}[augment]
    t, l, oh, ow = _out_crop(model, crop)

    def run(xs, ys, ws, rng):
        bx, by, bw = [], [], []
        for i in range(len(xs)):
            x, y = xs[i], ys[i]
            w = None if ws is None else ws[i]
            h, wd = y.shape
            if (h, wd) != crop:
                top = int(rng.integers(0, h - crop[0] + 1)) if random_crop else (h - crop[0]) // 2
                left = int(rng.integers(0, wd - crop[1] + 1)) if random_crop else (wd - crop[1]) // 2
                x = x[:, top:top + crop[0], left:left + crop[1]]
                y = y[top:top + crop[0], left:left + crop[1]]
                w = None if w is None else w[top:top + crop[0], left:left + crop[1]]
            if aug is not None:
                x, y, w = aug(x, y, w, rng)
            bx.append(x)
            by.append(y[t:t + oh, l:l + ow])
            bw.append(None if w is None else w[t:t + oh, l:l + ow])
        x = np.stack(bx).astype(model.dtype, copy=False)
        y = np.stack(by).astype(np.int64)
        w = None if ws is None else np.stack(bw).astype(model.dtype)
        return x, y, w

    return run


def _as_object_array(items):
    arr = np.empty(len(items), dtype=object)
    for i, a in enumerate(items):
        arr[i] = a
    return arr


def _build_model(args, in_channels, num_classes):
    import unet_np
    common = dict(depth=args.depth, base_channels=args.base_channels, batchnorm=args.batchnorm,
                  upsample=args.upsample, init=args.init, dtype=args.dtype, backend=args.backend)
    if args.arch == "unet":
        return unet_np.UNet(in_channels, num_classes, skip=not args.no_skip, padding=args.padding,
                            **common)
    if args.no_skip or args.padding != "same":
        raise CLIError(f"--arch {args.arch} takes neither --no-skip nor --padding valid "
                       f"(they are options of --arch unet)")
    cls = unet_np.UNetPlusPlus if args.arch == "unet++" else unet_np.AttentionUNet
    return cls(in_channels, num_classes, **common)


def _split(n, val_split, seed):
    """(train indices, validation indices): a seeded shuffle; at least one of each when n >= 2."""
    if not 0 <= val_split < 1:
        raise CLIError(f"--val-split must be in [0, 1), got {val_split}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_split))
    if val_split > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class _Progress:
    """A tqdm bar per epoch on a terminal; otherwise one line per epoch (none with --quiet)."""

    def __init__(self, epochs, quiet):
        self.epochs, self.quiet, self.bar, self.tqdm = epochs, quiet, None, None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass
        self.t0 = time.perf_counter()

    def step(self, epoch, b, n_batches, loss):
        if self.tqdm is None:
            return
        if self.bar is None:
            self.bar = self.tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{self.epochs}",
                                 leave=True, dynamic_ncols=True)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}")

    def epoch(self, rec):
        val = ""
        if rec.get("val_dice") is not None:
            val = f"  val Dice {_fmt(rec['val_dice'])}  IoU {_fmt(rec.get('val_iou'))}"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={rec['loss']:.4f}" + (f", Dice={rec['val_dice']:.4f}"
                                                                 if rec.get("val_dice") is not None else ""))
            self.bar.close()
            self.bar = None
        elif not self.quiet:
            print(f"epoch {rec['epoch']:3d}/{self.epochs}  loss {rec['loss']:.4f}{val}  "
                  f"({rec['seconds']:.1f} s)", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _predict_labels_full(model, images, tile=None, overlap=None):
    """Labels (H, W) for each full-size image (any size), through predict_tiled."""
    from .infer import predict_tiled
    return [predict_tiled(model, x, tile=tile, overlap=overlap).argmax(axis=0) for x in images]


def score(preds, masks, num_classes):
    """Pixel metrics pooled over every pixel of every image, and boundary F1 (2 px tolerance)
    averaged over images: a dict with dice, iou, pixel_accuracy, boundary_f1, per_class, ..."""
    from .metrics import boundary_scores, evaluate
    p = np.concatenate([np.asarray(a).ravel() for a in preds])
    t = np.concatenate([np.asarray(a).ravel() for a in masks])
    ev = evaluate(p, t, num_classes)
    bfs = []
    for a, b in zip(preds, masks):
        if num_classes == 2:
            bfs.append(boundary_scores(a, b, tolerance=2)["f1"])
        else:
            bfs.append(boundary_scores(a, b, tolerance=2, num_classes=num_classes)["f1"])
    ev["boundary_f1"] = float(np.mean(bfs)) if bfs else float("nan")
    ev["num_images"] = len(preds)
    return ev


def _metrics_rows(ev):
    rows = [[f"class {c['class']}", _fmt(c["dice"]), _fmt(c["iou"]), _fmt(c["precision"]),
             _fmt(c["recall"]), c["support"]] for c in ev["per_class"]]
    rows.append(["mean", _fmt(ev["dice"]), _fmt(ev["iou"]), "", "", ""])
    return rows


def _print_metrics(ev, quiet=False):
    _say(_table(_metrics_rows(ev), ["", "Dice", "IoU", "precision", "recall", "pixels"]), quiet)
    extra = f"pixel accuracy {_fmt(ev['pixel_accuracy'])}   boundary F1 (2 px) {_fmt(ev['boundary_f1'])}"
    if "dice_foreground" in ev:
        extra += f"   foreground Dice {_fmt(ev['dice_foreground'])}"
    _say(extra, quiet)


def _write_metrics(out, history, final):
    """metrics.json (history + final scores) and metrics.csv (one row per epoch)."""
    with open(out / "metrics.json", "w") as f:
        json.dump(_json_clean({"history": history, "final": final}), f, indent=1)
    keys = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    with open(out / "metrics.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        for rec in history:
            wr.writerow({k: rec.get(k, "") for k in keys})


# What `unet-np train` uses where a flag is not given. With --resume the architecture is the
# checkpoint's, and a training setting not given is the one the checkpoint's run used.
ARCH_DEFAULTS = dict(arch="unet", depth=3, base_channels=16, padding="same", batchnorm=False,
                     upsample="transpose", no_skip=False, init="torch", dtype="float32")
TRAIN_DEFAULTS = dict(optimizer="adam", momentum=0.9, batch_size=4, augment="basic", weight_map=False,
                      val_split=0.2, seed=0)


RESUME_FIXED = ("optimizer", "seed", "val_split")    # the optimizer state, the train/validation split
RESUME_CHANGEABLE = ("lr", "momentum", "batch_size", "augment", "weight_map")
_FLAG_ASKS = {"batchnorm": "the checkpoint has no batch-norm",
              "no_skip": "the checkpoint has skip connections"}


def _resume_settings(args, model, data):
    """Fill args from the checkpoint being resumed (``data``: its data meta). The architecture,
    --classes, the optimizer, the seed and the validation split are the checkpoint's: a flag that
    asks for another is an error. The other training settings not given are those of the checkpoint's
    run ("train" in its data meta); one given that differs is used. Returns (the changed settings
    as 'flag value (was value)' strings, whether the checkpoint records its training settings)."""
    saved = data.get("train")
    cfg = model.config()
    have = dict(cfg, arch=model.arch, no_skip=not cfg.get("skip", True), classes=model.num_classes)
    have.setdefault("padding", "same")
    if saved:
        have.update({key: saved[key] for key in RESUME_FIXED if key in saved})
    conflicts = []
    for key in (*ARCH_DEFAULTS, "classes", *RESUME_FIXED):
        given, flag = getattr(args, key), "--" + key.replace("_", "-")
        if key not in have:                      # an older checkpoint: the command line or default
            setattr(args, key, TRAIN_DEFAULTS[key] if given is None else given)
            continue
        if given is not None and given != have[key]:
            conflicts.append(f"{flag} ({_FLAG_ASKS[key]})" if given is True and key in _FLAG_ASKS
                             else f"{flag} {given} (the checkpoint has {have[key]})")
        setattr(args, key, have[key])
    if conflicts:
        raise CLIError(f"{args.resume}: a resumed run keeps the checkpoint's architecture, optimizer, "
                       f"seed and validation split; drop {', '.join(conflicts)}")
    before_run = saved if saved else {"weight_map": data.get("weight_map")}
    changed = []
    for key in RESUME_CHANGEABLE:
        given, before = getattr(args, key), before_run.get(key)
        if given is None:
            setattr(args, key, before if before is not None else TRAIN_DEFAULTS.get(key))
        elif before is not None and given != before:
            changed.append(f"--{key.replace('_', '-')} {given} (was {before})")
    return changed, bool(saved)


def run_training(args, ds, out, quiet=False, instances=None):
    """Train on a SegmentationDataset with the options in args; writes model.npz, last.npz,
    metrics.json/.csv and the plots into out. Returns (model, final metrics, skipped plots)."""
    import unet_np
    from .nn.loss import CrossEntropyLoss
    from .optim import SGD, Adam
    from .viz import learning_curves, overlay

    n = len(ds)
    num_classes = ds.num_classes
    resume_ck = None
    if args.resume:
        model, resume_meta = _load_model(args.resume, backend=args.backend)
        if model.in_channels != ds.in_channels:
            raise CLIError(f"{args.resume}: the model takes {model.in_channels} channel(s), the "
                           f"images have {ds.in_channels}")
        explicit = {key for key in RESUME_CHANGEABLE if getattr(args, key) is not None}
        changed, recorded = _resume_settings(args, model, resume_meta)
        resume_ck = args.resume
    else:
        for key, default in {**ARCH_DEFAULTS, **TRAIN_DEFAULTS}.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
    if args.classes is not None:        # given, or the resumed model's
        top = max(int(m.max()) for m in ds.masks)
        if top >= args.classes:
            bad = next(nm for nm, m in zip(ds.names, ds.masks) if int(m.max()) == top)
            raise CLIError(f"{bad}: mask holds label {top}, but "
                           + (f"the model of {args.resume} has {args.classes} classes" if args.resume
                              else f"--classes is {args.classes}"))
        num_classes = args.classes
    if args.weight_map:
        ds.compute_weights(instances=instances)
    tr, va = _split(n, args.val_split, args.seed)

    if not resume_ck:
        unet_np.seed(args.seed)
        model = _build_model(args, ds.in_channels, num_classes)
    depth = model.depth
    sizes = [m.shape for m in ds.masks]
    crop = _crop_size(model, sizes, depth)

    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1e-2)
    if args.optimizer == "adam":
        opt = Adam(model.parameters(), lr=lr)
    else:
        opt = SGD(model.parameters(), lr=lr, momentum=args.momentum)
    trainer = _trainer_class(_distributed(args))(model, opt, loss=CrossEntropyLoss())
    trainer.data_meta = _json_clean({
        "normalize": ds.normalize, "mean": ds.mean, "std": ds.std,
        "mask_convention": ds.mask_convention, "palette": ds.palette, "num_classes": num_classes,
        "in_channels": ds.in_channels, "train_size": list(crop), "weight_map": bool(args.weight_map),
        "train": {**{key: getattr(args, key) for key in TRAIN_DEFAULTS}, "lr": lr}})
    if resume_ck:
        try:
            trainer.resume(resume_ck)
        except (KeyError, ValueError) as e:
            raise CLIError(f"{resume_ck}: cannot resume from it ({e})") from None
        _say(f"resuming from {resume_ck} at epoch {trainer.epoch} (step {trainer.step})", quiet)
        if "lr" in explicit:                 # the optimizer state just loaded holds the old ones
            opt.lr = lr
        if "momentum" in explicit and hasattr(opt, "momentum"):
            opt.momentum = args.momentum
        root = getattr(trainer, "is_root", True)             # MPI: rank 0 says it, once
        if changed and root:
            _warn("resuming with settings other than the checkpoint's run: " + ", ".join(changed))
        if not recorded and root:
            _warn(f"{resume_ck} does not record the settings it was trained with (an older "
                  f"unet-np): the command line's, or the defaults, apply")

    pick = lambda items, idx: _as_object_array([items[i] for i in idx])  # noqa: E731
    images, masks = pick(ds.images, tr), pick(ds.masks, tr)
    weights = pick(ds.weights, tr) if ds.weights is not None else None
    val = None
    if len(va):
        vb = _make_batcher(model, crop, "none", random_crop=False)
        vx, vy, _ = vb(pick(ds.images, va), pick(ds.masks, va), None, np.random.default_rng(0))
        val = (vx, vy)

    n_params = sum(int(p.data.size) for p in model.parameters())
    _say(f"model: {type(model).__name__} {json.dumps(model.config())} ({n_params:,} parameters)", quiet)
    _say(f"training on {len(tr)} image(s), validating on {len(va)}, crops of {crop[0]}x{crop[1]}, "
         f"{args.optimizer} lr {lr:g}, batch {args.batch_size}, {args.epochs} epochs"
         + (", weight map" if args.weight_map else "") + f", augment {args.augment}", quiet)
    if trainer.epoch >= args.epochs:
        _say(f"the checkpoint is already at epoch {trainer.epoch} >= --epochs {args.epochs}: "
             f"nothing to train", quiet)
    progress = _Progress(args.epochs, quiet)
    trainer.callbacks.append(lambda ev, info: progress.epoch(info) if ev == "epoch" else None)
    t0 = time.perf_counter()
    try:
        trainer.fit(images, masks, epochs=args.epochs, batch_size=args.batch_size, val=val,
                    pixel_weights=weights, augment=_make_batcher(model, crop, args.augment),
                    out_dir=str(out), seed=args.seed, progress=progress.step)
    finally:
        progress.close()
    train_s = time.perf_counter() - t0
    if not getattr(trainer, "is_root", True):  # MPI: only rank 0 evaluates and writes
        return None, None, [], trainer
    if not (out / "model.npz").exists():  # e.g. resumed past the end: keep the last weights
        trainer.save(str(out / "model.npz"))

    best, _ = _load_model(out / "model.npz", backend=args.backend)
    final = {"train_seconds": train_s, "epochs": trainer.epoch, "steps": trainer.step}
    skipped = []
    eval_idx = va if len(va) else tr
    eval_images = [ds.images[i] for i in eval_idx]
    eval_masks = [ds.masks[i] for i in eval_idx]
    preds = _predict_labels_full(best, eval_images)
    ev = score(preds, eval_masks, best.num_classes)
    final["evaluated_on"] = "validation" if len(va) else "training (no validation split)"
    final.update(ev)
    _write_metrics(out, trainer.history, final)
    if trainer.history:
        _plot("learning curves", learning_curves, skipped, trainer.history, out / "learning_curves.png")
    _plot("overlay", overlay, skipped, np.stack([x for x in eval_images[:4]]) if len(
        {x.shape for x in eval_images[:4]}) == 1 else eval_images[0][None],
        np.stack(eval_masks[:4]) if len({m.shape for m in eval_masks[:4]}) == 1 else eval_masks[0][None],
        np.stack(preds[:4]) if len({p.shape for p in preds[:4]}) == 1 else preds[0][None],
        out / "overlay.png", num_classes=best.num_classes,
        names=[ds.names[i] for i in eval_idx[:4]])
    return best, final, skipped, trainer


def _print_summary(final, out, skipped, quiet=False):
    _say("", quiet)
    _say(f"{final['evaluated_on']} set, {final['num_images']} image(s), best model "
         f"({final['epochs']} epochs, {final['train_seconds']:.0f} s of training):", quiet)
    _print_metrics(final, quiet)
    written = sorted(p.name for p in Path(out).iterdir() if p.suffix in (".npz", ".json", ".csv", ".png"))
    _say(f"wrote {out}/: {', '.join(written)}", quiet)
    if skipped:
        _warn(f"skipped plots: {', '.join(skipped)} (plots need matplotlib: pip install 'unet-np[viz]')")


def cmd_train(args):
    from .data import load_folder
    from .data import check_dir as _check_dir
    _check_dir(args.images, "image")       # before the output folder is made: no empty one is left
    _check_dir(args.masks, "mask")
    out = _prepare_out_dir(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        if not args.resume:
            raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it, or --resume "
                           f"{out / 'last.npz'} to continue training")
        if Path(args.resume).resolve().parent != out.resolve():
            raise CLIError(f"{out / 'model.npz'} exists and belongs to another run than "
                           f"{args.resume}: resume into the checkpoint's own folder, or pass "
                           f"--overwrite to replace it")
    ds = load_folder(args.images, args.masks, normalize="image")
    quiet = args.quiet
    if _distributed(args):
        from .distributed import is_root
        quiet = quiet or not is_root()
    _say(str(ds.diagnostics()), quiet)
    _say("", quiet)
    _, final, skipped, _ = run_training(args, ds, out, quiet=quiet)
    if final is not None:
        _print_summary(final, out, skipped, quiet)
    return 0


def cmd_export(args):
    """Write the model as an ONNX file (needs the onnx extra)."""
    out = Path(args.out)
    if out.suffix.lower() != ".onnx":
        raise CLIError(f"{out}: the ONNX file's name must end in .onnx")
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists: pass --overwrite to replace it")
    model, _ = _load_model(args.model)
    if getattr(args, "level", None) is not None:
        if not hasattr(model, "prune"):
            raise CLIError(f"{args.model}: --level applies to U-Net++ models only")
        model.prune(args.level)
    model.eval()
    try:
        path = model.to_onnx(str(out), opset=args.opset)
    except OSError as e:
        raise CLIError(f"{out}: cannot write it ({e.strerror or e})") from None
    _say(f"wrote {path}", args.quiet)
    return 0


# ---------------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------------
DEMO = dict(n=80, size=64, depth=3, base_channels=8, epochs=20, batch_size=8, lr=3e-3)
DEMO_QUICK = dict(n=60, size=32, depth=2, base_channels=8, epochs=25, batch_size=4, lr=3e-3)


def cmd_demo(args):
    from .data import SegmentationDataset, normalize_image, touching_cells, write_folder
    from .viz import feature_maps, weight_map
    cfg = DEMO_QUICK if args.quick else DEMO
    out = _prepare_out_dir(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it")
    t0 = time.perf_counter()
    images, masks, instances = touching_cells(cfg["n"], cfg["size"], seed=args.seed)
    n_test = max(2, cfg["n"] // 5)
    test_x, test_y = images[-n_test:], masks[-n_test:]
    images, masks, instances = images[:-n_test], masks[:-n_test], instances[:-n_test]
    write_folder(out / "data" / "train", images, masks)
    write_folder(out / "data" / "test", test_x, test_y)
    _say(f"synthetic touching cells: {len(images)} training and {n_test} test images of "
         f"{cfg['size']}x{cfg['size']} in {out / 'data'}")
    ds = SegmentationDataset.from_arrays(images, masks, normalize="image",
                                         mask_convention="binary255")
    targs = argparse.Namespace(
        classes=None, weight_map=True, val_split=0.2, seed=args.seed, resume=None, arch="unet",
        depth=cfg["depth"], base_channels=cfg["base_channels"], batchnorm=False,
        upsample="transpose", init="torch", dtype="float32", backend=args.backend, no_skip=False,
        padding="same", optimizer="adam", lr=cfg["lr"], momentum=0.9, epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], augment="basic")
    model, final, skipped, trainer = run_training(targs, ds, out, quiet=args.quiet,
                                                  instances=list(instances))
    # the held-out test set, through the same path as `unet-np evaluate`
    tx = [normalize_image(x) for x in test_x]
    preds = _predict_labels_full(model, tx)
    test = score(preds, list(test_y), model.num_classes)
    final["test"] = test
    hist = json.load(open(out / "metrics.json"))["history"]
    _write_metrics(out, hist, final)
    _plot("weight map", weight_map, skipped, images[0], ds.weights[0], out / "weight_map.png",
          mask=masks[0], w0=10.0)
    _plot("feature maps", feature_maps, skipped, model, tx[0], out / "feature_maps.png")
    from .viz import overlay
    _plot("test overlay", overlay, skipped, test_x[:4], test_y[:4], np.stack(preds[:4]),
          out / "test_overlay.png", num_classes=model.num_classes)
    _print_summary(final, out, skipped, args.quiet)
    _say("")
    rows = [["validation", _fmt(final["dice"]), _fmt(final["iou"]), _fmt(final.get("dice_foreground")),
             _fmt(final["boundary_f1"])],
            ["test", _fmt(test["dice"]), _fmt(test["iou"]), _fmt(test.get("dice_foreground")),
             _fmt(test["boundary_f1"])]]
    print(_table(rows, ["demo summary", "Dice", "IoU", "cell Dice", "boundary F1"]))
    again = " --overwrite" if (out / "predictions").is_dir() and any((out / "predictions").iterdir()) else ""
    print(f"done in {time.perf_counter() - t0:.0f} s. Next: unet-np predict --model {out}/model.npz "
          f"--input {out}/data/test/images --out {out}/predictions{again}")
    return 0


# ---------------------------------------------------------------------------------------------------
# Predict and evaluate
# ---------------------------------------------------------------------------------------------------
def _read_checked(path, model):
    from .data import read_image
    x = read_image(path)
    if x.shape[0] != model.in_channels:
        raise CLIError(f"{path}: image has {x.shape[0]} channel(s), the model takes {model.in_channels}")
    return x


def cmd_predict(args):
    from .data import write_mask
    from .data import whole_file as _whole_file
    model, data = _load_model(args.model, backend=args.backend)
    files = _image_files(args.input)
    out = Path(args.out)
    if out.resolve() in {f.parent.resolve() for f in files}:
        raise CLIError(f"{args.out}: is the folder of the input images; choose another --out")
    stems = {}
    for f in files:
        if f.stem in stems:
            raise CLIError(f"{f}: has the same name as {stems[f.stem].name}; the outputs would collide")
        stems[f.stem] = f
    suffixes = (".png", ".npy") if args.probabilities else (".png",)
    there = [out / (stem + x) for stem in stems for x in suffixes if (out / (stem + x)).exists()]
    if there and not args.overwrite:
        more = f" and {len(there) - 1} more exist" if len(there) > 1 else " exists"
        raise CLIError(f"{there[0]}{more}: pass --overwrite to replace, or choose another --out")
    _prepare_out_dir(out)
    conv, pal = data.get("mask_convention"), data.get("palette")
    if conv in ("binary255", "binary01", "empty") and model.num_classes > 2:
        conv = "labels"
    for f in files:
        x = _normalise(_read_checked(f, model), data)
        probs = _predict(model, x, args)
        labels = probs.argmax(axis=0)
        write_mask(out / f"{f.stem}.png", labels, convention=conv,
                   palette=[tuple(c) for c in pal] if pal else None)
        if args.probabilities:
            with _whole_file(out / f"{f.stem}.npy") as fh:       # whole or not at all, as the masks
                np.save(fh, probs.astype(np.float32))
        _say(f"{f.name} -> {out / (f.stem + '.png')} ({x.shape[1]}x{x.shape[2]}, "
             + ", ".join(f"class {c}: {100.0 * np.mean(labels == c):.1f}%"
                         for c in range(model.num_classes)) + ")", args.quiet)
    _say(f"wrote {len(files)} mask(s) to {out} ({conv} convention)", args.quiet)
    return 0


def _predict(model, x, args):
    from .infer import predict_tiled
    try:
        return predict_tiled(model, x, tile=args.tile, overlap=args.overlap)
    except MemoryError as e:
        raise CLIError(f"{e} (try a smaller --tile)") from None


def cmd_evaluate(args):
    from .data import load_folder
    model, data = _load_model(args.model, backend=args.backend)
    ds = load_folder(args.images, args.masks, normalize=None,
                     palette=[tuple(c) for c in data["palette"]] if data.get("mask_convention") == "rgb"
                     and data.get("palette") else None)
    if ds.in_channels != model.in_channels:
        raise CLIError(f"{args.images}: images have {ds.in_channels} channel(s), the model takes "
                       f"{model.in_channels}")
    for name, m in zip(ds.names, ds.masks):
        if int(m.max()) >= model.num_classes:
            raise CLIError(f"{name}: mask holds label {int(m.max())}, the model knows "
                           f"{model.num_classes} classes (0..{model.num_classes - 1})")
    t0 = time.perf_counter()
    preds = [_predict(model, _normalise(x, data), args).argmax(axis=0) for x in ds.images]
    ev = score(preds, ds.masks, model.num_classes)
    ev["seconds"] = time.perf_counter() - t0
    if not args.json or not args.quiet:
        _say(f"{len(ds)} image(s) from {args.images}, model {args.model}:")
        _print_metrics(ev)
    if args.json:
        print(json.dumps(_json_clean(ev)))
    return 0


# ---------------------------------------------------------------------------------------------------
# Gradient check
# ---------------------------------------------------------------------------------------------------
def _gradcheck_cases():
    """name -> (make module, input arrays, torch function (xs, params, F) -> output, or None).
    float64, tiny shapes; the torch function mirrors the layer with torch.nn.functional."""
    from . import nn
    from .models import UNet
    r = np.random.default_rng(0)
    x = lambda *s: r.standard_normal(s)  # noqa: E731
    f64 = np.float64
    cases = {
        "Conv2d 3x3 pad 1": (lambda: nn.Conv2d(2, 3, 3, padding=1, dtype=f64), (x(2, 2, 5, 5),),
                             lambda xs, p, F: F.conv2d(xs[0], p["weight"], p["bias"], padding=1)),
        "Conv2d 3x3 stride 2 dilation 2": (
            lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2, dtype=f64), (x(1, 2, 7, 6),),
            lambda xs, p, F: F.conv2d(xs[0], p["weight"], p["bias"], stride=2, padding=2, dilation=2)),
        "ConvTranspose2d 2x2 stride 2": (
            lambda: nn.ConvTranspose2d(3, 2, 2, stride=2, dtype=f64), (x(2, 3, 3, 4),),
            lambda xs, p, F: F.conv_transpose2d(xs[0], p["weight"], p["bias"], stride=2)),
        "MaxPool2d 2": (lambda: nn.MaxPool2d(2), (x(2, 2, 6, 6),),
                        lambda xs, p, F: F.max_pool2d(xs[0], 2)),
        "ReLU": (lambda: nn.ReLU(), (x(2, 3, 4, 4),), lambda xs, p, F: F.relu(xs[0])),
        "Sigmoid": (lambda: nn.Sigmoid(), (x(2, 3, 4, 4),), lambda xs, p, F: xs[0].sigmoid()),
        "BatchNorm2d (train)": (
            lambda: nn.BatchNorm2d(3, dtype=f64), (x(2, 3, 4, 4),),
            lambda xs, p, F: F.batch_norm(xs[0], None, None, p["weight"], p["bias"], training=True)),
        "Upsample bilinear x2": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (x(1, 2, 3, 4),),
                                 lambda xs, p, F: F.interpolate(xs[0], scale_factor=2, mode="bilinear",
                                                                align_corners=False)),
        "Concat": (lambda: nn.Concat(axis=1), (x(1, 2, 3, 3), x(1, 3, 3, 3)),
                   lambda xs, p, F: _torch().cat(xs, 1)),
        "CrossEntropyLoss + weight map": (
            lambda: nn.CrossEntropyLoss(dtype=f64), (x(2, 3, 4, 4),),
            lambda xs, p, F: (F.cross_entropy(xs[0], _T["target"], reduction="none")
                              * _T["weight"]).mean()),
        "UNet depth 1 (whole model)": (
            lambda: _seeded(lambda: UNet(1, 2, depth=1, base_channels=2, dtype=f64)), (x(1, 1, 4, 4),),
            None),
    }
    return cases


# target and pixel weights of the loss case (NumPy here; tensors made on demand for torch)
_LOSS_TARGET = np.random.default_rng(2).integers(0, 3, (2, 4, 4))
_LOSS_WEIGHT = np.random.default_rng(3).uniform(0.5, 3.0, (2, 4, 4))


class _TorchLossInputs(dict):
    def __missing__(self, key):
        torch = _torch()
        v = {"target": torch.tensor(_LOSS_TARGET), "weight": torch.tensor(_LOSS_WEIGHT)}[key]
        self[key] = v
        return v


_T = _TorchLossInputs()


def _torch():
    """PyTorch, for `unet-np gradcheck` only (the oracle; the library never needs it). Raises
    ImportError when it is not installed."""
    import importlib
    return importlib.import_module("torch")


def _is_loss(module):
    from .nn.loss import _Loss
    return isinstance(module, _Loss)


def _seeded(make):
    import unet_np
    unet_np.seed(0)
    return make()


def _torch_check(module, xs, fn, torch):
    """Max relative error of our forward, input gradient(s) and parameter gradients against torch."""
    F = torch.nn.functional
    from .gradcheck import _rel
    from .backends import to_numpy
    module.zero_grad()
    module.train()
    if _is_loss(module):
        y = module.forward(np.array(xs[0]), _LOSS_TARGET, pixel_weight=_LOSS_WEIGHT)
        g = np.ones(())
        back = module.backward()
    else:
        y = module.forward(*[np.array(a) for a in xs])
        g = np.random.default_rng(1).standard_normal(to_numpy(y).shape)
        back = module.backward(g)
    dxs = list(back) if isinstance(back, tuple) else [back]
    txs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in xs]
    tp = {n: torch.tensor(to_numpy(p.data), dtype=torch.float64, requires_grad=True)
          for n, p in module.named_parameters()}
    ty = fn(txs, tp, F)
    ty.backward(torch.tensor(g))
    errs = [_rel(to_numpy(y), ty.detach().numpy())]
    errs += [_rel(d, t.grad.numpy()) for d, t in zip(dxs, txs)]
    errs += [_rel(to_numpy(p.grad), tp[n].grad.numpy()) for n, p in module.named_parameters()]
    return max(errs)


def cmd_gradcheck(args):
    from .gradcheck import gradcheck
    cases = _gradcheck_cases()
    if args.layer:
        wanted = {k: v for k, v in cases.items() if args.layer.lower() in k.lower()}
        if not wanted:
            raise CLIError(f"no layer matches {args.layer!r}; layers: {', '.join(cases)}")
        cases = wanted
    torch = None
    if not args.no_torch:
        try:
            torch = _torch()
        except ImportError:
            torch = None
    rows, failed = [], []
    for name, (make, xs, fn) in cases.items():
        t0 = time.perf_counter()
        mod = make()
        if _is_loss(mod):
            fd = gradcheck(mod, xs[0], target=_LOSS_TARGET, pixel_weight=_LOSS_WEIGHT)
        else:
            fd = gradcheck(mod, xs if len(xs) > 1 else xs[0])
        worst_fd = max(fd.values())
        tv = None
        if torch is not None and fn is not None:
            tv = _torch_check(make(), xs, fn, torch)
        ok = worst_fd < args.tol_fd and (tv is None or tv < args.tol_torch)
        if not ok:
            failed.append(name)
        rows.append([name, f"{worst_fd:.1e}", "-" if tv is None else f"{tv:.1e}",
                     "ok" if ok else "FAIL", f"{time.perf_counter() - t0:.2f}"])
    print("float64; finite differences: central, eps 1e-6, max relative error over the input and "
          "every parameter")
    if torch is None:
        print("PyTorch is not importable here: the torch column is skipped (pip install torch)")
    else:
        print(f"PyTorch {torch.__version__}: forward, input and parameter gradients compared")
    print(_table(rows, ["layer", "finite diff", "vs torch", "", "seconds"]))
    if failed:
        _warn(f"gradcheck failed for: {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} checks passed (tolerances: finite differences {args.tol_fd:g}, "
          f"torch {args.tol_torch:g})")
    return 0


# ---------------------------------------------------------------------------------------------------
# Bench
# ---------------------------------------------------------------------------------------------------
def cmd_bench(args, rest):
    import subprocess
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "cpu.py").is_file():
        raise CLIError(f"the CPU benchmark is not here: {root / 'benchmarks'} does not exist. It ships "
                       f"with the source checkout, not with the installed package: clone the "
                       f"repository and run unet-np bench (or python -m benchmarks.cpu) there")
    cmd = [sys.executable, "-m", "benchmarks.cpu", *rest]
    _say("running: " + " ".join(cmd) + f"  (in {root})")
    return subprocess.call(cmd, cwd=str(root))


# ---------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------
def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _common(p):
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--quiet", action="store_true", help="print less")


def _tiling(p):
    p.add_argument("--tile", type=_positive_int, default=None,
                   help="output pixels per tile edge (default: the whole image when it fits in "
                        "about 1 GiB, else 256)")
    p.add_argument("--overlap", type=_nonneg_int, default=None,
                   help="context pixels on each side of a tile, mirror-padded at the image border "
                        "(default: the receptive field's reach, so tiling changes nothing)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS, help="unet_np backend (default numpy)")


def build_parser():
    from . import __version__
    parser = argparse.ArgumentParser(
        prog=PROG, description="U-Net segmentation on NumPy: every forward and backward pass by hand.",
        epilog="Start with: unet-np demo. Each command has --help.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="train on synthetic touching cells, evaluate and plot (~1.5 min)",
                       description="Generate a synthetic set of touching cells, train a small U-Net "
                                   "with the paper's weight map, evaluate it on held-out images, and "
                                   "write the model, metrics and plots (learning curves, overlays, "
                                   "the weight map, feature maps of every level).")
    p.add_argument("--out", default="unet-np-demo", help="output folder (default unet-np-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny run (well under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing out/model.npz")
    p.add_argument("--backend", default="numpy", choices=BACKENDS, help="unet_np backend (default numpy)")
    _common(p)

    p = sub.add_parser("train", help="train a model on a folder of images and a folder of masks",
                       description="Train a U-Net on images and masks matched by file name "
                                   "(a.png <-> a.png or a_mask.png). Writes OUT/model.npz (best "
                                   "validation Dice), OUT/last.npz (resumable), OUT/metrics.json and "
                                   ".csv, learning_curves.png and overlay.png.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks (0/255, 0/1, labels 0..K-1, or "
                                                  "indexed-colour PNG)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=_positive_int, default=30, help="total epochs (default 30)")
    g.add_argument("--batch-size", type=_positive_int, default=None, help="default 4")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default 1e-3 for adam, 1e-2 for sgd)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="default adam")
    g.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default 0.9; the paper: 0.99)")
    g.add_argument("--augment", choices=("none", "basic", "elastic"), default=None,
                   help="basic: flips and quarter turns; elastic: also the paper's elastic "
                        "deformation (default basic)")
    g.add_argument("--weight-map", action="store_true", default=None,
                   help="weight the loss by the paper's weight map (borders between touching "
                        "objects count more; objects are the masks' connected components)")
    g.add_argument("--val-split", type=float, default=None, help="fraction held out (default 0.2)")
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (e.g. OUT/last.npz) up to "
                                                    "--epochs in total, with its architecture, "
                                                    "optimizer, seed and validation split; other "
                                                    "settings not given are its run's")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.npz")
    a = p.add_argument_group("architecture")
    a.add_argument("--arch", choices=("unet", "unet++", "attention"), default=None, help="default unet")
    a.add_argument("--depth", type=_positive_int, default=None, help="poolings (default 3)")
    a.add_argument("--base-channels", type=_positive_int, default=None, help="default 16")
    a.add_argument("--classes", type=_positive_int, default=None,
                   help="number of classes (default: from the masks)")
    a.add_argument("--padding", choices=("same", "valid"), default=None,
                   help="valid: the paper's unpadded convolutions (output smaller than input; "
                        "default same)")
    a.add_argument("--batchnorm", action="store_true", default=None)
    a.add_argument("--upsample", choices=("transpose", "bilinear"), default=None,
                   help="default transpose")
    a.add_argument("--no-skip", action="store_true", default=None, help="drop the skip connections (to see why "
                                                          "they matter)")
    a.add_argument("--init", choices=("torch", "he"), default=None,
                   help="weight init: PyTorch's default or the paper's He-normal (default torch)")
    a.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32")
    a.add_argument("--backend", default="numpy", choices=BACKENDS, help="unet_np backend (default numpy)")
    p.add_argument("--distributed", action="store_true",
                   help="train data-parallel over MPI ranks (implied under mpiexec; needs the mpi "
                        "extra): mpiexec -n 2 unet-np train ...")
    _common(p)

    p = sub.add_parser("predict", help="segment images with a trained model",
                       description="Write one mask per input image (same file stem, .png), in the "
                                   "convention of the training masks (binary as 0/255). Any image "
                                   "size works: the image is mirror-padded and, when large, tiled.")
    p.add_argument("--model", required=True, help="a model.npz written by unet-np train")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true",
                   help="also write the class probabilities (num_classes, H, W) as .npy")
    p.add_argument("--overwrite", action="store_true",
                   help="replace masks (and .npy files) already in --out")
    _tiling(p)
    _common(p)

    p = sub.add_parser("evaluate", help="score a model on images with masks",
                       description="Per-class and mean Dice and IoU, pixel accuracy and boundary F1 "
                                   "(2 px tolerance) of a model on a folder of images and masks.")
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--json", action="store_true",
                   help="print the scores as one JSON object on the last line")
    _tiling(p)
    _common(p)

    p = sub.add_parser("gradcheck", help="check every layer's backward (finite differences, PyTorch)",
                       description="For each layer: its hand-written backward against central finite "
                                   "differences, and against PyTorch autograd when torch is "
                                   "importable. float64, tiny shapes.")
    p.add_argument("--layer", help="only the layers whose name contains this (e.g. conv, pool)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--tol-fd", type=_positive_float, default=1e-6, help="finite-difference tolerance")
    p.add_argument("--tol-torch", type=_positive_float, default=1e-10, help="tolerance against PyTorch")
    _common(p)

    p = sub.add_parser("export", help="export a trained model to ONNX",
                       description="Write the model as an ONNX file (opset 17 by default; batch and "
                                   "spatial sizes dynamic) for onnxruntime and other runtimes. Needs "
                                   "pip install 'unet-np[onnx]'.")
    p.add_argument("--model", required=True, help="a model.npz")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--level", type=_positive_int, default=None,
                   help="U-Net++ only: export the network pruned to this level")
    _common(p)

    p = sub.add_parser("bench", help="run the CPU benchmark (python -m benchmarks.cpu)",
                       description="Runs python -m benchmarks.cpu from the source checkout; every "
                                   "other argument is passed on (e.g. --quick, --threads 2). "
                                   "See the benchmark's own options with: unet-np bench --bench-help")
    p.add_argument("--bench-help", action="store_true", help="show the benchmark's options")
    _common(p)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    debug = getattr(args, "debug", False)
    try:
        if args.command == "bench":
            return cmd_bench(args, rest + (["--help"] if args.bench_help else []))
        return {"demo": cmd_demo, "train": cmd_train, "predict": cmd_predict,
                "evaluate": cmd_evaluate, "gradcheck": cmd_gradcheck,
                "export": cmd_export}[args.command](args)
    except KeyboardInterrupt:
        last = Path(args.out) / "last.npz" if args.command == "train" else None
        _warn("interrupted" + (f"; to continue: unet-np train ... --out {args.out} --resume {last}"
                               if last is not None and last.exists() else ""))
        return 130
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            raise
        _warn(f"{args.command}: error: {_one_line(e)}")
        return 2


def _one_line(e):
    """One line that names the problem: the first concrete problem of a multi-line message."""
    from .data import DataError
    from .train import TrainingError
    msg = str(e) if str(e) else type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        msg = f"{e.filename}: {e.strerror or 'not found'}"
    elif isinstance(e, PermissionError) and e.filename:
        msg = f"{e.filename}: permission denied"
    elif isinstance(e, MemoryError):
        msg = f"out of memory: {msg} (use a smaller --batch-size or --tile)"
    elif not isinstance(e, (CLIError, DataError, TrainingError, ValueError, OSError)):
        msg = f"{type(e).__name__}: {msg} (--debug shows where)"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if len(lines) > 1:
        head = lines[1] if lines[0].endswith(":") else lines[0]
        more = len(lines) - (2 if lines[0].endswith(":") else 1)
        msg = head + (f" (and {more} more problem(s); --debug lists them)" if more else "")
    elif lines:
        msg = lines[0]
    return msg


if __name__ == "__main__":
    sys.exit(main())

"""unet-np train: a folder of images and a folder of masks -> OUT/model.npz, last.npz, metrics, plots.

The training itself is the library's: ``Trainer.fit(dataset, ...)`` with the dataset from
``data.load_folder``. This module turns options into those calls, keeps what the user has (an
existing model, a checkpoint being resumed), and reports.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import (BACKEND_CHOICES, CLIError, add_common, fmt, json_clean, load_model, plot,
                     positive_float, positive_int, predict_labels, predict_objects, prepare_out_dir,
                     print_instances, print_metrics, resolve_backend, say, score_objects, warn,
                     write_metrics)
from .settings import (ARCH_DEFAULTS, RESUME_CHANGEABLE, TRAIN_DEFAULTS, instance_settings,
                       resume_settings)

def add_parser(sub):
    p = sub.add_parser("train", help="train a model on a folder of images and a folder of masks",
                       description="Train a U-Net on images and masks matched by file name "
                                   "(a.png <-> a.png or a_mask.png). Writes OUT/model.npz (best "
                                   "validation Dice), OUT/last.npz (resumable), OUT/metrics.json and "
                                   ".csv, learning_curves.png and overlay.png.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks (0/255, 0/1, labels 0..K-1, "
                                                  "indexed-colour PNG, or with --instances "
                                                  "instance label images)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=30, help="total epochs (default 30)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="default 4")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default 1e-3 for adam, 1e-2 for sgd)")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None, help="default adam")
    g.add_argument("--momentum", type=float, default=None,
                   help="SGD momentum (default 0.9; the paper: 0.99)")
    g.add_argument("--augment", choices=("none", "basic", "elastic"), default=None,
                   help="basic: flips and quarter turns; elastic: also the paper's elastic "
                        "deformation (default basic)")
    g.add_argument("--weight-map", action=argparse.BooleanOptionalAction, default=None,
                   help="weight the loss by the paper's weight map (borders between touching "
                        "objects count more; objects are the masks' connected components, or "
                        "with --instances the true instances). Default: on with --instances, "
                        "else off")
    g.add_argument("--val-split", type=float, default=None, help="fraction held out (default 0.2)")
    g.add_argument("--seed", type=int, default=None, help="default 0")
    g.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (e.g. OUT/last.npz) up to "
                                                    "--epochs in total, with its architecture, "
                                                    "optimizer, seed and validation split; other "
                                                    "settings not given are its run's")
    g.add_argument("--overwrite", action="store_true", help="replace an existing OUT/model.npz")
    i = p.add_argument_group("instances")
    i.add_argument("--instances", action="store_true", default=None,
                   help="the masks are instance label images (0 background, one id per object, "
                        "ids up to 65535, 8/16-bit PNG or TIFF): learn 3 classes, background / "
                        "interior / border, so that touching objects come out separate "
                        "(predict and evaluate then give one label per object)")
    i.add_argument("--border", type=positive_int, default=None,
                   help="with --instances: width in pixels of the border band inside each object "
                        "where it meets another object or the background (default 2)")
    a = p.add_argument_group("architecture")
    a.add_argument("--arch", choices=("unet", "unet++", "attention"), default=None, help="default unet")
    a.add_argument("--depth", type=positive_int, default=None, help="poolings (default 3)")
    a.add_argument("--base-channels", type=positive_int, default=None, help="default 16")
    a.add_argument("--classes", type=positive_int, default=None,
                   help="number of classes (default: from the masks)")
    a.add_argument("--padding", choices=("same", "valid"), default=None,
                   help="valid: the paper's unpadded convolutions (output smaller than input; "
                        "default same)")
    a.add_argument("--batchnorm", action="store_true", default=None)
    a.add_argument("--upsample", choices=("transpose", "bilinear"), default=None,
                   help="default transpose")
    a.add_argument("--no-skip", action="store_true", default=None,
                   help="drop the skip connections (to see why they matter)")
    a.add_argument("--init", choices=("torch", "he"), default=None,
                   help="weight init: PyTorch's default or the paper's He-normal (default torch)")
    a.add_argument("--dtype", choices=("float32", "float64"), default=None, help="default float32")
    a.add_argument("--spatial-dims", type=int, choices=(2, 3), default=None,
                   help="2: images; 3: volumes (.npy (D, H, W) or (C, D, H, W), multi-page TIFF), "
                        "a 3D U-Net (default: from the files: .npy masks or TIFF masks of several "
                        "pages are volumes)")
    a.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="unet_np backend (default auto: numba when it is installed, else numpy)")
    p.add_argument("--distributed", action="store_true",
                   help="train data-parallel over MPI ranks (implied under mpiexec; needs the mpi "
                        "extra): mpiexec -n 2 unet-np train ...")
    add_common(p)
    return p


def distributed_run(args):
    """True when this run trains data-parallel over MPI ranks (mpiexec -n K, or --distributed)."""
    from .. import distributed
    return bool(getattr(args, "distributed", False)) or distributed.launched_by_mpi()


def build_model(args, in_channels, num_classes):
    import unet_np
    common = dict(depth=args.depth, base_channels=args.base_channels, batchnorm=args.batchnorm,
                  upsample=args.upsample, init=args.init, dtype=args.dtype, backend=args.backend,
                  spatial_dims=getattr(args, "spatial_dims", None) or 2)
    if args.arch == "unet":
        return unet_np.UNet(in_channels, num_classes, skip=not args.no_skip, padding=args.padding,
                            **common)
    if args.no_skip or args.padding != "same":
        raise CLIError(f"--arch {args.arch} takes neither --no-skip nor --padding valid "
                       f"(they are options of --arch unet)")
    cls = unet_np.UNetPlusPlus if args.arch == "unet++" else unet_np.AttentionUNet
    return cls(in_channels, num_classes, **common)


class Progress:
    """A tqdm bar per epoch on a terminal; otherwise one line per epoch (none with --quiet)."""

    def __init__(self, epochs, quiet):
        import sys
        self.epochs, self.quiet, self.bar, self.tqdm = epochs, quiet, None, None
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass

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
            val = f"  val Dice {fmt(rec['val_dice'])}  IoU {fmt(rec.get('val_iou'))}"
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


def run_training(args, ds, out, quiet=False):
    """Train on a SegmentationDataset with the options in args; writes model.npz, last.npz,
    metrics.json/.csv and the plots into out. A dataset of instance targets (ds.instances, from
    load_folder(instances=True)) also gets the instance scores of the best model ("instance" in
    the final metrics) and an overlay of the separated objects. Returns (model, final metrics,
    skipped plots, trainer); on MPI ranks other than 0, (None, None, [], trainer)."""
    import unet_np
    from ..data import pipeline
    from ..metrics import score_images
    from ..nn.loss import CrossEntropyLoss
    from ..optim import SGD, Adam
    from ..viz import instance_overlay, learning_curves, overlay

    args.backend = resolve_backend(args.backend, quiet)
    num_classes = ds.num_classes
    if args.resume:
        model, resume_meta = load_model(args.resume, backend=args.backend)
        if model.in_channels != ds.in_channels:
            raise CLIError(f"{args.resume}: the model takes {model.in_channels} channel(s), the "
                           f"images have {ds.in_channels}")
        explicit = {key for key in RESUME_CHANGEABLE if getattr(args, key) is not None}
        changed, recorded = resume_settings(args, model, resume_meta)
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
    if not 0 <= args.val_split < 1:
        raise CLIError(f"--val-split must be in [0, 1), got {args.val_split}")
    if args.weight_map:
        ds.compute_weights()            # a dataset of instance targets: from its true instances
    if not args.resume:
        unet_np.seed(args.seed)
        model = build_model(args, ds.in_channels, num_classes)
    try:
        crop = pipeline.crop_size(model, [m.shape for m in ds.masks])
    except ValueError as e:
        raise CLIError(str(e).replace("use a smaller depth", "use a smaller --depth")) from None

    lr = args.lr if args.lr is not None else (1e-3 if args.optimizer == "adam" else 1e-2)
    opt = (Adam(model.parameters(), lr=lr) if args.optimizer == "adam"
           else SGD(model.parameters(), lr=lr, momentum=args.momentum))
    if distributed_run(args):
        from ..distributed import DistributedTrainer as Trainer
    else:
        from ..train import Trainer
    trainer = Trainer(model, opt, loss=CrossEntropyLoss())
    # what predict and evaluate need to know of this run (fit adds how the data was read)
    trainer.run_meta = json_clean({"num_classes": num_classes,
                                   "train": {**{key: getattr(args, key) for key in TRAIN_DEFAULTS},
                                             "lr": lr}})
    if ds.instances is not None:         # the model predicts instance targets: predict/evaluate know
        trainer.run_meta["instances"] = {"border": int(ds.instance_border)}
    if args.resume:
        try:
            trainer.resume(args.resume)
        except (KeyError, ValueError) as e:
            raise CLIError(f"{args.resume}: cannot resume from it ({e})") from None
        say(f"resuming from {args.resume} at epoch {trainer.epoch} (step {trainer.step})", quiet)
        if "lr" in explicit:                 # the optimizer state just loaded holds the old ones
            opt.lr = lr
        if "momentum" in explicit and hasattr(opt, "momentum"):
            opt.momentum = args.momentum
        if changed and trainer.is_root:      # MPI: rank 0 says it, once
            warn("resuming with settings other than the checkpoint's run: " + ", ".join(changed))
        if not recorded and trainer.is_root:
            warn(f"{args.resume} does not record the settings it was trained with (an older "
                 f"unet-np): the command line's, or the defaults, apply")

    tr, va = pipeline.split(len(ds), args.val_split, args.seed)     # the split fit makes below
    n_params = sum(int(p.data.size) for p in model.parameters())
    say(f"model: {type(model).__name__} {json.dumps(model.config())} ({n_params:,} parameters)", quiet)
    say(f"training on {len(tr)} image(s), validating on {len(va)}, crops of {'x'.join(map(str, crop))}, "
        f"{args.optimizer} lr {lr:g}, batch {args.batch_size}, {args.epochs} epochs"
        + (f", instance targets (border {ds.instance_border} px)" if ds.instances is not None else "")
        + (", weight map" if args.weight_map else "") + f", augment {args.augment}", quiet)
    if trainer.epoch >= args.epochs:
        say(f"the checkpoint is already at epoch {trainer.epoch} >= --epochs {args.epochs}: "
            f"nothing to train", quiet)
    progress = Progress(args.epochs, quiet)
    trainer.callbacks.append(lambda ev, info: progress.epoch(info) if ev == "epoch" else None)
    t0 = time.perf_counter()
    try:
        trainer.fit(ds, epochs=args.epochs, batch_size=args.batch_size, val=args.val_split, crop=crop,
                    augment=args.augment, weight_map=bool(args.weight_map), seed=args.seed,
                    out_dir=str(out), progress=progress.step)
    finally:
        progress.close()
    train_s = time.perf_counter() - t0
    if not trainer.is_root:                  # MPI: only rank 0 evaluates and writes
        return None, None, [], trainer
    if not (out / "model.npz").exists():     # e.g. resumed past the end: keep the last weights
        trainer.save(str(out / "model.npz"))

    best, _ = load_model(out / "model.npz", backend=args.backend)
    final = {"train_seconds": train_s, "epochs": trainer.epoch, "steps": trainer.step}
    skipped = []
    eval_idx = va if len(va) else tr
    eval_images = [ds.images[i] for i in eval_idx]
    eval_masks = [ds.masks[i] for i in eval_idx]
    if ds.instances is not None:
        preds, objects = predict_objects(best, eval_images, True)
    else:
        preds = predict_labels(best, eval_images)
    final["evaluated_on"] = "validation" if len(va) else "training (no validation split)"
    final.update(score_images(preds, eval_masks, best.num_classes))
    if ds.instances is not None:
        true_objects = [ds.instances[i] for i in eval_idx]
        final["dice_cells"] = cell_dice(preds, eval_masks)
        final["instance"] = score_objects(true_objects, objects)
    write_metrics(out, trainer.history, final)
    if trainer.history:
        plot("learning curves", learning_curves, skipped, trainer.history, out / "learning_curves.png")
    if ds.spatial_dims == 3:                  # volumes: their middle slices
        eval_images, eval_masks, preds = (middle_slices(v) for v in (eval_images, eval_masks, preds))
    first4 = lambda items: np.stack(items[:4]) if len({a.shape for a in items[:4]}) == 1 \
        else items[0][None]  # noqa: E731
    plot("overlay", overlay, skipped, first4(eval_images), first4(eval_masks), first4(preds),
         out / "overlay.png", num_classes=best.num_classes, names=[ds.names[i] for i in eval_idx[:4]])
    if ds.instances is not None:
        plot("instance overlay", instance_overlay, skipped, eval_images[:4], true_objects[:4],
             objects[:4], out / "instances.png", names=[ds.names[i] for i in eval_idx[:4]])
    return best, final, skipped, trainer


def middle_slices(volumes):
    """The middle slice (along D) of each volume (..., D, H, W), for 2-D pictures."""
    return [v[..., v.shape[-3] // 2, :, :] for v in volumes]


def cell_dice(preds, masks):
    """Dice of the cell pixels (any class but background) over a set of images."""
    inter = sum(int(np.count_nonzero((p > 0) & (m > 0))) for p, m in zip(preds, masks))
    total = sum(int(np.count_nonzero(p > 0)) + int(np.count_nonzero(m > 0))
                for p, m in zip(preds, masks))
    return 2.0 * inter / total if total else 1.0


def print_summary(final, out, skipped, quiet=False):
    say("", quiet)
    say(f"{final['evaluated_on']} set, {final['num_images']} image(s), best model "
        f"({final['epochs']} epochs, {final['train_seconds']:.0f} s of training):", quiet)
    print_metrics(final, quiet)
    if final.get("instance"):
        say(f"cell Dice (interior + border) {fmt(final['dice_cells'])}", quiet)
        print_instances(final["instance"], quiet)
    written = sorted(p.name for p in Path(out).iterdir() if p.suffix in (".npz", ".json", ".csv", ".png"))
    say(f"wrote {out}/: {', '.join(written)}", quiet)
    if skipped:
        warn(f"skipped plots: {', '.join(skipped)} (plots need matplotlib: pip install matplotlib, "
             f"or the [viz] extra)")


def run(args):
    from ..data import check_dir, load_folder
    check_dir(args.images, "image")        # before the output folder is made: no empty one is left
    check_dir(args.masks, "mask")
    out = Path(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        if not args.resume:
            raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it, or --resume "
                           f"{out / 'last.npz'} to continue training")
        if Path(args.resume).resolve().parent != out.resolve():
            raise CLIError(f"{out / 'model.npz'} exists and belongs to another run than "
                           f"{args.resume}: resume into the checkpoint's own folder, or pass "
                           f"--overwrite to replace it")
    note = instance_settings(args)
    from ..data import spatial_dims_of
    found = spatial_dims_of(args.images, args.masks)
    if args.spatial_dims == 2 and found == 3:
        raise CLIError(f"{args.masks}: the masks are volumes (D, H, W); --spatial-dims 2 trains on "
                       f"images (PNG, TIFF of one page): drop it, or give 2-D masks")
    args.spatial_dims = args.spatial_dims or found
    if args.spatial_dims == 3:
        from ..data import load_volumes
        if args.instances:
            raise CLIError("--instances works on 2-D images; volumes are trained on classes")
        ds = load_volumes(args.images, args.masks, max_classes=max(256, args.classes or 0))
    else:
        # instance label images: read as ids (--instances), as classes (--classes), or refused when
        # they look like instances and neither is given (load_folder's DataError names both flags)
        ds = load_folder(args.images, args.masks, normalize="image",
                         instances=True if args.instances else (False if args.classes else None),
                         border=args.border or 2, max_classes=max(256, args.classes or 0))
    out = prepare_out_dir(args.out)
    quiet = args.quiet
    if distributed_run(args):
        from ..distributed import is_root
        quiet = quiet or not is_root()
    if note:
        say(note, quiet)
    say(str(ds.diagnostics()), quiet)
    say("", quiet)
    _, final, skipped, _ = run_training(args, ds, out, quiet=quiet)
    if final is not None:
        print_summary(final, out, skipped, quiet)
    return 0

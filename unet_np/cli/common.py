"""What the commands share: errors, output, option types, loading a model with its data settings,
prediction over whole images, and the metrics table.

Printing: results go to stdout; messages about the run (warnings, and with --json everything but the
JSON document) go to stderr, so ``unet-np evaluate --json | python -m json.tool`` works.
"""
import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from .. import backends

PROG = "unet-np"
BACKEND_CHOICES = ("auto",) + tuple(backends.NAMES)


class CLIError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------
def say(msg="", quiet=False, err=False):
    """Print a line (to stderr when err), unless quiet."""
    if not quiet:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def warn(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def json_clean(obj):
    """NaN / inf -> None, NumPy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def table(rows, header):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def plot(name, fn, skipped, *args, **kwargs):
    """Draw one plot; a missing matplotlib (or a plotting failure) adds it to `skipped`."""
    from .. import viz
    try:
        return fn(*args, **kwargs)
    except viz.VizUnavailable:
        skipped.append(name)
    except Exception as e:  # noqa: BLE001 - a plot must never lose a trained model
        skipped.append(f"{name} ({type(e).__name__}: {e})")
    return None


def metrics_rows(ev):
    rows = [[f"class {c['class']}", fmt(c["dice"]), fmt(c["iou"]), fmt(c["precision"]),
             fmt(c["recall"]), c["support"]] for c in ev["per_class"]]
    rows.append(["mean", fmt(ev["dice"]), fmt(ev["iou"]), "", "", ""])
    return rows


def print_metrics(ev, quiet=False, err=False):
    say(table(metrics_rows(ev), ["", "Dice", "IoU", "precision", "recall", "pixels"]), quiet, err)
    extra = f"pixel accuracy {fmt(ev['pixel_accuracy'])}   boundary F1 (2 px) {fmt(ev['boundary_f1'])}"
    if "dice_foreground" in ev:
        extra += f"   foreground Dice {fmt(ev['dice_foreground'])}"
    say(extra, quiet, err)


def write_metrics(out, history, final):
    """metrics.json (history + final scores) and metrics.csv (one row per epoch)."""
    with open(out / "metrics.json", "w") as f:
        json.dump(json_clean({"history": history, "final": final}), f, indent=1)
    keys = []
    for rec in history:
        keys += [k for k in rec if k not in keys]
    with open(out / "metrics.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        for rec in history:
            wr.writerow({k: rec.get(k, "") for k in keys})


# ---------------------------------------------------------------------------------------------------
# Files and models
# ---------------------------------------------------------------------------------------------------
def prepare_out_dir(path):
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


def resolve_backend(name, quiet=False, err=False):
    """'auto' -> numba where it is installed, else numpy (said first, on stdout or with err on
    stderr); other names as given."""
    if name != "auto":
        return name
    chosen = "numba" if "numba" in backends.available() else "numpy"
    hint = "" if chosen == "numba" else " (pip install numba for the compiled CPU kernels)"
    say(f"backend: {chosen}{hint}", quiet, err)
    return chosen


def load_model(path, backend="numpy"):
    """(model, data meta) from a checkpoint; the meta says how images were normalised and masks
    written during training (defaults for a checkpoint written without them)."""
    from ..models import SegmentationModel
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: model file does not exist")
    model, ck = SegmentationModel.load(str(p), backend=backend, return_checkpoint=True)
    data = dict(ck.meta.get("data") or {})
    data.setdefault("normalize", "image")
    data.setdefault("mask_convention", "binary255" if model.num_classes <= 2 else "labels")
    return model, data


def normalise(x, data):
    """An image (C, H, W) normalised as the model's training images were (data: its data meta)."""
    from ..data import normalize_image
    mode = data.get("normalize", "image")
    if mode in (None, "none"):
        return np.asarray(x, dtype=np.float32)
    return normalize_image(x, mode, data.get("mean"), data.get("std"))


def image_files(path, volumes=False):
    """The image files (volume files: .npy, .tif) of a folder, or the one file given."""
    from ..data import IMAGE_EXTENSIONS, VOLUME_EXTENSIONS, list_images
    extensions = VOLUME_EXTENSIONS if volumes else IMAGE_EXTENSIONS
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{p}: input does not exist")
    if p.is_file():
        return [p]
    files = list_images(p, extensions)
    if not files:
        raise CLIError(f"{p}: no {'volume' if volumes else 'image'} files ({', '.join(extensions)})")
    return files


def probabilities(model, x, tile=None, overlap=None):
    """Class probabilities (K, H, W) of one normalised image of any size (overlap-tile)."""
    from ..infer import predict_tiled
    try:
        return predict_tiled(model, x, tile=tile, overlap=overlap)
    except MemoryError as e:
        raise CLIError(f"{e} (try a smaller --tile)") from None


def predict_labels(model, images, tile=None, overlap=None):
    """Labels (H, W) for each normalised image (any sizes)."""
    return [probabilities(model, x, tile, overlap).argmax(axis=0) for x in images]


# ---------------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------------
INSTANCE_KEYS = ("f1", "precision", "recall", "ap_dsb", "pq", "sq", "rq", "splits", "merges")


def instance_meta(data):
    """{'border': N} when the checkpoint's model predicts instance targets (background / interior
    / border; trained with --instances), else None (data: load_model's data meta)."""
    inst = data.get("instances")
    if inst is None and data.get("mask_convention") == "instances":
        inst = {"border": None}
    return inst


# How the command seeds the watershed (labels_from_probabilities' seeding arguments): interior
# above 0.4, and seeds under 3 pixels dropped unless their p_interior reaches 0.9. On the demo's
# held-out images this beat the library's plain default (0.5, every seed) on 7 of 8 trained
# networks (full and --quick, seeds 0-3; instance F1 +0.03 on average, fewer splits) and lost on
# one (--quick seed 2: 0.667 against 0.679); see docs/instances.md.
SEEDING = dict(interior_threshold=0.4, min_seed_size=3, sure_interior=0.9)


def objects_from(probs, instance_model, min_size=10):
    """An instance label image (H, W) uint16 from one image's class probabilities: for a model
    trained on instance targets, labels_from_probabilities with SEEDING (interior seeds grown by a
    watershed); for any other model, the connected components (4-connected) of the non-background
    prediction, objects under min_size pixels dropped."""
    from ..postprocess import labels_from_probabilities, remove_small
    if instance_model:
        try:
            return labels_from_probabilities(probs, min_size=min_size, dtype=np.uint16, **SEEDING)
        except ValueError as e:
            raise CLIError(str(e)) from None
    from ..data import label_components
    lab = remove_small(label_components(probs.argmax(axis=0) > 0, connectivity=4), min_size)
    if int(lab.max()) > 65535:
        raise CLIError(f"{int(lab.max())} objects do not fit a 16-bit label image")
    return lab.astype(np.uint16)


def predict_objects(model, images, instance_model, min_size=10, tile=None, overlap=None):
    """(class labels, instance labels) for each normalised image: see objects_from."""
    labels, objects = [], []
    for x in images:
        probs = probabilities(model, x, tile, overlap)
        labels.append(probs.argmax(axis=0))
        objects.append(objects_from(probs, instance_model, min_size))
    return labels, objects


def score_objects(true_labels, pred_labels):
    """Pooled instance scores (metrics.aggregate_instance_matches) of pairs of label images."""
    from ..metrics import aggregate_instance_matches, match_instances
    return aggregate_instance_matches([match_instances(t, p) for t, p in zip(true_labels,
                                                                            pred_labels)])


def print_instances(inst, quiet=False, err=False):
    """The instance scores as a one-row table, and the object counts."""
    say(table([["objects (IoU > 0.5)"] + [fmt(inst[k], 3) if k not in ("splits", "merges")
                                          else inst[k] for k in INSTANCE_KEYS]],
              [""] + list(INSTANCE_KEYS)), quiet, err)
    say(f"{inst['n_true']} true objects, {inst['n_pred']} predicted, {inst['tp']} matched at IoU "
        f"> 0.5; ap_dsb is the mean of TP/(TP+FP+FN) over IoU 0.5:0.05:0.95", quiet, err)


# ---------------------------------------------------------------------------------------------------
# Option types and shared options
# ---------------------------------------------------------------------------------------------------
def int_at_least(lowest, words):
    """An argparse type: an integer >= lowest, else an error saying 'expected <words>'."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lowest:
            raise argparse.ArgumentTypeError(f"expected {words}, got {s!r}")
        return v
    return parse


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def add_common(p):
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--quiet", action="store_true", help="print less")


def add_backend(p):
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="unet_np backend (default auto: numba when it is installed, else numpy)")


def add_tiling(p):
    p.add_argument("--tile", type=positive_int, default=None,
                   help="output pixels per tile edge (default: the whole image when it fits in "
                        "about 1 GiB, else 256)")
    p.add_argument("--overlap", type=nonneg_int, default=None,
                   help="context pixels on each side of a tile, mirror-padded at the image border "
                        "(default: the receptive field's reach, so tiling changes nothing)")
    add_backend(p)


def one_line(e):
    """One line that names the problem: the first concrete problem of a multi-line message."""
    from ..data import DataError
    from ..train import TrainingError
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

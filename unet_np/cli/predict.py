"""unet-np predict: one mask per input image, written as the training masks were; for a model
trained with --instances, one 16-bit instance label image per input image."""
import argparse
from pathlib import Path

import numpy as np

from .common import (CLIError, add_common, add_tiling, image_files, instance_meta, load_model,
                     nonneg_int, normalise, objects_from, prepare_out_dir, probabilities,
                     resolve_backend, say)


def add_parser(sub):
    p = sub.add_parser("predict", help="segment images with a trained model",
                       description="Write one mask per input image (same file stem, .png), in the "
                                   "convention of the training masks (binary as 0/255). Any image "
                                   "size works: the image is mirror-padded and, when large, tiled. "
                                   "With --instances (on by default for a model trained with "
                                   "--instances), write one 16-bit instance label image per input "
                                   "image instead (0 background, 1..K the objects).")
    p.add_argument("--model", required=True, help="a model.npz written by unet-np train")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true",
                   help="also write the class probabilities (num_classes, H, W) as .npy")
    p.add_argument("--overwrite", action="store_true",
                   help="replace masks (and .npy files) already in --out")
    i = p.add_argument_group("instances")
    i.add_argument("--instances", action=argparse.BooleanOptionalAction, default=None,
                   help="write instance label images, one id per object (default: on when the "
                        "model was trained with --instances; for another model the objects are "
                        "the connected components of its non-background prediction)")
    i.add_argument("--format", choices=("tif", "png"), default="tif",
                   help="with --instances: 16-bit TIFF (default; needs tifffile) or 16-bit PNG")
    i.add_argument("--min-size", type=nonneg_int, default=10,
                   help="with --instances: drop objects of fewer pixels (default 10; 0 keeps all)")
    add_tiling(p)
    add_common(p)
    return p


def read_checked(path, model):
    """An image file, refused when its channels are not the model's."""
    from ..data import read_image
    x = read_image(path)
    if x.shape[0] != model.in_channels:
        raise CLIError(f"{path}: image has {x.shape[0]} channel(s), the model takes {model.in_channels}")
    return x


def run(args):
    from ..data import whole_file, write_mask
    from ..data.io import write_labels
    model, data = load_model(args.model, backend=resolve_backend(args.backend, args.quiet))
    inst_model = instance_meta(data) is not None
    instances = inst_model if args.instances is None else args.instances
    if instances and args.format == "tif":
        try:
            import tifffile  # noqa: F401
        except ImportError:
            raise CLIError("writing 16-bit TIFF label images needs tifffile: pip install tifffile "
                           "(or pass --format png)") from None
    files = image_files(args.input)
    out = Path(args.out)
    if out.resolve() in {f.parent.resolve() for f in files}:
        raise CLIError(f"{args.out}: is the folder of the input images; choose another --out")
    stems = {}
    for f in files:
        if f.stem in stems:
            raise CLIError(f"{f}: has the same name as {stems[f.stem].name}; the outputs would collide")
        stems[f.stem] = f
    ext = "." + args.format if instances else ".png"
    suffixes = (ext, ".npy") if args.probabilities else (ext,)
    there = [out / (stem + x) for stem in stems for x in suffixes if (out / (stem + x)).exists()]
    if there and not args.overwrite:
        more = f" and {len(there) - 1} more exist" if len(there) > 1 else " exists"
        raise CLIError(f"{there[0]}{more}: pass --overwrite to replace, or choose another --out")
    prepare_out_dir(out)
    conv, pal = data.get("mask_convention"), data.get("palette")
    if conv in ("binary255", "binary01", "empty", "instances") and model.num_classes > 2:
        conv = "labels"
    if instances:
        say(f"instance label images ({args.format}, 16-bit): "
            + ("the model was trained with --instances" if inst_model else
               "objects are the connected components of the non-background prediction"),
            args.quiet)
    for f in files:
        x = normalise(read_checked(f, model), data)
        probs = probabilities(model, x, args.tile, args.overlap)
        target = out / f"{f.stem}{ext}"
        if instances:
            objects = objects_from(probs, inst_model, args.min_size)
            write_labels(target, objects)
            summary = f"{int(objects.max())} objects"
        else:
            labels = probs.argmax(axis=0)
            write_mask(target, labels, convention=conv,
                       palette=[tuple(c) for c in pal] if pal else None)
            summary = ", ".join(f"class {c}: {100.0 * np.mean(labels == c):.1f}%"
                                for c in range(model.num_classes))
        if args.probabilities:
            with whole_file(out / f"{f.stem}.npy") as fh:       # whole or not at all, as the masks
                np.save(fh, probs.astype(np.float32))
        say(f"{f.name} -> {target} ({x.shape[1]}x{x.shape[2]}, {summary})", args.quiet)
    what = "instance label image(s)" if instances else f"mask(s) ({conv} convention)"
    say(f"wrote {len(files)} {what} to {out}", args.quiet)
    return 0

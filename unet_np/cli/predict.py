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
    """An image (a volume, for a 3-D model) file, refused when its channels are not the model's."""
    from ..data import read_image, read_volume
    x = read_volume(path) if model.spatial_dims == 3 else read_image(path)
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
    volumes = model.spatial_dims == 3
    if volumes and instances:
        raise CLIError("--instances works on 2-D images; this model segments volumes")
    files = image_files(args.input, volumes)
    out = Path(args.out)
    if out.resolve() in {f.parent.resolve() for f in files}:
        raise CLIError(f"{args.out}: is the folder of the input images; choose another --out")
    stems = {}
    for f in files:
        if f.stem in stems:
            raise CLIError(f"{f}: has the same name as {stems[f.stem].name}; the outputs would collide")
        stems[f.stem] = f
    # a volume's mask in its input's format (.npy or .tif); an image's as .png (or --format)
    ext = {f.stem: (f.suffix if volumes else "." + args.format if instances else ".png")
           for f in files}
    probs_name = "_probabilities.npy" if volumes else ".npy"
    there = [out / name for stem in stems
             for name in [stem + ext[stem]] + ([stem + probs_name] if args.probabilities else [])
             if (out / name).exists()]
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
        target = out / f"{f.stem}{ext[f.stem]}"
        if volumes:
            from ..data import write_volume_mask
            labels = probs.argmax(axis=0)
            write_volume_mask(target, labels, "binary255" if conv == "binary255" else "labels")
            summary = ", ".join(f"class {c}: {100.0 * np.mean(labels == c):.1f}%"
                                for c in range(model.num_classes))
        elif instances:
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
            with whole_file(out / f"{f.stem}{probs_name}") as fh:  # whole or not at all, as masks
                np.save(fh, probs.astype(np.float32))
        say(f"{f.name} -> {target} ({'x'.join(map(str, x.shape[1:]))}, {summary})", args.quiet)
    what = "instance label image(s)" if instances else f"mask(s) ({conv} convention)"
    say(f"wrote {len(files)} {what} to {out}", args.quiet)
    return 0

"""unet-np evaluate: a model's scores on a folder of images with masks."""
import json
import time

from .common import (CLIError, add_common, add_tiling, json_clean, load_model, normalise,
                     predict_labels, print_metrics, resolve_backend, say)


def add_parser(sub):
    p = sub.add_parser("evaluate", help="score a model on images with masks",
                       description="Per-class and mean Dice and IoU, pixel accuracy and boundary F1 "
                                   "(2 px tolerance) of a model on a folder of images and masks.")
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--json", action="store_true",
                   help="print the scores as one JSON document on stdout, and nothing else there "
                        "(the table goes to stderr)")
    add_tiling(p)
    add_common(p)
    return p


def run(args):
    from ..data import load_folder
    from ..metrics import score_images
    model, data = load_model(args.model, backend=resolve_backend(args.backend, args.quiet, err=args.json))
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
    preds = predict_labels(model, [normalise(x, data) for x in ds.images], args.tile, args.overlap)
    ev = score_images(preds, ds.masks, model.num_classes)
    ev["seconds"] = time.perf_counter() - t0
    say(f"{len(ds)} image(s) from {args.images}, model {args.model}:", args.quiet, err=args.json)
    print_metrics(ev, args.quiet, err=args.json)
    if args.json:
        print(json.dumps(json_clean(ev)), flush=True)
    return 0

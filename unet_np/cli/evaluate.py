"""unet-np evaluate: a model's scores on a folder of images with masks; with --instances also the
instance scores (objects matched by IoU) against instance label images."""
import argparse
import json
import time

from .common import (CLIError, add_common, add_tiling, fmt, instance_meta, json_clean, load_model,
                     nonneg_int, normalise, predict_labels, predict_objects, print_instances,
                     print_metrics, resolve_backend, say)


def add_parser(sub):
    p = sub.add_parser("evaluate", help="score a model on images with masks",
                       description="Per-class and mean Dice and IoU, pixel accuracy and boundary F1 "
                                   "(2 px tolerance) of a model on a folder of images and masks. "
                                   "With --instances (on by default for a model trained with "
                                   "--instances) the masks are instance label images and the "
                                   "objects are matched by IoU: precision, recall, F1 at IoU 0.5, "
                                   "the Data Science Bowl's AP, panoptic quality, splits, merges.")
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--json", action="store_true",
                   help="print the scores as one JSON document on stdout, and nothing else there "
                        "(the table goes to stderr); instance scores under \"instance\"")
    i = p.add_argument_group("instances")
    i.add_argument("--instances", action=argparse.BooleanOptionalAction, default=None,
                   help="the masks are instance label images: score objects (default: on when the "
                        "model was trained with --instances; for another model the predicted "
                        "objects are the connected components of its non-background prediction)")
    i.add_argument("--min-size", type=nonneg_int, default=10,
                   help="with --instances: drop predicted objects of fewer pixels (default 10)")
    add_tiling(p)
    add_common(p)
    return p


def run(args):
    from ..data import load_folder
    from ..metrics import aggregate_instance_matches, match_instances, score_images
    err = args.json                      # with --json, stdout holds the JSON document only
    model, data = load_model(args.model, backend=resolve_backend(args.backend, args.quiet, err=err))
    saved = instance_meta(data)
    inst_model = saved is not None
    instances = inst_model if args.instances is None else args.instances
    if inst_model and not instances:
        raise CLIError(f"{args.model}: the model predicts instance targets (trained with "
                       f"--instances); evaluate it with --instances against instance label images")
    palette = ([tuple(c) for c in data["palette"]] if data.get("mask_convention") == "rgb"
               and data.get("palette") else None)
    # masks: instance label images with --instances; else classes (a model of more than two classes
    # says so itself; for a binary one, instance-looking masks are refused naming --instances)
    if model.spatial_dims == 3:
        from ..data import load_volumes
        if instances:
            raise CLIError("--instances works on 2-D images; this model segments volumes")
        ds = load_volumes(args.images, args.masks, normalize=None)
    else:
        ds = load_folder(args.images, args.masks, normalize=None, palette=palette,
                         instances=True if instances else (False if model.num_classes > 2 else None),
                         border=(saved or {}).get("border") or 2)
    if ds.in_channels != model.in_channels:
        raise CLIError(f"{args.images}: images have {ds.in_channels} channel(s), the model takes "
                       f"{model.in_channels}")
    if instances and not inst_model:      # a class model: its classes against the objects' pixels
        truth = [(m > 0).astype(m.dtype) for m in ds.instances]
    else:
        truth = ds.masks
    for name, m in zip(ds.names, truth):
        if int(m.max()) >= model.num_classes:
            raise CLIError(f"{name}: mask holds label {int(m.max())}, the model knows "
                           f"{model.num_classes} classes (0..{model.num_classes - 1})")
    t0 = time.perf_counter()
    images = [normalise(x, data) for x in ds.images]
    if instances:
        preds, objects = predict_objects(model, images, inst_model, args.min_size, args.tile,
                                         args.overlap)
    else:
        preds = predict_labels(model, images, args.tile, args.overlap)
    ev = score_images(preds, truth, model.num_classes)
    if instances:
        per_image = [match_instances(t, o) for t, o in zip(ds.instances, objects)]
        ev["instance"] = aggregate_instance_matches(per_image)
        ev["instance"]["objects_from"] = ("watershed of the interior seeds" if inst_model else
                                          "connected components of the prediction")
        ev["instance_per_image"] = [
            {"name": nm, **{k: r[k] for k in ("f1", "ap_dsb", "n_true", "n_pred", "tp")}}
            for nm, r in zip(ds.names, per_image)]
    ev["seconds"] = time.perf_counter() - t0
    say(f"{len(ds)} image(s) from {args.images}, model {args.model}:", args.quiet, err=err)
    if instances and inst_model:
        say("pixels, against the targets (0 background, 1 interior, 2 border):", args.quiet, err)
    print_metrics(ev, args.quiet, err=err)
    if instances:
        say("", args.quiet, err)
        say(f"objects ({ev['instance']['objects_from']}, min size {args.min_size} px); "
            f"image-mean ap_dsb {fmt(ev['instance']['ap_dsb_image_mean'], 3)}:", args.quiet, err)
        print_instances(ev["instance"], args.quiet, err)
    if args.json:
        print(json.dumps(json_clean(ev)), flush=True)
    return 0

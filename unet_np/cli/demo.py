"""unet-np demo: synthetic touching cells, trained, evaluated on held-out images, and pictured."""
import argparse
import json
import time

import numpy as np

from .common import (BACKEND_CHOICES, CLIError, add_common, fmt, plot, predict_objects,
                     prepare_out_dir, say, score_objects, table, write_metrics)
from .train import print_summary, run_training
from .demo3d import run3d

# batch normalisation: in a few hundred steps the small network learns the interior class of
# touching cells much better with it (test instance F1, seed 0: --quick 0.557 without, 0.657 with;
# the demo 0.470 without at 20 epochs, 0.848 with at 40; with the command's seeding,
# common.SEEDING, 0.727 and 0.867). See docs/usage.md.
DEMO = dict(n=80, size=64, depth=3, base_channels=8, epochs=40, batch_size=8, lr=3e-3, border=2,
            batchnorm=True)
DEMO_QUICK = dict(n=60, size=32, depth=2, base_channels=8, epochs=25, batch_size=4, lr=3e-3,
                  border=1, batchnorm=True)


def add_parser(sub):
    p = sub.add_parser("demo", help="train on synthetic touching cells, evaluate and plot",
                       description="Generate a synthetic set of touching cells with instance "
                                   "labels, train a small U-Net on their --instances targets "
                                   "(background / interior / border) with the paper's weight map, "
                                   "evaluate it on held-out images (Dice, instance F1 and AP), and "
                                   "write the model, metrics and plots (learning curves, overlays, "
                                   "the separated cells in colour, the weight map, feature maps).")
    p.add_argument("--out", default="unet-np-demo", help="output folder (default unet-np-demo)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (about half a CPU-minute; the full demo about 2)")
    p.add_argument("--3d", dest="three_d", action="store_true",
                   help="volumes instead: touching spheres, a 3D U-Net, the three middle planes")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out/model.npz")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="unet_np backend (default auto: numba when it is installed, else numpy)")
    add_common(p)
    return p


def run(args):
    if getattr(args, "three_d", False):                  # unet-np demo --3d
        return run3d(args)
    from ..data import (SegmentationDataset, instance_targets, normalize_image, touching_cells,
                        write_folder)
    from ..metrics import score_images
    from ..viz import feature_maps, instance_overlay, overlay, weight_map
    from .train import cell_dice
    cfg = DEMO_QUICK if args.quick else DEMO
    out = prepare_out_dir(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it")
    t0 = time.perf_counter()
    # touching cells without a background line between them: only the instance labels separate them
    images, _, instances = touching_cells(cfg["n"], cfg["size"], seed=args.seed, gap=False)
    n_test = max(2, cfg["n"] // 5)
    test_x, test_inst = images[-n_test:], instances[-n_test:]
    images, instances = images[:-n_test], instances[:-n_test]
    write_folder(out / "data" / "train", images, instances)      # masks: instance label images
    write_folder(out / "data" / "test", test_x, test_inst)
    say(f"synthetic touching cells: {len(images)} training and {n_test} test images of "
        f"{cfg['size']}x{cfg['size']} with instance labels in {out / 'data'}")
    ds = SegmentationDataset.from_instances(images, instances, border=cfg["border"],
                                            normalize="image")
    targs = argparse.Namespace(
        classes=None, weight_map=True, val_split=0.2, seed=args.seed, resume=None, arch="unet",
        depth=cfg["depth"], base_channels=cfg["base_channels"], batchnorm=cfg["batchnorm"],
        upsample="transpose", init="torch", dtype="float32", backend=args.backend, no_skip=False,
        padding="same", optimizer="adam", lr=cfg["lr"], momentum=0.9, epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], augment="basic")
    model, final, skipped, trainer = run_training(targs, ds, out, quiet=args.quiet)
    # the held-out test set, through the same path as `unet-np evaluate --instances`
    tx = [normalize_image(x) for x in test_x]
    test_targets = [instance_targets(a, cfg["border"]) for a in test_inst]
    preds, objects = predict_objects(model, tx, True)
    test = score_images(preds, test_targets, model.num_classes)
    test["dice_cells"] = cell_dice(preds, test_targets)
    test["instance"] = score_objects(list(test_inst), objects)
    final["test"] = test
    final["seconds_total"] = time.perf_counter() - t0
    hist = json.load(open(out / "metrics.json"))["history"]
    write_metrics(out, hist, final)
    plot("weight map", weight_map, skipped, images[0], ds.weights[0], out / "weight_map.png",
         mask=ds.masks[0], w0=10.0)
    plot("feature maps", feature_maps, skipped, model, tx[0], out / "feature_maps.png")
    plot("test overlay", overlay, skipped, test_x[:4], np.stack(test_targets[:4]),
         np.stack(preds[:4]), out / "test_overlay.png", num_classes=model.num_classes)
    plot("test instances", instance_overlay, skipped, test_x[:4], test_inst[:4], objects[:4],
         out / "test_instances.png")
    print_summary(final, out, skipped, args.quiet)
    say("")
    rows = [[name, fmt(ev["dice"]), fmt(ev["dice_cells"]), fmt(ev["instance"]["f1"]),
             fmt(ev["instance"]["ap_dsb"]), fmt(ev["instance"]["pq"]),
             f"{ev['instance']['tp']}/{ev['instance']['n_true']}"]
            for name, ev in (("validation", final), ("test", test))]
    print(table(rows, ["demo summary", "Dice (3 classes)", "cell Dice", "instance F1", "AP (DSB)",
                       "PQ", "cells found"]))
    again = " --overwrite" if (out / "predictions").is_dir() and any((out / "predictions").iterdir()) else ""
    print(f"done in {time.perf_counter() - t0:.0f} s. Next: unet-np predict --model {out}/model.npz "
          f"--input {out}/data/test/images --out {out}/predictions{again}")
    print(f"      or: unet-np evaluate --model {out}/model.npz --images {out}/data/test/images "
          f"--masks {out}/data/test/masks")
    return 0

"""unet-np demo: synthetic touching cells, trained, evaluated on held-out images, and pictured."""
import argparse
import json
import time

import numpy as np

from .common import (BACKEND_CHOICES, CLIError, add_common, fmt, predict_labels, plot,
                     prepare_out_dir, say, table, write_metrics)
from .train import print_summary, run_training

DEMO = dict(n=80, size=64, depth=3, base_channels=8, epochs=20, batch_size=8, lr=3e-3)
DEMO_QUICK = dict(n=60, size=32, depth=2, base_channels=8, epochs=25, batch_size=4, lr=3e-3)


def add_parser(sub):
    p = sub.add_parser("demo", help="train on synthetic touching cells, evaluate and plot",
                       description="Generate a synthetic set of touching cells, train a small U-Net "
                                   "with the paper's weight map, evaluate it on held-out images, and "
                                   "write the model, metrics and plots (learning curves, overlays, "
                                   "the weight map, feature maps of every level).")
    p.add_argument("--out", default="unet-np-demo", help="output folder (default unet-np-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny run (well under a minute)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the weights and the training")
    p.add_argument("--overwrite", action="store_true", help="replace an existing out/model.npz")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="unet_np backend (default auto: numba when it is installed, else numpy)")
    add_common(p)
    return p


def run(args):
    from ..data import SegmentationDataset, normalize_image, touching_cells, write_folder
    from ..metrics import score_images
    from ..viz import feature_maps, overlay, weight_map
    cfg = DEMO_QUICK if args.quick else DEMO
    out = prepare_out_dir(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it")
    t0 = time.perf_counter()
    images, masks, instances = touching_cells(cfg["n"], cfg["size"], seed=args.seed)
    n_test = max(2, cfg["n"] // 5)
    test_x, test_y = images[-n_test:], masks[-n_test:]
    images, masks, instances = images[:-n_test], masks[:-n_test], instances[:-n_test]
    write_folder(out / "data" / "train", images, masks)
    write_folder(out / "data" / "test", test_x, test_y)
    say(f"synthetic touching cells: {len(images)} training and {n_test} test images of "
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
    preds = predict_labels(model, tx)
    test = score_images(preds, list(test_y), model.num_classes)
    final["test"] = test
    hist = json.load(open(out / "metrics.json"))["history"]
    write_metrics(out, hist, final)
    plot("weight map", weight_map, skipped, images[0], ds.weights[0], out / "weight_map.png",
         mask=masks[0], w0=10.0)
    plot("feature maps", feature_maps, skipped, model, tx[0], out / "feature_maps.png")
    plot("test overlay", overlay, skipped, test_x[:4], test_y[:4], np.stack(preds[:4]),
         out / "test_overlay.png", num_classes=model.num_classes)
    print_summary(final, out, skipped, args.quiet)
    say("")
    rows = [["validation", fmt(final["dice"]), fmt(final["iou"]), fmt(final.get("dice_foreground")),
             fmt(final["boundary_f1"])],
            ["test", fmt(test["dice"]), fmt(test["iou"]), fmt(test.get("dice_foreground")),
             fmt(test["boundary_f1"])]]
    print(table(rows, ["demo summary", "Dice", "IoU", "cell Dice", "boundary F1"]))
    again = " --overwrite" if (out / "predictions").is_dir() and any((out / "predictions").iterdir()) else ""
    print(f"done in {time.perf_counter() - t0:.0f} s. Next: unet-np predict --model {out}/model.npz "
          f"--input {out}/data/test/images --out {out}/predictions{again}")
    return 0

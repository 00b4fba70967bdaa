"""unet-np demo --3d: synthetic touching spheres, a 3D U-Net trained on them, evaluated on held-out
volumes, and pictured in three orthogonal planes.

The same library path as ``unet-np train`` on a folder of volumes: the volumes are written as .npy
files (data.write_volumes), read back with data.load_volumes, and trained by cli.train.run_training
(Trainer.fit on the volumes' SegmentationDataset); the held-out volumes are read, predicted and
scored as ``unet-np evaluate`` does.
"""
import argparse
import json
import time

from .common import CLIError, fmt, plot, predict_labels, prepare_out_dir, say, table, write_metrics
from .train import print_summary, run_training

# spheres are about 10 voxels across at size 32: a depth-2 3D U-Net sees a whole one
DEMO3D = dict(n_train=24, n_test=6, size=32, depth=2, base_channels=8, epochs=20, batch_size=2,
              lr=3e-3)
DEMO3D_QUICK = dict(n_train=12, n_test=2, size=16, depth=2, base_channels=8, epochs=25, batch_size=2,
                    lr=3e-3)


def run3d(args, config=None):
    """The 3-D demo. args: out, quick, seed, overwrite, backend, quiet (the demo command's options).
    config: a dict replacing DEMO3D / DEMO3D_QUICK (keys as theirs), for a tiny run in tests."""
    from ..data import load_volumes, touching_spheres, write_volumes
    from ..metrics import score_images
    from ..viz import volume_planes
    cfg = dict(config) if config is not None else (DEMO3D_QUICK if args.quick else DEMO3D)
    out = prepare_out_dir(args.out)
    if (out / "model.npz").exists() and not args.overwrite:
        raise CLIError(f"{out / 'model.npz'} exists: pass --overwrite to replace it")
    t0, c0 = time.perf_counter(), time.process_time()
    n_train, n_test = cfg["n_train"], cfg["n_test"]
    images, masks, _ = touching_spheres(n_train + n_test, size=cfg["size"], seed=args.seed)
    write_volumes(out / "data" / "train", images[:n_train], masks[:n_train])
    write_volumes(out / "data" / "test", images[n_train:], masks[n_train:],
                  names=[f"vol_{i:04d}" for i in range(n_train, n_train + n_test)])
    size = "x".join([str(cfg["size"])] * 3)
    say(f"synthetic touching spheres: {n_train} training and {n_test} test volumes of {size} voxels "
        f"(.npy) in {out / 'data'}", args.quiet)
    # read back as `unet-np train --images OUT/data/train/images --masks OUT/data/train/masks` does
    ds = load_volumes(out / "data" / "train" / "images", out / "data" / "train" / "masks")
    targs = argparse.Namespace(
        classes=None, weight_map=False, val_split=0.2, seed=args.seed, resume=None, arch="unet",
        depth=cfg["depth"], base_channels=cfg["base_channels"], batchnorm=False, upsample="transpose",
        init="torch", dtype="float32", backend=args.backend, no_skip=False, padding="same",
        optimizer="adam", lr=cfg["lr"], momentum=0.9, epochs=cfg["epochs"],
        batch_size=cfg["batch_size"], augment="basic", spatial_dims=3)
    model, final, skipped, _ = run_training(targs, ds, out, quiet=args.quiet)
    # the held-out volumes, as `unet-np evaluate` reads and scores them
    test_ds = load_volumes(out / "data" / "test" / "images", out / "data" / "test" / "masks")
    preds = predict_labels(model, test_ds.images)
    test = score_images(preds, test_ds.masks, model.num_classes)
    final["test"] = test
    final["seconds_total"] = time.perf_counter() - t0
    final["cpu_seconds_total"] = time.process_time() - c0       # every thread of this process
    hist = json.load(open(out / "metrics.json"))["history"]
    write_metrics(out, hist, final)
    for i in range(min(2, len(preds))):
        plot("test planes", volume_planes, skipped, test_ds.images[i], test_ds.masks[i], preds[i],
             out / f"test_planes_{i}.png", num_classes=model.num_classes,
             title=f"{test_ds.names[i]} (held out): three orthogonal middle planes")
    print_summary(final, out, skipped, args.quiet)
    say("", args.quiet)
    rows = [[name, fmt(ev["dice"]), fmt(ev.get("dice_foreground")), fmt(ev["iou"]), str(ev["num_images"])]
            for name, ev in (("validation", final), ("test (held out)", test))]
    print(table(rows, ["demo --3d summary", "Dice (2 classes)", "sphere Dice", "IoU", "volumes"]))
    print(f"done in {final['seconds_total']:.0f} s ({final['cpu_seconds_total']:.0f} CPU s). Next: "
          f"unet-np predict --model {out}/model.npz --input {out}/data/test/images --out "
          f"{out}/predictions")
    print(f"      or: unet-np evaluate --model {out}/model.npz --images {out}/data/test/images "
          f"--masks {out}/data/test/masks")
    return 0

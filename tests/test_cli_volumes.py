"""Volumes end to end: .npy and multi-page TIFF volumes read, a 3D U-Net trained by `unet-np train`
(volumes detected from the files, or --spatial-dims 3), predict writing each mask in its input's
format, evaluate --json; and the errors a user meets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_np.data import (DataError, load_volumes, read_volume, read_volume_mask, spatial_dims_of,
                          write_volume_mask)

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = ["--epochs", "1", "--depth", "1", "--base-channels", "2", "--batch-size", "2", "--quiet",
        "--backend", "numpy"]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "unet_np.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


def spheres(n, shape=(6, 8, 10), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    out = []
    for _ in range(n):
        c = [rng.integers(2, s - 2) for s in shape]
        m = ((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 6).astype(np.uint8)
        out.append(((m * 0.7 + rng.random(shape) * 0.3).astype(np.float32), m))
    return out


def write_set(root, n=4, tiff=False, seed=0):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for k, (img, m) in enumerate(spheres(n, seed=seed)):
        if tiff:
            import tifffile
            tifffile.imwrite(root / "images" / f"v{k}.tif", (img * 65535).astype(np.uint16))
            write_volume_mask(root / "masks" / f"v{k}.tif", m, "binary255")
        else:
            np.save(root / "images" / f"v{k}.npy", img)
            write_volume_mask(root / "masks" / f"v{k}.npy", m)
    return root / "images", root / "masks"


def test_read_and_write_volumes(tmp_path):
    images, masks = write_set(tmp_path)
    assert spatial_dims_of(images, masks) == 3
    x = read_volume(images / "v0.npy")
    assert x.shape == (1, 6, 8, 10) and x.dtype == np.float32
    m, conv = read_volume_mask(masks / "v0.npy")
    assert m.shape == (6, 8, 10) and conv == "labels" and set(np.unique(m)) <= {0, 1}
    np.save(tmp_path / "c.npy", np.zeros((2, 3, 4, 5), np.float32))        # (C, D, H, W)
    assert read_volume(tmp_path / "c.npy").shape == (2, 3, 4, 5)
    ds = load_volumes(images, masks)
    assert ds.spatial_dims == 3 and len(ds) == 4 and ds.in_channels == 1 and ds.num_classes == 2
    write_volume_mask(tmp_path / "b.npy", m, "binary255")
    assert set(np.unique(np.load(tmp_path / "b.npy"))) <= {0, 255}
    assert np.array_equal(read_volume_mask(tmp_path / "b.npy")[0], m)       # 255 -> 1 again


def test_tiff_volumes(tmp_path):
    pytest.importorskip("tifffile")
    images, masks = write_set(tmp_path, tiff=True)
    assert spatial_dims_of(images, masks) == 3
    x = read_volume(images / "v0.tif")
    assert x.shape == (1, 6, 8, 10) and 0 <= x.min() and x.max() <= 1
    m, conv = read_volume_mask(masks / "v0.tif")
    assert conv == "binary255" and m.shape == (6, 8, 10)


def test_bad_volumes_name_the_file(tmp_path):
    images, masks = write_set(tmp_path)
    np.save(masks / "v1.npy", np.zeros((6, 8, 9), np.uint8))                # another shape
    with pytest.raises(DataError, match=r"v1.npy: mask volume is 6x8x9 but its image v1.npy is 6x8x10"):
        load_volumes(images, masks)
    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(DataError, match=r"flat.npy: a volume must be \(D, H, W\) or \(C, D, H, W\)"):
        read_volume(tmp_path / "flat.npy")
    np.save(tmp_path / "neg.npy", -np.ones((2, 2, 2), np.int16))
    with pytest.raises(DataError, match="negative"):
        read_volume_mask(tmp_path / "neg.npy")


def test_train_predict_evaluate_volumes(tmp_path):
    images, masks = write_set(tmp_path / "train")
    out = tmp_path / "run"
    p = cli("train", "--images", images, "--masks", masks, "--out", out, *TINY)
    assert p.returncode == 0, p.stderr
    import unet_np
    model = unet_np.load_model(out / "model.npz")
    assert model.spatial_dims == 3                                          # detected from .npy
    p = cli("predict", "--model", out / "model.npz", "--input", images, "--out", tmp_path / "pred",
            "--probabilities", "--quiet", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    pred = np.load(tmp_path / "pred" / "v0.npy")                            # the input's format
    assert pred.shape == (6, 8, 10) and pred.dtype == np.uint8
    assert np.load(tmp_path / "pred" / "v0_probabilities.npy").shape == (2, 6, 8, 10)
    p = cli("evaluate", "--model", out / "model.npz", "--images", images, "--masks", masks, "--json",
            "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    ev = json.loads(p.stdout)
    assert ev["num_images"] == 4 and 0 <= ev["dice"] <= 1 and 0 <= ev["boundary_f1"] <= 1


def test_a_volume_model_refuses_images_and_the_reverse(tmp_path):
    images, masks = write_set(tmp_path / "vol")
    out = tmp_path / "run"
    assert cli("train", "--images", images, "--masks", masks, "--out", out, *TINY).returncode == 0
    pngs = tmp_path / "png"
    pngs.mkdir()
    from unet_np.data import write_image
    write_image(pngs / "a.png", np.zeros((1, 8, 8), np.float32))
    p = cli("predict", "--model", out / "model.npz", "--input", pngs, "--out", tmp_path / "o")
    assert p.returncode == 2 and "no volume files" in p.stderr
    p = cli("train", "--images", images, "--masks", masks, "--out", tmp_path / "r2",
            "--spatial-dims", "2", *TINY)
    assert p.returncode == 2 and "the masks are volumes" in p.stderr and "Traceback" not in p.stderr


# -- unet-np demo --3d -------------------------------------------------------------------------------
TINY_DEMO3D = dict(n_train=4, n_test=2, size=8, depth=1, base_channels=2, epochs=1, batch_size=2, lr=3e-3)


def test_demo_3d_runs_the_volume_pipeline(tmp_path, monkeypatch, capsys):
    """`unet-np demo --3d --quick` (its configuration made tiny): volumes written as .npy, a 3D U-Net
    trained, the held-out volumes scored, the three planes drawn, and the summary printed."""
    from unet_np import viz
    from unet_np.cli import demo3d, main
    monkeypatch.setattr(demo3d, "DEMO3D_QUICK", TINY_DEMO3D)
    out = tmp_path / "demo3d"
    assert main(["demo", "--3d", "--quick", "--out", str(out), "--backend", "numpy", "--quiet"]) == 0
    for part, n in (("train", 4), ("test", 2)):
        for kind in ("images", "masks"):
            files = sorted((out / "data" / part / kind).glob("*.npy"))
            assert len(files) == n, (part, kind)
    assert np.load(out / "data" / "train" / "images" / "vol_0000.npy").shape == (1, 8, 8, 8)
    assert np.load(out / "data" / "test" / "masks" / "vol_0005.npy").shape == (8, 8, 8)
    assert (out / "model.npz").exists() and (out / "last.npz").exists()
    import unet_np
    model = unet_np.load_model(out / "model.npz")
    assert model.spatial_dims == 3 and model.depth == 1
    final = json.loads((out / "metrics.json").read_text())["final"]
    test = final["test"]
    assert test["num_images"] == 2 and 0 <= test["dice"] <= 1 and 0 <= test["dice_foreground"] <= 1
    assert final["cpu_seconds_total"] > 0 and final["seconds_total"] > 0
    if viz.available():
        assert (out / "test_planes_0.png").stat().st_size > 0 and (out / "test_planes_1.png").exists()
    printed = capsys.readouterr().out
    assert "demo --3d summary" in printed and "test (held out)" in printed
    # a second run into the same folder needs --overwrite
    assert main(["demo", "--3d", "--quick", "--out", str(out), "--backend", "numpy", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_volume_planes_draws_three_planes_and_checks_shapes(tmp_path):
    pytest.importorskip("matplotlib")
    from unet_np.viz import volume_planes
    vol = np.random.default_rng(0).random((1, 4, 6, 8)).astype(np.float32)
    lab = (vol[0] > 0.5).astype(np.int64)
    assert Path(volume_planes(vol, lab, lab, tmp_path / "p.png")).stat().st_size > 0
    assert Path(volume_planes(vol[0], None, lab, tmp_path / "q.png")).stat().st_size > 0
    with pytest.raises(ValueError, match="labels \\(D, H, W\\) of its size"):
        volume_planes(vol, lab, lab[:, :, :4], tmp_path / "r.png")


def test_volumes_doc_dataset_example_runs(capsys):
    """docs/volumes.md's dataset-form example (SegmentationDataset of volumes -> Trainer.fit) runs
    and prints what its comments say."""
    from tests.doc_blocks import python_blocks
    blocks = [src for _, src in python_blocks("docs/volumes.md") if "SegmentationDataset.from_arrays" in src]
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/volumes.md", "exec"), {"__name__": "docs_volumes"})
    assert capsys.readouterr().out.split("\n")[:2] == ["3 8", "2 True"]


def test_dataset_weight_map_of_a_volume_is_3d():
    """compute_weights on a volume: the 3-D map (objects 6-connected, distances in 3-D), not one
    map per slice."""
    from unet_np.data import SegmentationDataset, label_components, weight_map
    m = np.zeros((8, 10, 10), np.int64)
    m[1:4, 2:6, 2:6] = 1
    m[4:7, 2:6, 5:9] = 1
    ds = SegmentationDataset.from_arrays([np.random.rand(1, 8, 10, 10).astype(np.float32)], [m])
    w = ds.compute_weights()[0]
    assert w.shape == (8, 10, 10)
    assert np.allclose(w, weight_map(label_components(m), labels=m, spatial_dims=3), rtol=1e-6)
    assert not np.allclose(w, weight_map(label_components(m), labels=m), rtol=1e-3)  # per slice

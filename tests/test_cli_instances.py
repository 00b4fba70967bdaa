"""`unet-np train|predict|evaluate --instances` end to end on tiny synthetic instance label images
(16-bit ids up to 65535), in subprocesses; the refusal of instance masks without --instances; and
that --json leaves stdout to the JSON document."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")

from unet_np.data import touching_cells, write_image  # noqa: E402
from unet_np.data.io import read_labels, write_labels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
TINY = ["--epochs", "2", "--base-channels", "4", "--depth", "2", "--batch-size", "4",
        "--backend", "numpy"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "unet_np.cli", *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=300)


def assert_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 images of 32x32 with 16-bit instance label images: ids 300 apart, one cell 65535."""
    root = tmp_path_factory.mktemp("inst")
    x, _, inst = touching_cells(8, 32, seed=0, gap=False)
    idir, mdir = root / "images", root / "masks"
    idir.mkdir()
    mdir.mkdir()
    labs = []
    for i in range(len(x)):
        lab = np.where(inst[i] > 0, inst[i].astype(np.int64) * 300 + 1, 0)
        lab[lab == lab.max()] = 65535
        write_image(idir / f"cell{i}.png", x[i])
        write_labels(mdir / f"cell{i}.png", lab)
        labs.append(lab)
    return root, idir, mdir, labs


@pytest.fixture(scope="module")
def trained(data):
    root, idir, mdir, _ = data
    out = root / "run"
    p = cli("train", "--images", idir, "--masks", mdir, "--out", out, "--instances", "--border",
            "1", *TINY)
    assert p.returncode == 0, p.stderr
    assert "instance targets (border 1 px), weight map" in p.stdout    # the weight map by default
    return out


def test_instance_masks_refused_without_instances(data):
    root, idir, mdir, _ = data
    out = root / "refused"
    line = assert_error(cli("train", "--images", idir, "--masks", mdir, "--out", out, *TINY),
                        "instance label images", "--instances", "--classes")
    assert str(mdir) in line
    assert not out.exists()                       # nothing is left behind


def test_instance_flags_that_do_not_fit(data, trained):
    root, idir, mdir, _ = data
    assert_error(cli("train", "--images", idir, "--masks", mdir, "--out", root / "b", "--border",
                     "2", *TINY), "--border", "--instances")
    assert_error(cli("train", "--images", idir, "--masks", mdir, "--out", root / "c",
                     "--instances", "--classes", "5", *TINY), "3 classes", "--classes 5")
    assert_error(cli("evaluate", "--model", trained / "model.npz", "--images", idir, "--masks",
                     mdir, "--no-instances"), "--instances")


def test_train_records_instances(trained):
    from unet_np.cli.common import instance_meta, load_model
    model, meta = load_model(trained / "model.npz")
    assert model.num_classes == 3 and instance_meta(meta) == {"border": 1}
    assert meta["train"]["weight_map"] is True
    final = json.loads((trained / "metrics.json").read_text())["final"]
    for key in ("f1", "precision", "recall", "ap_dsb", "pq", "sq", "rq", "splits", "merges"):
        assert key in final["instance"], key
    assert 0 <= final["instance"]["f1"] <= 1 and "dice_cells" in final


def test_predict_writes_16bit_label_images(data, trained, tmp_path):
    root, idir, _, _ = data
    out = tmp_path / "pred"
    model = trained / "model.npz"
    # 16-bit PNG on request (Pillow), tiled: the same objects as the whole image (TIFF below)
    p = cli("predict", "--model", model, "--input", idir, "--out", out, "--format", "png",
            "--tile", "16", "--min-size", "0", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    assert "trained with --instances" in p.stdout
    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(f"{f.stem}.png" for f in idir.iterdir())
    from PIL import Image
    with Image.open(files[0]) as im:
        assert im.mode.startswith("I")                         # 16-bit grayscale
    arr = read_labels(files[0])
    assert arr.shape == (32, 32) and arr.max() <= 65535
    assert np.array_equal(np.unique(arr[arr > 0]), np.arange(1, int(arr.max()) + 1))  # 1..K
    before = files[0].read_bytes()
    assert_error(cli("predict", "--model", model, "--input", idir, "--out", out, "--format",
                     "png"), "exist", "--overwrite")
    assert files[0].read_bytes() == before
    try:
        import tifffile
    except ImportError:                      # the default .tif needs tifffile, and says so
        assert_error(cli("predict", "--model", model, "--input", idir, "--out", tmp_path / "t"),
                     "tifffile", "--format png")
        return
    p = cli("predict", "--model", model, "--input", idir, "--out", out, "--min-size", "0",
            "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    tif = tifffile.imread(out / files[0].name.replace(".png", ".tif"))
    assert tif.dtype == np.uint16 and np.array_equal(tif, arr)


def test_evaluate_instances_json_is_all_of_stdout(data, trained):
    root, idir, mdir, labs = data
    p = cli("evaluate", "--model", trained / "model.npz", "--images", idir, "--masks", mdir,
            "--json", "--backend", "auto")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)                                  # nothing else on stdout
    inst = doc["instance"]
    for key in ("f1", "precision", "recall", "ap_dsb", "pq", "sq", "rq", "splits", "merges"):
        assert key in inst, key
    assert inst["n_true"] == sum(len(np.unique(a)) - 1 for a in labs)
    assert len(doc["instance_per_image"]) == len(labs)
    assert "f1" in p.stderr and "backend:" in p.stderr        # the table and messages: stderr
    q = cli("evaluate", "--model", trained / "model.npz", "--images", idir, "--masks", mdir,
            "--backend", "numpy")
    assert q.returncode == 0 and "ap_dsb" in q.stdout and "objects (IoU > 0.5)" in q.stdout


def test_evaluate_instances_of_a_class_model(data, tmp_path):
    """A binary model's objects are the connected components of its prediction."""
    root, idir, mdir, labs = data
    bdir = tmp_path / "binary"
    bdir.mkdir()
    from unet_np.data import write_mask
    for f, lab in zip(sorted(idir.iterdir()), labs):
        write_mask(bdir / f.name, (lab > 0).astype(np.int64), "binary255")
    out = tmp_path / "run"
    assert cli("train", "--images", idir, "--masks", bdir, "--out", out, *TINY).returncode == 0
    p = cli("evaluate", "--model", out / "model.npz", "--images", idir, "--masks", mdir,
            "--instances", "--json", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["instance"]["objects_from"].startswith("connected components")
    assert_error(cli("evaluate", "--model", out / "model.npz", "--images", idir, "--masks", mdir,
                     "--backend", "numpy"), "--instances")


def test_resume_keeps_instances(data, trained, tmp_path):
    import shutil
    root, idir, mdir, _ = data
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    p = cli("train", "--images", idir, "--masks", mdir, "--out", out, "--resume",
            out / "last.npz", "--epochs", "3", "--backend", "numpy")
    assert p.returncode == 0, p.stderr
    assert "--instances: " in p.stdout and "border 1 px" in p.stdout
    assert_error(cli("train", "--images", idir, "--masks", mdir, "--out", out, "--resume",
                     out / "last.npz", "--epochs", "4", "--border", "3"), "--border 3")


def test_instance_colours_tell_objects_apart():
    from unet_np.viz import instance_rgb
    lab = np.array([[0, 1, 1, 7], [65535, 65535, 2, 7]])
    rgb = instance_rgb(lab)
    assert rgb.shape == (2, 4, 3) and np.all(rgb[0, 0] == 0)
    assert np.array_equal(rgb[0, 1], rgb[0, 2]) and np.array_equal(rgb[0, 3], rgb[1, 3])
    colours = {tuple(np.round(rgb[lab == i][0], 6)) for i in (1, 2, 7, 65535)}
    assert len(colours) == 4 and all(max(c) > 0.5 for c in colours)
    assert np.array_equal(instance_rgb(lab, seed=3), instance_rgb(lab, seed=3))


def test_demo_path_reports_instance_scores(tmp_path, monkeypatch, capsys):
    """The demo's code path, shrunk to seconds: instance targets, instance F1 / AP in the summary."""
    from unet_np.cli import demo, main
    monkeypatch.setattr(demo, "DEMO_QUICK", dict(demo.DEMO_QUICK, n=10, size=32, epochs=1))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--backend", "numpy", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "instance F1" in text and "AP (DSB)" in text
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert {"f1", "ap_dsb", "pq"} <= set(final["test"]["instance"]) and "dice_cells" in final["test"]
    labs = sorted((out / "data" / "test" / "masks").iterdir())
    assert len(labs) == 2 and read_labels(labs[0]).max() >= 2       # instance label images
    # both demo set-ups train with batch normalisation (what lifts their instance F1)
    from unet_np.cli.common import load_model
    model, _ = load_model(out / "model.npz")
    assert model.config()["batchnorm"] is True
    assert demo.DEMO["batchnorm"] is True and demo.DEMO_QUICK["batchnorm"] is True


def test_command_objects_use_the_seeding_of_the_demo_study():
    """predict / evaluate / the demo drop unsure interior specks (common.SEEDING); the library's
    labels_from_probabilities keeps every seed unless asked."""
    from unet_np.cli.common import SEEDING, objects_from
    from unet_np.postprocess import labels_from_probabilities
    assert SEEDING == dict(interior_threshold=0.4, min_seed_size=3, sure_interior=0.9)
    probs = np.zeros((3, 8, 16), np.float32)
    probs[0] = 1.0
    probs[:, 1:7, 1:15] = np.array([0.1, 0.2, 0.7])[:, None, None]   # one cell
    probs[:, 2:6, 2:6] = np.array([0.05, 0.9, 0.05])[:, None, None]  # its sure interior
    probs[:, 3, 11:13] = np.array([0.1, 0.6, 0.3])[:, None]          # a two-pixel unsure speck
    assert labels_from_probabilities(probs, min_size=0).max() == 2
    out = objects_from(probs, True, min_size=0)
    assert out.dtype == np.uint16 and out.max() == 1
    # interior between 0.4 and 0.5 makes a seed in the command, not in the library's default
    probs[:, 3, 11:14] = np.array([0.1, 0.45, 0.45])[:, None]
    probs[:, 4, 11:14] = np.array([0.1, 0.45, 0.45])[:, None]
    assert objects_from(probs, True, min_size=0).max() == 2

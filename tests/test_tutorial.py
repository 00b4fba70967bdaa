"""docs/tutorial.md runs: every ```python block, in order, in one namespace, in a fresh temporary
folder (the tutorial writes train/, test/, run/, cells.npz and two PNGs into the current folder).

The blocks carry their own checks (gradients against finite differences, the trained model's
scores); this file also checks that the tutorial covers what the issue said no document did, and
that the files it promises are written. Needs Pillow (PNG folders) and matplotlib (the pictures),
both in the [viz] and [test] extras. The training is tiny: about 10-20 s on 2 cores."""
import contextlib
import os

import pytest

from tests.doc_blocks import python_blocks, run_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TUTORIAL = "docs/tutorial.md"


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                    # threadpoolctl comes with the [test] and [numba] extras
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _code():
    return "\n".join(src for _, src in python_blocks(TUTORIAL))


def test_tutorial_has_code_to_run():
    assert len(python_blocks(TUTORIAL)) >= 15


@pytest.mark.parametrize("name", [
    # step 1: one layer by hand, and the plain functions beside it
    "Conv2d(", ".backward(", "unet_np.gradcheck(", "conv2d_forward_reference",
    "conv2d_backward_reference", "im2col(", "col2im(",
    # step 2: a folder, the public API, prediction, scores, save/load
    "touching_cells(", "write_folder(", 'unet_np.data.load_folder("train/images", "train/masks")',
    "unet_np.UNet(ds.in_channels, ds.num_classes, depth=2, base_channels=8)", "batches(",
    "Trainer(model, optim.Adam(model.parameters(), lr=3e-3))", ".fit(ds, epochs=",
    "predict_tiled(", "normalize_image(", "metrics.score_images(", "metrics.evaluate(",
    ".save(", "unet_np.load_model(",
    # step 3: feature maps and the weight map
    "viz.feature_maps(", "weight_map(",
])
def test_tutorial_uses(name):
    assert name in _code(), f"{TUTORIAL} no longer runs {name!r}"


def test_tutorial_every_python_block_runs(tmp_path, monkeypatch):
    pytest.importorskip("PIL", reason="the tutorial writes PNG folders: Pillow ([viz] extra)")
    pytest.importorskip("matplotlib", reason="the tutorial draws feature maps: matplotlib ([viz] extra)")
    monkeypatch.chdir(tmp_path)
    # One BLAS thread: the tutorial's matrices are small, and on a busy machine BLAS threads that
    # wait for each other cost more than they give (measured on 2 shared cores, load about 10: 77 s
    # with the default threads, 19 s with one). The results do not depend on it beyond the last bits,
    # which the tutorial's checks leave room for.
    with _one_blas_thread():
        ns = run_blocks(os.path.join(ROOT, TUTORIAL))
    for path in ("train/images/img_0000.png", "train/masks/img_0000.png", "test/images/img_0003.png",
                 "run/model.npz", "run/last.npz", "cells.npz", "feature_maps.png", "weight_map.png"):
        assert (tmp_path / path).is_file(), path
    assert len(ns["history"]) == 20 and ns["scores"]["num_images"] == 4
    assert max(ns["report"].values()) < 1e-7

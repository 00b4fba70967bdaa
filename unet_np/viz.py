"""Plots for training and prediction, each a function that writes one PNG (matplotlib, Agg backend).

    learning_curves(history, "curves.png")             loss and validation Dice / IoU per epoch
    overlay(images, truths, preds, "overlay.png")      image | truth | prediction | errors, a row each
    weight_map(image, weights, "weights.png")          the U-Net paper's loss weight map
    feature_maps(model, image, "features.png")         a few channels of every encoder/decoder level
    instance_overlay(images, true, pred, "inst.png")   separated objects, each in its own colour
    volume_planes(volume, truth, pred, "planes.png")   a volume's three orthogonal middle planes

matplotlib is part of the optional ``[viz]`` extra; it is imported when a plot is drawn, and a missing
matplotlib raises ``VizUnavailable`` (an ImportError) saying how to install it.
"""
import re

import numpy as np

from .backends import to_numpy

__all__ = ["VizUnavailable", "available", "learning_curves", "overlay", "weight_map", "feature_maps",
           "capture_features", "class_colours", "instance_rgb", "instance_overlay", "volume_planes"]


class VizUnavailable(ImportError):
    """matplotlib is not installed."""


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise VizUnavailable("plots need matplotlib: pip install matplotlib (or, in a checkout, pip install '.[viz]')") from None
    return plt


def available():
    """True when matplotlib can be imported (plots can be drawn)."""
    try:
        _plt()
        return True
    except VizUnavailable:
        return False


def _save(fig, path, plt):
    fig.savefig(str(path), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def class_colours(num_classes):
    """(num_classes, 3) RGB floats: black background, then distinct colours."""
    base = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                     [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                     [210, 245, 60], [250, 190, 212], [0, 128, 128]], dtype=np.float64) / 255.0
    if num_classes <= len(base):
        return base[:num_classes]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.uniform(0.2, 1.0, (num_classes - len(base), 3))])


def _display(image):
    """(C, H, W) or (H, W) -> something imshow draws: grey for 1 channel, RGB for 3+ (first 3),
    each stretched to [0, 1] by its 1st and 99th percentiles."""
    x = np.asarray(to_numpy(image), dtype=np.float64)
    if x.ndim == 3:
        x = x[0] if x.shape[0] < 3 else np.moveaxis(x[:3], 0, -1)
    lo, hi = np.percentile(x, (1, 99))
    return np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)


def _label_rgb(labels, colours):
    return colours[np.clip(np.asarray(labels, dtype=np.int64), 0, len(colours) - 1)]


def learning_curves(history, path, title=None):
    """Training loss and, where recorded, validation Dice / IoU / accuracy against the epoch.
    history: Trainer's list of per-epoch dicts (epoch, loss, val_dice, val_iou, val_accuracy)."""
    plt = _plt()
    if not history:
        raise ValueError("learning_curves: the history is empty")
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    a1.plot(ep, [h["loss"] for h in history], "o-", ms=3, label="training loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.set_yscale("log" if min(h["loss"] for h in history) > 0 else "linear")
    a1.grid(alpha=0.3)
    a1.legend()
    drawn = False
    for key, label in (("val_dice", "Dice"), ("val_iou", "IoU"), ("val_accuracy", "pixel accuracy")):
        pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if pts:
            a2.plot(*zip(*pts), "o-", ms=3, label=label)
            drawn = True
    if drawn:
        a2.set_ylim(0, 1.02)
        a2.set_xlabel("epoch")
        a2.set_ylabel("validation score")
        a2.grid(alpha=0.3)
        a2.legend()
    else:
        a2.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=a2.transAxes)
        a2.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)


def overlay(images, truths, preds, path, num_classes=None, names=None, max_rows=4):
    """One row per sample: the image, the true labels, the predicted labels and the image with the
    prediction's outline, wrong pixels in red. images (N, C, H, W), truths / preds (N, H, W) (a single
    sample without the N axis works too); truths may be None (prediction only)."""
    plt = _plt()
    images = np.asarray(to_numpy(images))
    preds = np.asarray(preds)
    if preds.ndim == 2:
        images, preds = images[None], preds[None]
        truths = None if truths is None else np.asarray(truths)[None]
    truths = None if truths is None else np.asarray(truths)
    n = min(len(preds), max_rows)
    k = num_classes or int(max(preds.max(), 0 if truths is None else truths.max())) + 1
    colours = class_colours(max(k, 2))
    cols = 4 if truths is not None else 3
    fig, axes = plt.subplots(n, cols, figsize=(3 * cols, 3 * n), squeeze=False)
    from .metrics import boundary_map
    for r in range(n):
        img = _display(images[r])
        panels = [("image", img, "gray")]
        if truths is not None:
            panels.append(("truth", _label_rgb(truths[r], colours), None))
        panels.append(("prediction", _label_rgb(preds[r], colours), None))
        for c, (t, a, cmap) in enumerate(panels):
            axes[r, c].imshow(a, cmap=cmap, interpolation="nearest")
            axes[r, c].set_title(t if names is None else f"{names[r]}: {t}", fontsize=9)
        rgb = np.stack([img] * 3, -1) if img.ndim == 2 else img.copy()
        edge = boundary_map(preds[r] > 0) if k <= 2 else _class_edges(preds[r])
        rgb[edge] = (0.1, 1.0, 0.1)
        title = "prediction outline"
        if truths is not None:
            wrong = preds[r] != truths[r]
            rgb[wrong] = 0.5 * rgb[wrong] + 0.5 * np.array([1.0, 0.0, 0.0])
            title += f", errors red ({100.0 * wrong.mean():.1f}%)"
        axes[r, cols - 1].imshow(rgb, interpolation="nearest")
        axes[r, cols - 1].set_title(title, fontsize=9)
        for a in axes[r]:
            a.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, plt)


def _class_edges(labels):
    lab = np.asarray(labels)
    e = np.zeros(lab.shape, dtype=bool)
    e[:-1] |= lab[:-1] != lab[1:]
    e[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return e


def weight_map(image, weights, path, mask=None, w0=None):
    """The image, [its mask,] and the loss weight map: the borders between
    touching objects stand out, which is what the U-Net paper's weighting is for."""
    plt = _plt()
    w = np.asarray(weights, dtype=np.float64)
    panels = 3 if mask is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6))
    axes[0].imshow(_display(image), cmap="gray")
    axes[0].set_title("image")
    if mask is not None:
        axes[1].imshow(_label_rgb(mask, class_colours(int(np.max(mask)) + 1)), interpolation="nearest")
        axes[1].set_title("mask")
    im = axes[-1].imshow(w, cmap="magma", interpolation="nearest")
    axes[-1].set_title(f"weight map (max {w.max():.1f}" + (f", w0 = {w0:g})" if w0 else ")"))
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.04)
    for a in axes:
        a.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, plt)


def instance_rgb(labels, seed=0):
    """(H, W, 3) float colours of an instance label image: black background, each object id its own
    bright colour (hues spread by the golden ratio from a seeded start, so neighbours differ);
    pure NumPy. The same id gets the same colour in every call with one seed."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"instance_rgb needs a 2-D label image, got shape {lab.shape}")
    ids, inverse = np.unique(lab.reshape(-1), return_inverse=True)
    rng = np.random.default_rng(seed)
    start = rng.random()
    hue = (start + 0.618033988749895 * np.arange(len(ids))) % 1.0
    sat = 0.65 + 0.35 * rng.random(len(ids))
    val = 0.75 + 0.25 * rng.random(len(ids))
    i = np.floor(hue * 6).astype(int) % 6                  # HSV -> RGB
    f = hue * 6 - np.floor(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = np.choose(i[None], [np.stack(c) for c in ((val, t, p), (q, val, p), (p, val, t),
                                                    (p, q, val), (t, p, val), (val, p, q))])
    colours = rgb.T
    colours[ids == 0] = 0.0
    return colours[inverse.reshape(lab.shape)]


def instance_overlay(images, truths, preds, path, names=None, max_rows=4):
    """One row per sample: the image, the true objects and the predicted objects (each object in its
    own colour), and the image with the predicted objects tinted and outlined, so that touching
    objects show as separate. images (N, C, H, W) or a list of (C, H, W); truths / preds: instance
    label images (N, H, W) or lists (truths may be None)."""
    plt = _plt()
    images = [np.asarray(to_numpy(x)) for x in images]
    preds = [np.asarray(p) for p in preds]
    truths = None if truths is None else [np.asarray(t) for t in truths]
    n = min(len(preds), max_rows)
    if n == 0:
        raise ValueError("instance_overlay: no sample to draw")
    cols = 4 if truths is not None else 3
    fig, axes = plt.subplots(n, cols, figsize=(3 * cols, 3 * n), squeeze=False)
    for r in range(n):
        img = _display(images[r])
        pred = preds[r]
        panels = [("image", img, "gray")]
        if truths is not None:
            panels.append((f"truth ({len(np.unique(truths[r][truths[r] > 0]))} objects)",
                           instance_rgb(truths[r], seed=1), None))
        k = len(np.unique(pred[pred > 0]))
        panels.append((f"prediction ({k} objects)", instance_rgb(pred, seed=2), None))
        for c, (t, a, cmap) in enumerate(panels):
            axes[r, c].imshow(a, cmap=cmap, interpolation="nearest")
            axes[r, c].set_title(t if names is None else f"{names[r]}: {t}", fontsize=9)
        rgb = np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3].copy()
        tint = instance_rgb(pred, seed=2)
        on = pred > 0
        rgb[on] = 0.55 * rgb[on] + 0.45 * tint[on]
        rgb[_class_edges(pred)] = (1.0, 1.0, 1.0)
        axes[r, cols - 1].imshow(rgb, interpolation="nearest")
        axes[r, cols - 1].set_title("predicted objects", fontsize=9)
        for a in axes[r]:
            a.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, plt)


_LEVEL = re.compile(r"^(enc\d+|bottleneck|dec\d+|x\d+_\d+)$")


def _level_key(name):
    """Sort key: encoder top-down, bottleneck, decoder bottom-up (UNet++: x{i}_0 then x{i}_{j})."""
    if name.startswith("enc"):
        return (0, int(name[3:]))
    if name == "bottleneck":
        return (1, 0)
    if name.startswith("dec"):
        return (2, -int(name[3:]))
    i, j = (int(v) for v in name[1:].split("_"))
    return (0 if j == 0 else 2, i if j == 0 else j * 100 - i)


def capture_features(model, image):
    """Run one image (C, H, W) through ``model`` and return [(level name, feature map (C, H, W))] for
    every encoder block, the bottleneck and every decoder block, in the order data flows.
    Works by wrapping each block's forward for the one call; the model is left as it was."""
    blocks = [(n, m) for n, m in model._modules.items() if _LEVEL.match(n)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no enc*/bottleneck/dec* blocks to show")
    seen = {}
    originals = {}

    def wrap(name, mod):
        orig = mod.forward

        def forward(x):
            y = orig(x)
            seen[name] = np.array(to_numpy(y)[0])
            return y
        originals[name] = mod
        object.__setattr__(mod, "forward", forward)

    for n, m in blocks:
        wrap(n, m)
    was_training = model.training
    model.eval()
    try:
        x = np.asarray(to_numpy(image), dtype=model.dtype)[None]
        model.predict(x)
    finally:
        model.train(was_training)
        for m in originals.values():
            del m.__dict__["forward"]
    return [(n, seen[n]) for n in sorted(seen, key=_level_key)]


def feature_maps(model, image, path, channels=6):
    """For one image: the first ``channels`` channels (the most active ones) of every encoder level,
    the bottleneck and every decoder level, one row per level. Shows the encoder trading resolution
    for channels and the decoder, helped by the skips, winning the detail back."""
    plt = _plt()
    feats = capture_features(model, image)
    rows = len(feats)
    fig, axes = plt.subplots(rows, channels + 1, figsize=(1.6 * (channels + 1), 1.6 * rows),
                             squeeze=False)
    for r, (name, f) in enumerate(feats):
        act = f.reshape(f.shape[0], -1).std(axis=1)
        order = np.argsort(-act)[:channels]  # the channels that vary most
        axes[r, 0].imshow(_display(image), cmap="gray")
        axes[r, 0].set_title("input" if r == 0 else "", fontsize=8)
        axes[r, 0].set_ylabel(f"{name}\n{f.shape[0]}x{f.shape[1]}x{f.shape[2]}", fontsize=8)
        for c in range(channels):
            a = axes[r, c + 1]
            if c < len(order):
                a.imshow(f[order[c]], cmap="viridis", interpolation="nearest")
                a.set_title(f"ch {order[c]}", fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
    fig.suptitle(f"{type(model).__name__} feature maps per level (most active channels)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path, plt)


def volume_planes(volume, truth, pred, path, num_classes=None, title=None):
    """A volume's three orthogonal middle planes, one row each: axial (the middle slice along D, an
    H x W plane), coronal (middle along H: D x W) and sagittal (middle along W: D x H); columns:
    the image, the true labels, the predicted labels and the image with the prediction's outline
    and its wrong voxels in red. volume (C, D, H, W) or (D, H, W); truth / pred (D, H, W) labels
    (truth may be None: prediction only). The grey levels are stretched by the whole volume's 1st
    and 99th percentiles, so the three planes are comparable."""
    plt = _plt()
    x = np.asarray(to_numpy(volume), dtype=np.float64)
    x = x[0] if x.ndim == 4 else x                      # the first channel
    pred = np.asarray(pred)
    truth = None if truth is None else np.asarray(truth)
    if x.ndim != 3 or pred.shape != x.shape or (truth is not None and truth.shape != x.shape):
        raise ValueError(f"volume_planes needs a volume (C, D, H, W) or (D, H, W) and labels (D, H, W) "
                         f"of its size, got {np.shape(volume)}, "
                         f"{None if truth is None else truth.shape} and {pred.shape}")
    lo, hi = np.percentile(x, (1, 99))
    x = np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    k = num_classes or int(max(pred.max(), 0 if truth is None else truth.max())) + 1
    colours = class_colours(max(k, 2))
    D, H, W = x.shape
    planes = [(f"axial, D = {D // 2} (H x W)", np.s_[D // 2, :, :]),
              (f"coronal, H = {H // 2} (D x W)", np.s_[:, H // 2, :]),
              (f"sagittal, W = {W // 2} (D x H)", np.s_[:, :, W // 2])]
    cols = 4 if truth is not None else 3
    fig, axes = plt.subplots(3, cols, figsize=(3 * cols, 3 * 3), squeeze=False)
    for r, (name, cut) in enumerate(planes):
        img, p = x[cut], pred[cut]
        panels = [("image", img, "gray")]
        if truth is not None:
            panels.append(("truth", _label_rgb(truth[cut], colours), None))
        panels.append(("prediction", _label_rgb(p, colours), None))
        for c, (t, a, cmap) in enumerate(panels):
            axes[r, c].imshow(a, cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
            axes[r, c].set_title(f"{name}: {t}" if c == 0 else t, fontsize=9)
        rgb = np.stack([img] * 3, -1)
        rgb[_class_edges(p)] = (0.1, 1.0, 0.1)
        label = "prediction outline"
        if truth is not None:
            wrong = p != truth[cut]
            rgb[wrong] = 0.5 * rgb[wrong] + 0.5 * np.array([1.0, 0.0, 0.0])
            label += f", errors red ({100.0 * wrong.mean():.1f}%)"
        axes[r, cols - 1].imshow(rgb, interpolation="nearest")
        axes[r, cols - 1].set_title(label, fontsize=9)
        for a in axes[r]:
            a.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path, plt)

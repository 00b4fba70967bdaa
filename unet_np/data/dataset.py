"""Segmentation data in memory: normalisation, the dataset, loading a folder, batches.

    ds = load_folder("train/images", "train/masks")      # -> SegmentationDataset
    ds = load_folder("imgs", "labels", instances=True)    # instance label images -> 3 classes
    ds.images, ds.masks, ds.num_classes, ds.in_channels, ds.diagnostics()
    for x, y in batches(ds, 4, crop=(128, 128)): ...

How files are found and read is in files.py and io.py; every bad file raises DataError naming it.
"""
from collections import Counter

import numpy as np

from .files import DataError, match_files, pair_problems
from .instances import instance_mask_problem, instance_targets, instance_weight_map
from .io import read_image, read_labels, read_mask_info
from .pipeline import crop_sample

# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_EPS_STD = 1e-6


def normalize_image(image, mode="image", mean=None, std=None):
    """float32 (C, H, W) -> standardised copy (a volume (C, D, H, W) likewise).

    mode 'image': each channel to zero mean and unit standard deviation over this image;
    'dataset': (x - mean) / std with per-channel `mean` and `std` (from SegmentationDataset);
    None or 'none': unchanged. A constant channel is only shifted (its std is taken as 1)."""
    x = np.asarray(image, dtype=np.float32)
    if mode in (None, "none"):
        return x.copy()
    space = tuple(range(1, x.ndim))                   # every axis but the channels
    if mode == "image":
        m = x.mean(axis=space, dtype=np.float64)
        s = x.std(axis=space, dtype=np.float64)
    elif mode == "dataset":
        if mean is None or std is None:
            raise ValueError("normalize='dataset' needs the dataset's mean and std")
        m = np.asarray(mean, dtype=np.float64).reshape(-1)
        s = np.asarray(std, dtype=np.float64).reshape(-1)
        if m.size != x.shape[0] or s.size != x.shape[0]:
            raise ValueError(f"mean/std have {m.size}/{s.size} channels, image has {x.shape[0]}")
    else:
        raise ValueError(f"normalize must be 'image', 'dataset' or None, got {mode!r}")
    s = np.where(s < _EPS_STD, 1.0, s)
    per_channel = (-1,) + (1,) * (x.ndim - 1)
    return ((x - m.reshape(per_channel)) / s.reshape(per_channel)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

class Diagnostics(dict):
    """A dict of what was found in a dataset; str() gives a readable report."""

    def __str__(self):
        lines = [f"{self.get('num_pairs', 0)} image/mask pairs, {self.get('num_classes')} "
                 f"classes, {self.get('in_channels')} channel(s), masks "
                 f"'{self.get('mask_convention')}'"]
        sizes = self.get("image_sizes") or {}
        if sizes:
            lines.append("sizes: " + ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in sizes.items()))
        total = sum(self.get("class_pixels", {}).values()) or 1
        for c, n in self.get("class_pixels", {}).items():
            lines.append(f"  class {c}: {n} pixels ({100.0 * n / total:.2f}%)")
        for key, title in (("unmatched_images", "images without a mask"),
                           ("unmatched_masks", "masks without an image")):
            if self.get(key):
                lines.append(f"{title}: {', '.join(self[key])}")
        for name, a, b in self.get("size_mismatches", []):
            lines.append(f"size mismatch: {name} image {a} vs mask {b}")
        for name, vals in self.get("unexpected_values", []):
            lines.append(f"unexpected mask values in {name}: {vals}")
        for name, msg in self.get("unreadable", []):
            lines.append(f"skipped {name}: {msg}")
        inst = self.get("instances")
        if inst:
            lines.append(f"instance label images: {inst['objects']} objects, learnt as background "
                         f"/ interior / border (border {inst['border']} px)")
            if inst.get("from_components"):
                lines.append(f"  {inst['from_components']} mask(s) with a single id: their objects "
                             f"are its connected components")
        if self.get("mixed_conventions"):
            lines.append("mask conventions differ: " + ", ".join(
                f"{c} ({n})" for c, n in self["mixed_conventions"].items()))
        return "\n".join(lines)


class SegmentationDataset:
    """Images and masks in memory.

    images: list of float32 (C, H, W) (normalised as `normalize` says); masks: list of int64
    (H, W); or volumes: images (C, D, H, W) and masks (D, H, W) (spatial_dims is then 3; one kind
    per dataset); names: the image file stems; num_classes; in_channels; mask_convention (how to write
    predictions back, see write_mask); palette (for 'palette' / 'rgb'); normalize, mean, std
    (what to apply to new images: normalize_image(x, ds.normalize, ds.mean, ds.std));
    weights: None, or a list of float32 (H, W) loss weight maps (see compute_weights);
    instances: None, or the instance label images (H, W) the masks were made from (then the masks
    are instance_targets(instances, instance_border): 0 background, 1 interior, 2 border, and
    mask_convention is 'instances'; see from_instances)."""

    def __init__(self, images, masks, names=None, num_classes=None, mask_convention="labels",
                 palette=None, normalize=None, mean=None, std=None, weights=None, report=None,
                 instances=None, instance_border=None):
        self.images = [np.asarray(x, dtype=np.float32) for x in images]
        self.masks = [np.asarray(m).astype(np.int64) for m in masks]
        if len(self.images) != len(self.masks):
            raise ValueError(f"{len(self.images)} images but {len(self.masks)} masks")
        self.spatial_dims = self.masks[0].ndim if self.masks else 2
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"masks must be (H, W) images or (D, H, W) volumes, got shape "
                             f"{self.masks[0].shape}")
        axes = "(C,H,W) and mask {} (H,W)" if self.spatial_dims == 2 else "(C,D,H,W) and mask {} (D,H,W)"
        for i, (x, m) in enumerate(zip(self.images, self.masks)):
            if x.ndim != self.spatial_dims + 1 or m.ndim != self.spatial_dims or x.shape[1:] != m.shape:
                raise ValueError(f"sample {i}: image {x.shape} " + axes.format(m.shape)
                                 + " do not fit" + ("" if m.ndim == self.spatial_dims else
                                                    " (images and volumes mixed)"))
        self.names = list(names) if names is not None else [f"{i:04d}" for i in
                                                           range(len(self.images))]
        top = max((int(m.max()) for m in self.masks if m.size), default=0)
        self.num_classes = int(num_classes) if num_classes is not None else max(2, top + 1)
        chans = {x.shape[0] for x in self.images}
        if len(chans) > 1:
            raise ValueError(f"images have different channel counts: {sorted(chans)}")
        self.in_channels = chans.pop() if chans else 0
        self.mask_convention = mask_convention
        self.palette = palette
        self.normalize = normalize
        self.mean = mean
        self.std = std
        self.weights = None if weights is None else [np.asarray(w, np.float32) for w in weights]
        self.instances = None if instances is None else [np.asarray(a) for a in instances]
        self.instance_border = instance_border
        if self.instances is not None:
            if len(self.instances) != len(self.masks) or any(
                    a.shape != m.shape for a, m in zip(self.instances, self.masks)):
                raise ValueError("instances must be one (H, W) label image per mask, of its size")
        self._report = report or {}

    @classmethod
    def from_arrays(cls, images, masks, normalize="image", **kw):
        """From arrays (N, C, H, W) and (N, H, W) (or lists), normalising as load_folder does.
        The mask convention defaults to 'binary255' for 0/1 masks and 'labels' otherwise."""
        imgs = [np.asarray(x, dtype=np.float32) for x in images]
        if kw.get("mask_convention") is None:
            top = max((int(np.max(m)) for m in masks if np.size(m)), default=0)
            kw["mask_convention"] = "binary255" if top <= 1 else "labels"
        imgs, mean, std = _normalize_all(imgs, normalize)
        return cls(imgs, list(masks), normalize=normalize, mean=mean, std=std, **kw)

    @classmethod
    def from_instances(cls, images, labels, border=2, normalize="image", names=None, report=None):
        """From images (N, C, H, W) (or a list) and instance label images (0 background, one id per
        object, any ids up to 65535): the masks are the three-class targets
        instance_targets(labels, border) (0 background, 1 interior, 2 border), the label images
        are kept as .instances (the weight map and the instance metrics use them)."""
        labs = [np.asarray(a) for a in labels]
        if len(labs) != len(images):
            raise ValueError(f"{len(images)} images but {len(labs)} label images")
        targets = [instance_targets(a, border) for a in labs]
        imgs, mean, std = _normalize_all([np.asarray(x, dtype=np.float32) for x in images],
                                         normalize)
        keep = [a.astype(np.int32 if a.size == 0 or a.max() < 2 ** 31 else np.int64) for a in labs]
        rep = dict(report or {})
        rep.setdefault("instances", {"objects": sum(len(np.unique(a[a > 0])) for a in labs),
                                     "border": int(border)})
        return cls(imgs, targets, names=names, num_classes=3, mask_convention="instances",
                   normalize=normalize, mean=mean, std=std, report=rep, instances=keep,
                   instance_border=int(border))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.weights is not None:
            return self.images[i], self.masks[i], self.weights[i]
        return self.images[i], self.masks[i]

    def compute_weights(self, w0=10.0, sigma=5.0, class_balance=True, instances=None):
        """Fill `weights` with the U-Net paper's weight maps (weightmap.weight_map). The objects
        are `instances` (a list of (H, W) instance labels) when given, else the connected
        components of each mask's foreground (6-connected in a volume, whose map is 3-D). A dataset of instance targets (from_instances,
        load_folder(instances=True)) uses its own .instances: instance_weight_map, the border term
        on background and border pixels. Returns the list."""
        from .weightmap import label_components, weight_map
        if instances is None and self.instances is not None:
            self.weights = [instance_weight_map(a, targets=m, w0=w0, sigma=sigma,
                                                class_balance=class_balance)
                            for a, m in zip(self.instances, self.masks)]
            return self.weights
        out = []
        for i, m in enumerate(self.masks):
            inst = label_components(m) if instances is None else np.asarray(instances[i])
            out.append(weight_map(inst, w0, sigma, class_balance, labels=m,
                                  spatial_dims=self.spatial_dims))   # a volume's map is 3-D
        self.weights = out
        return out

    def diagnostics(self):
        """Diagnostics (a dict; str() reads well): pixels per class, image sizes, and every file
        problem found while loading (unmatched, size mismatches, unexpected values), by name."""
        counts = np.zeros(self.num_classes, dtype=np.int64)
        for m in self.masks:
            counts += np.bincount(m.ravel(), minlength=self.num_classes)[: self.num_classes]
        sizes = Counter(tuple(m.shape) for m in self.masks)
        d = Diagnostics(num_pairs=len(self), num_classes=self.num_classes,
                        in_channels=self.in_channels, mask_convention=self.mask_convention,
                        class_pixels={c: int(n) for c, n in enumerate(counts)},
                        image_sizes=dict(sorted(sizes.items())),
                        unmatched_images=[], unmatched_masks=[], size_mismatches=[],
                        unexpected_values=[], unreadable=[], mixed_conventions={})
        d.update({k: v for k, v in self._report.items()})
        return d


def _normalize_all(images, normalize):
    if normalize == "dataset":
        if not images:
            return images, None, None
        c = images[0].shape[0]
        space = tuple(range(1, images[0].ndim))
        per_channel = (-1,) + (1,) * len(space)
        n = sum(x[0].size for x in images)
        mean = sum(x.sum(axis=space, dtype=np.float64) for x in images) / n
        var = sum(((x - mean.reshape(per_channel)) ** 2).sum(axis=space, dtype=np.float64)
                  for x in images) / n
        mean = mean.reshape(c)
        std = np.sqrt(var).reshape(c)
        return [normalize_image(x, "dataset", mean, std) for x in images], mean, std
    return [normalize_image(x, normalize) for x in images], None, None


def resolve_convention(conventions):
    """{file name: convention} -> (the dataset's convention, {convention: count} when they differ).
    One convention for the dataset from each mask's; raises on a 0/255 vs labels mix."""
    seen = Counter(c for c in conventions.values() if c != "empty")
    if not seen:
        return "binary255", {}
    mixed = dict(seen) if len(seen) > 1 else {}
    for c in ("palette", "rgb"):
        if c in seen:
            return c, mixed
    if "labels" in seen and "binary255" in seen:
        a = next(n for n, c in conventions.items() if c == "binary255")
        b = next(n for n, c in conventions.items() if c == "labels")
        raise DataError(f"{b}: masks mix conventions: {a} is a 0/255 binary mask but {b} holds "
                        f"class labels; use one convention for every mask", b)
    if "labels" in seen:
        return "labels", mixed
    if len(seen) == 2:  # 0/1 and 0/255 binaries: both are clearly binary
        return ("binary255" if seen["binary255"] >= seen["binary01"] else "binary01"), mixed
    return next(iter(seen)), mixed


def load_folder(images_dir, masks_dir, normalize="image", palette=None, strict=True,
                max_classes=256, instances=None, border=2):
    """Load every image of images_dir with its mask from masks_dir (matched by find_pairs' rules).

    normalize: 'image' (per image and channel), 'dataset' (per channel over the whole set; the
        statistics are kept as .mean / .std) or None.
    palette: RGB triples, index = class, for colour masks (see read_mask).
    strict: True raises one DataError listing every problem (each by file name); False skips the
        faulty pairs and lists them in diagnostics() (still raising if nothing usable is left).
    max_classes: a mask label >= this is an error (it is most likely an image given as a mask).
    instances: what the mask values are.
        None (default): class labels, unless the masks look like instance label images (one id
            per object: instances.instance_mask_problem), which raises a DataError saying so;
        False: class labels, whatever they look like;
        True: instance label images (0 background, any ids up to 65535, read exactly by
            read_labels): the dataset's masks are instance_targets(labels, border) (3 classes:
            background / interior / border) and .instances keeps the label images. A mask with a
            single id (a binary mask) gives its connected components as the objects.
    Raises DataError for a missing or empty folder."""
    if instances not in (None, False, True):
        raise ValueError(f"instances must be None, False or True, got {instances!r}")
    rep = match_files(images_dir, masks_dir)
    problems = pair_problems(rep, images_dir)
    if not rep.pairs and not rep.unmatched_images and not rep.ambiguous:
        raise DataError(problems[0], images_dir)
    report = {"unmatched_images": [p.name for p in rep.unmatched_images],
              "unmatched_masks": [p.name for p in rep.unmatched_masks],
              "size_mismatches": [], "unexpected_values": [], "unreadable": []}
    images, masks, names, paths, conventions, file_pal = [], [], [], [], {}, None
    too_many = []
    for ip, mp in rep.pairs:
        try:
            x = read_image(ip)
        except DataError as e:
            problems.append(str(e))
            report["unreadable"].append((ip.name, str(e)))
            continue
        try:
            if instances:
                m, conv, fp = read_labels(mp), "instances", None
            else:
                m, conv, fp = read_mask_info(mp, palette)
        except DataError as e:
            problems.append(str(e))
            key = "unexpected_values" if "unexpected mask values" in str(e) else "unreadable"
            report[key].append((mp.name, str(e)))
            continue
        if x.shape[1:] != m.shape:
            msg = (f"{mp}: mask is {m.shape[0]}x{m.shape[1]} but its image {ip.name} is "
                   f"{x.shape[1]}x{x.shape[2]} (H x W)")
            problems.append(msg)
            report["size_mismatches"].append((ip.name, x.shape[1:], m.shape))
            continue
        if not instances and int(m.max()) >= max_classes:
            msg = (f"{mp}: mask label {int(m.max())} >= max_classes={max_classes} (is this an "
                   f"image rather than a mask?)")
            too_many.append((mp.name, m, msg))      # decided below: instance ids, or a problem
            continue
        if fp is not None and file_pal is None:
            file_pal = fp
        images.append(x)
        masks.append(m)
        names.append(ip.stem)
        paths.append(ip)
        conventions[mp.name] = conv
    chans = Counter(x.shape[0] for x in images)
    if len(chans) > 1:
        common = chans.most_common(1)[0][0]
        keep = []
        for i, x in enumerate(images):
            if x.shape[0] != common:
                msg = (f"{paths[i]}: image has {x.shape[0]} channels, most images have "
                       f"{common}")
                problems.append(msg)
                report["unreadable"].append((paths[i].name, msg))
            else:
                keep.append(i)
        images = [images[i] for i in keep]
        masks = [masks[i] for i in keep]
        names = [names[i] for i in keep]
    if instances is None:
        found = _instance_problem(masks + [m for _, m, _ in too_many])
        if found:
            err = DataError(f"{masks_dir}: {found}", masks_dir)
            err.instance_problem = found        # the message alone, for a command to reword
            raise err
    for name, _, msg in too_many:
        problems.append(msg)
        report["unexpected_values"].append((name, msg))
    if strict and problems:
        first = rep.unmatched_images[0] if rep.unmatched_images else images_dir
        head = f"{len(problems)} problem(s) in {images_dir} / {masks_dir}:\n  "
        raise DataError(head + "\n  ".join(problems[:50]) +
                        (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""),
                        first)
    if not images:
        raise DataError(f"{images_dir}: no usable image/mask pair\n  " + "\n  ".join(problems),
                        images_dir)
    convention, mixed = resolve_convention(conventions)
    report["mixed_conventions"] = mixed
    num_classes = None
    pal = None
    if palette is not None:
        if isinstance(palette, dict):  # {colour: class} -> a list indexed by class
            by_class = {int(c): tuple(int(v) for v in col) for col, c in palette.items()}
            pal = [by_class.get(i, (0, 0, 0)) for i in range(max(by_class) + 1)]
        else:
            pal = [tuple(int(v) for v in col) for col in palette]
        num_classes = max(max((int(m.max()) for m in masks), default=0) + 1, len(pal), 2)
    elif convention == "palette":
        pal = file_pal
    if instances:
        from .weightmap import label_components
        single = [i for i, m in enumerate(masks) if len(np.unique(m[m > 0])) == 1]
        for i in single:
            masks[i] = label_components(masks[i], connectivity=8)
        report["instances"] = {"objects": sum(len(np.unique(m[m > 0])) for m in masks),
                               "border": int(border), "from_components": len(single)}
        return SegmentationDataset.from_instances(images, masks, border, normalize, names,
                                                  report=report)
    images, mean, std = _normalize_all(images, normalize)
    return SegmentationDataset(images, masks, names=names, num_classes=num_classes,
                               mask_convention=convention, palette=pal, normalize=normalize,
                               mean=mean, std=std, report=report)


def _instance_problem(masks, min_ids=5):
    """instance_mask_problem's message for these masks, or None; masks that cannot be instance
    label images (fewer than min_ids ids each: binary and few-class masks) are not looked at."""
    if not any(len(np.unique(m)) > min_ids for m in masks):
        return None
    return instance_mask_problem(masks, min_ids=min_ids)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def _as_samples(dataset):
    if isinstance(dataset, SegmentationDataset) or hasattr(dataset, "masks"):
        return dataset.images, dataset.masks, getattr(dataset, "weights", None)
    parts = tuple(dataset)
    if len(parts) not in (2, 3):
        raise ValueError("dataset must be a SegmentationDataset or (images, masks[, weights])")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def batches(dataset, batch_size, shuffle=True, rng=None, crop=None, augment=None,
            drop_last=False, multiple_of=1):
    """Iterate over a dataset in batches: (x float32 (N, C, h, w), y int64 (N, h, w)), plus
    w float32 (N, h, w) when the dataset carries weight maps.

    dataset: a SegmentationDataset, or (images, masks[, weights]) as arrays or lists.
    rng: a numpy Generator or an int seed (None: fresh entropy); it drives the order, the crops
        and the augmentation.
    crop: None, an int or (h, w). Images in one batch must share one size, so when crop is None and
        the sizes differ, every sample is cropped to the smallest height and the smallest width in
        the dataset. Crops are placed at random when shuffle is True and centred otherwise, the
        same window for image, mask and weights. A sample smaller than the crop is a DataError.
    multiple_of: round the crop size down to a multiple of this (a U-Net of depth d wants 2**d).
    augment: None, a callable or a list of callables f(image, mask, weight, rng) ->
        (image, mask, weight) (augment.flip_rotate and augment.elastic fit), applied per sample
        after the crop. They must keep the sample's size.
    drop_last: skip a final batch smaller than batch_size."""
    images, masks, weights = _as_samples(dataset)
    n = len(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(masks) != n or (weights is not None and len(weights) != n):
        raise ValueError("images, masks (and weights) must have the same length")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    fns = [] if augment is None else (list(augment) if isinstance(augment, (list, tuple))
                                      else [augment])
    sizes = [tuple(np.shape(m)[-2:]) for m in masks]
    if crop is None:
        if len(set(sizes)) > 1:
            crop = (min(s[0] for s in sizes), min(s[1] for s in sizes))
    elif np.isscalar(crop):
        crop = (int(crop), int(crop))
    if crop is not None:
        crop = tuple(int(c) for c in crop)
        if multiple_of > 1:
            crop = (crop[0] // multiple_of * multiple_of, crop[1] // multiple_of * multiple_of)
        if min(crop) < 1:
            raise ValueError(f"crop size {crop} is empty")
    names = getattr(dataset, "names", None)
    if crop is not None:  # fail before the first batch rather than in the middle of an epoch
        for i, (h, wd) in enumerate(sizes):
            if crop[0] > h or crop[1] > wd:
                who = names[i] if names is not None else f"sample {i}"
                raise DataError(f"{who}: image is {h}x{wd}, smaller than the crop "
                                f"{crop[0]}x{crop[1]}", who)
    order = rng.permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        xs, ys, ws = [], [], []
        for i in idx:
            x = np.asarray(images[i], dtype=np.float32)
            y = np.asarray(masks[i]).astype(np.int64, copy=False)
            w = None if weights is None else np.asarray(weights[i], dtype=np.float32)
            if crop is not None:
                x, y, w = crop_sample(x, y, w, crop, rng if shuffle else None)
            for f in fns:
                x, y, w = f(x, y, w, rng)
            xs.append(x)
            ys.append(y)
            ws.append(w)
        out = (np.stack(xs).astype(np.float32, copy=False), np.stack(ys).astype(np.int64))
        if weights is not None:
            out = out + (np.stack(ws).astype(np.float32),)
        yield out


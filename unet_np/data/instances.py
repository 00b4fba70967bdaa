"""Instance segmentation targets: from a label image (one id per object) to what a U-Net learns.

A semantic U-Net classifies pixels; it cannot say where one cell ends and the next begins when
they touch. The usual answer (e.g. Caicedo et al., "Evaluation of deep learning strategies for
nucleus segmentation", 2019), and the one taken here, is to learn three classes:

    0  background
    1  cell interior
    2  cell border: a band `border` pixels wide inside each object, where the object meets
       another object or the background

The interiors of two touching cells are then separated by two border bands, and their connected
components give one seed per cell; postprocess.labels_from_probabilities grows the seeds back
into whole cells. The U-Net paper's weight map (weightmap.weight_map) makes the pixels between
close objects count more in the loss; here it is computed from the true instances and put on the
background and the border pixels (instance_weight_map).

instance_mask_problem(masks) recognises instance label images among a data set's masks, so that
a command can refuse to train a "184-class" network on them by mistake.

Label images: integer arrays (H, W) or (N, H, W), 0 = background, any other value one object; ids
need not be consecutive (1, 7, 65535 is fine) and are never read as classes.
"""
import numpy as np

from .weightmap import label_components, weight_map

__all__ = ["INSTANCE_CLASSES", "check_instance_labels", "instance_targets",
           "instance_weight_map", "instance_mask_problem"]

INSTANCE_CLASSES = ("background", "interior", "border")


def check_instance_labels(labels, name="labels"):
    """labels as an int64 array, after checking it is a label image: integers (or floats holding
    whole numbers), none negative, 2-D (H, W) or 3-D (N, H, W). Raises ValueError naming `name`."""
    lab = np.asarray(labels)
    if lab.ndim not in (2, 3):
        raise ValueError(f"{name} must be a label image (H, W) or a stack (N, H, W), "
                         f"got shape {lab.shape}")
    if lab.dtype.kind == "b":
        return lab.astype(np.int64)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(np.mod(lab, 1) == 0):
            raise ValueError(f"{name} must hold whole-number object ids, got non-integer values")
    elif lab.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer object ids, got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise ValueError(f"{name} holds a negative id ({int(lab.min())}); ids are 0 (background) "
                         f"or positive")
    return lab.astype(np.int64, copy=False)


def _disk_offsets(radius):
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 <= radius^2, and their lengths, shortest first."""
    r = int(radius)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    d2 = dy * dy + dx * dx
    keep = (d2 > 0) & (d2 <= r * r)
    order = np.argsort(d2[keep], kind="stable")
    return dy[keep][order], dx[keep][order], np.sqrt(d2[keep][order])


def border_depth(labels, border):
    """(H, W) float64: for an object pixel, the distance (up to `border`) to the nearest pixel
    that holds another id (another object or background), measured over the disk offsets of
    radius `border`; +inf when there is none that close (an interior pixel) and on background.
    Beyond the image edge counts as the same object: a cell cut by the edge gets no border there."""
    lab = np.asarray(labels)
    h, w = lab.shape
    depth = np.full((h, w), np.inf)
    r = int(border)
    if r < 1:
        return depth
    pad = np.pad(lab, r, mode="edge")
    fg = lab > 0
    for dy, dx, dist in zip(*_disk_offsets(r)):
        nb = pad[r + dy:r + dy + h, r + dx:r + dx + w]
        differs = fg & (nb != lab) & (depth > dist)
        depth[differs] = dist
    return depth


def instance_targets(labels, border=2):
    """Three-class targets from instance labels: 0 background, 1 interior, 2 border.

    labels: (H, W) or (N, H, W) integer label image, 0 = background, one id per object.
    border: width of the border band in pixels (>= 1): an object pixel is border when a pixel of
        another id (another object or background) lies within Euclidean distance `border`.
        border=1 is the one-pixel inner outline (4-neighbours); border=2 adds the diagonal and
        second ring, and so on. Two touching objects are then separated by 2 * border pixels of
        border class.
    Returns int64 of the same shape.

    Every object keeps at least one interior pixel, so that it has a seed when the targets are
    turned back into instances: an object thinner than the band gets its deepest pixels (those
    farthest from another id) as interior. Two such thin objects side by side may still give
    seeds that touch; objects of a few pixels across are below what the border band can separate.
    An object whose interior falls in several pieces (a narrow neck) keeps its largest piece as
    interior; the smaller ones become border: one object, one seed.
    """
    lab = check_instance_labels(labels)
    if isinstance(border, (bool, np.bool_)) or not isinstance(border, (int, np.integer)) \
            or border < 1:
        raise ValueError(f"border must be a whole number of pixels >= 1, got {border!r}")
    if lab.ndim == 3:
        return np.stack([instance_targets(x, border) for x in lab]) if len(lab) else \
            np.zeros(lab.shape, np.int64)
    fg = lab > 0
    depth = border_depth(lab, border)
    out = np.where(fg, np.where(np.isfinite(depth), 2, 1), 0).astype(np.int64)
    # objects without an interior pixel: their deepest pixels become interior (the seed)
    ids, inverse = np.unique(lab[fg], return_inverse=True)
    if ids.size:
        d = depth[fg]
        deepest = np.zeros(ids.size)
        np.maximum.at(deepest, inverse.reshape(-1), d)
        thin = np.isfinite(deepest)                     # no interior pixel (depth inf) at all
        if thin.any():
            seed = thin[inverse] & (d == deepest[inverse])
            vals = out[fg]
            vals[seed] = 1
            out[fg] = vals
    return _one_interior_piece(out, lab)


def _one_interior_piece(targets, lab):
    """Keep each object's largest 4-connected piece of interior; smaller pieces (where a narrow
    neck of the object is all border) become border, so every object has exactly one seed."""
    comp = label_components(np.where(targets == 1, lab, 0), connectivity=4, by_value=True)
    n = int(comp.max())
    if n == 0:
        return targets
    flat = comp.reshape(-1)
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    pieces, first = np.unique(flat, return_index=True)
    owner = lab.reshape(-1)[first[pieces > 0]]          # the object of each piece 1..n
    order = np.lexsort((-sizes, owner))                 # by object, the largest piece first
    keep = np.zeros(n + 1, bool)
    lead = np.ones(n, bool)
    lead[1:] = owner[order][1:] != owner[order][:-1]
    keep[order[lead] + 1] = True
    drop = (comp > 0) & ~keep[comp]
    targets[drop] = 2
    return targets


def instance_weight_map(labels, targets=None, w0=10.0, sigma=5.0, class_balance=True, border=2):
    """The U-Net paper's weight map (float32, H x W, or N x H x W) for three-class targets.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2)),
    d1, d2 the distances to the nearest and second-nearest object of the true instances `labels`.
    w_c balances the three classes of `targets` (default: instance_targets(labels, border)); the
    border term is added on background and border pixels (targets != 1). On an object's border
    pixel d1 = 0 and d2 is the distance to the neighbouring object, so the bands where two cells
    touch weigh the most, as the gaps between cells do in the paper.
    Each object's distance transform is computed within its bounding box grown by the reach of
    the exponential (weightmap.border_reach), so 1,000 objects on 1024 x 1024 take seconds."""
    lab = check_instance_labels(labels)
    tgt = instance_targets(lab, border) if targets is None else np.asarray(targets)
    if tgt.shape != lab.shape:
        raise ValueError(f"targets {tgt.shape} and labels {lab.shape} differ in shape")
    return weight_map(lab, w0=w0, sigma=sigma, class_balance=class_balance, labels=tgt,
                      border_on=tgt != 1)


def _ids_and_regions(mask, connectivity=8):
    """(number of nonzero ids, how many of them form exactly one connected region)."""
    comp = label_components(mask, connectivity, by_value=True)
    if comp.max() == 0:
        return 0, 0
    flat = comp.reshape(-1)
    _, first = np.unique(flat, return_index=True)       # first pixel of each component (and 0)
    first = first[flat[first] > 0]
    comp_ids, per_id = np.unique(mask.reshape(-1)[first], return_counts=True)
    return len(comp_ids), int(np.count_nonzero(per_id == 1))


def instance_mask_problem(masks, min_ids=5, single_region=0.9):
    """Do these masks look like instance label images rather than class labels?

    masks: a sequence of 2-D integer masks (or an (N, H, W) array).
    They are taken for instance labels when all three hold:
      * many ids per image: at least half of the non-empty masks hold >= min_ids nonzero ids;
      * each id is one connected region (8-connectivity) for at least `single_region` of the ids;
      * the ids do not mean the same thing across images: the sets of ids differ from mask to
        mask (or there is only one mask to go by).
    Binary masks and small multi-class masks (a few classes, a class often in several pieces, the
    same classes from image to image) are never flagged.
    Returns None, or a message for the user that names --instances and --classes."""
    counts, singles, id_sets, top = [], [], set(), 0
    for m in masks:
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"instance_mask_problem needs 2-D masks, got shape {m.shape}")
        if m.dtype.kind == "f":
            m = m.astype(np.int64)
        n_ids, n_single = _ids_and_regions(m)
        if n_ids == 0:
            continue
        counts.append(n_ids)
        singles.append(n_single)
        ids = np.unique(m)
        id_sets.add(ids[ids != 0].tobytes())
        top = max(top, int(ids[-1]))
    if not counts:
        return None
    counts = np.array(counts)
    many = np.count_nonzero(counts >= min_ids) * 2 >= len(counts)
    share_single = sum(singles) / counts.sum()
    differ = len(counts) == 1 or len(id_sets) > 1
    if not (many and share_single >= single_region and differ):
        return None
    return (f"the masks look like instance label images (one id per object), not class labels: "
            f"they hold {counts.min()}-{counts.max()} ids per image, {100 * share_single:.0f}% of "
            f"the ids are one connected region each, and the ids differ from image to image. "
            f"Read as classes they would ask for a {top + 1}-class network "
            f"whose classes name different objects in every image. Use --instances to learn background / interior / border and get "
            f"one label per object back; if the values really are classes, say so with "
            f"--classes N.")
